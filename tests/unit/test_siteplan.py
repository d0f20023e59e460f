"""The site plan: ``site.plan`` in the site file (located mistakes), the drawing's geometry, and its picture's route."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from sip_refuge.config import load_site
from sip_refuge.errors import ConfigError
from sip_refuge.sidecar import siteplan
from sip_refuge.sidecar.web import create_app
from tests.support.hubs import memory_hub
from tests.support.sites import example_copy

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config" / "site.example.yaml"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64  # the magic is what the sidecar checks; browsers decode the rest
PLAN = "  plan:\n    image: plan.png\n    bounds: [[53.095, -1.270], [53.130, -1.240]]\n"
TOKEN = "t0ken-for-the-site-plan-tests-012345"


@pytest.fixture()
def site_file(tmp_path: Path) -> Path:
    path = example_copy(tmp_path)
    (tmp_path / "plan.png").write_bytes(PNG)
    return path


def with_plan(path: Path, plan: str = PLAN) -> Path:
    text = path.read_text()
    anchor = "  # reference_prefix: ASH"
    assert anchor in text
    path.write_text(text.replace(anchor, plan.rstrip("\n") + "\n" + anchor, 1))
    return path


def line_of(path: Path, needle: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def test_a_site_plan_loads_with_its_bounds(site_file: Path) -> None:
    site = load_site(with_plan(site_file))
    assert site.plan is not None
    assert (site.plan.south, site.plan.west, site.plan.north, site.plan.east) == (53.095, -1.27, 53.13, -1.24)
    assert site.plan.image == site_file.parent / "plan.png"
    assert site.warnings == ()
    assert load_site(EXAMPLE, check_secrets=False).plan is None  # the key is optional


@pytest.mark.parametrize(("plan", "path", "line", "message"), [
    ("  plan:\n    image: plan.png\n", "site.plan.bounds", "plan:", "is required"),
    ("  plan:\n    bounds: [[53.095, -1.270], [53.130, -1.240]]\n", "site.plan.image", "plan:", "is required"),
    ("  plan:\n    image: plan.png\n    bounds: [53.095, -1.270, 53.130, -1.240]\n", "site.plan.bounds", "bounds:",
     "must be [[south, west], [north, east]]"),
    ("  plan:\n    image: plan.png\n    bounds: [[53.095, true], [53.130, -1.240]]\n", "site.plan.bounds", "bounds:",
     "must be [[south, west], [north, east]]"),
    ("  plan:\n    image: plan.png\n    bounds: [[93.1, -1.270], [53.130, -1.240]]\n", "site.plan.bounds[0][0]",
     "bounds:", "a latitude is -90 to 90"),
    ("  plan:\n    image: plan.png\n    bounds: [[53.095, -1.270], [53.130, 181]]\n", "site.plan.bounds[1][1]",
     "bounds:", "a longitude is -180 to 180"),
    ("  plan:\n    image: plan.png\n    bounds: [[53.130, -1.270], [53.095, -1.240]]\n", "site.plan.bounds",
     "bounds:", "must be below the north edge"),
    ("  plan:\n    image: plan.png\n    bounds: [[53.095, 179.5], [53.130, -179.5]]\n", "site.plan.bounds",
     "bounds:", "180th meridian"),
    ("  plan:\n    image: missing.png\n    bounds: [[53.095, -1.270], [53.130, -1.240]]\n", "site.plan.image",
     "image:", "cannot read the site plan"),
    ("  plan:\n    image: plan.svg\n    bounds: [[53.095, -1.270], [53.130, -1.240]]\n", "site.plan.image",
     "image:", "not a PNG, JPEG, GIF or WebP picture"),
    ("  plan:\n    image: .\n    bounds: [[53.095, -1.270], [53.130, -1.240]]\n", "site.plan.image",
     "image:", "is a directory"),
    ("  plan:\n    image: plan.png\n    bounds: [[53.095, -1.270], [53.130, -1.240]]\n    zoom: 3\n",
     "site.plan.zoom", "zoom:", "unknown key"),
])
def test_a_bad_plan_is_refused_at_its_line(site_file: Path, plan: str, path: str, line: str, message: str) -> None:
    (site_file.parent / "plan.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>')
    with_plan(site_file, plan)
    with pytest.raises(ConfigError) as info:
        load_site(site_file)
    problems = [str(p) for p in info.value.problems]
    at = line_of(site_file, f"  {line}")
    assert any(p.startswith(f"{site_file}:{at}: {path}: ") and message in p for p in problems), problems


def test_the_picture_is_checked_only_where_the_sidecar_runs(site_file: Path) -> None:
    """A post agent loads the site without the sidecar's files: a plan picture it does not have is no error."""
    with_plan(site_file, PLAN.replace("plan.png", "elsewhere.png"))
    assert load_site(site_file, check_secrets=False).plan is not None
    with pytest.raises(ConfigError):
        load_site(site_file)


def test_posts_the_plan_cannot_show_are_warnings_at_their_lines(site_file: Path) -> None:
    with_plan(site_file, PLAN.replace("[[53.095, -1.270]", "[[53.110, -1.270]"))  # Kirkby (53.0997) falls outside
    site = load_site(site_file)
    [warning] = site.warnings
    assert (warning.path, warning.line) == ("posts[2].location", line_of(site_file, "Station Street, Kirkby"))
    assert "kirkby-bus-station (53.0997, -1.2453) is outside site.plan.bounds" in warning.message
    checked = subprocess.run([sys.executable, "-m", "sip_refuge.cli", "config", "check", str(site_file)],
                             capture_output=True, text=True, check=False)
    assert checked.returncode == 0 and f"{site_file}:{warning.line}: posts[2].location: warning: " in checked.stderr
    assert siteplan.draw(site).off_plan == ("Kirkby Bus Station",)


# -- the drawing ----------------------------------------------------------------------------------------------

def test_on_a_picture_each_post_falls_between_the_edges_by_its_lat_lon(site_file: Path) -> None:
    site = load_site(with_plan(site_file))
    drawing = siteplan.draw(site)
    assert drawing.image and max(drawing.width, drawing.height) == siteplan.WIDTH
    # The picture's shape is the bounds' shape on the ground: 0.035° of latitude by 0.030° of longitude at 53.1°.
    assert drawing.width / drawing.height == pytest.approx(0.030 * math.cos(math.radians(53.1125)) / 0.035, rel=1e-6)
    where = {m.post_id: (m.x / drawing.width, m.y / drawing.height) for m in drawing.markers}
    assert where["sutton-market"] == pytest.approx(((-1.2617 + 1.270) / 0.030, (53.130 - 53.1246) / 0.035))
    assert where["kirkby-bus-station"] == pytest.approx(((-1.2453 + 1.270) / 0.030, (53.130 - 53.0997) / 0.035))


def test_a_plain_plan_is_to_scale_north_up_and_fits_the_posts(site_file: Path) -> None:
    drawing = siteplan.draw(load_site(site_file))
    assert not drawing.image
    at = {m.post_id: m for m in drawing.markers}
    sutton, kirkby, idle = at["sutton-market"], at["kirkby-bus-station"], at["idlewells"]
    lat0 = math.radians((53.1246 + 53.1251 + 53.0997) / 3)
    per_x = (kirkby.x - sutton.x) / ((-1.2453 + 1.2617) * math.cos(lat0))
    per_y = (kirkby.y - sutton.y) / -(53.0997 - 53.1246)
    assert per_x == pytest.approx(per_y, rel=1e-9) and per_x > 0  # the same scale both ways; north is up
    assert idle.x - sutton.x == pytest.approx(per_x * (-1.2629 + 1.2617) * math.cos(lat0))
    for m in drawing.markers:
        assert siteplan.MARGIN - 1e-9 <= m.x <= drawing.width - siteplan.MARGIN + 1e-9
        assert siteplan.MARGIN - 1e-9 <= m.y <= drawing.height - siteplan.MARGIN + 1e-9
    # The scale bar says how long it is: metres times units per metre.
    assert drawing.scale_length == pytest.approx(drawing.scale_metres * per_y / siteplan.METRES_PER_DEGREE)
    assert str(drawing.scale_metres)[0] in "125" and set(str(drawing.scale_metres)[1:]) <= {"0"}


def test_names_of_posts_a_street_apart_do_not_cover_each_other(site_file: Path) -> None:
    """Sutton Market Place and Idlewells stand 100 m apart: on a plan 3 km across their names would overlap."""
    drawing = siteplan.draw(load_site(site_file))
    boxes = [(m.x + m.label_dx - len(m.name) * siteplan.CHAR_WIDTH / 2, m.y + m.label_dy - siteplan.LABEL_HEIGHT,
              m.x + m.label_dx + len(m.name) * siteplan.CHAR_WIDTH / 2, m.y + m.label_dy) for m in drawing.markers]
    for i, a in enumerate(boxes):
        assert 0 <= a[0] and a[2] <= drawing.width
        for b in boxes[i + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)


@pytest.mark.parametrize(("view", "state", "fault"), [
    ({"online": True}, "idle", False),
    ({"online": None}, "unknown", False),
    ({"online": False, "call": {"state": "queued"}}, "offline", False),
    ({"online": True, "call": {"state": "queued"}}, "calling", False),
    ({"online": True, "call": {"state": "overflowed"}}, "calling", False),
    ({"online": True, "call": {"state": "answered"}}, "answered", False),
    ({"online": True, "camera": {"ok": False}}, "fault", True),
    ({"online": True, "faults": ["tamper"]}, "fault", True),
    ({"online": True, "last_self_test": {"passed": False}}, "fault", True),
    ({"online": True, "camera": {"ok": False}, "call": {"state": "queued"}}, "calling", True),
])
def test_a_posts_colour_follows_its_state(view: dict[str, object], state: str, fault: bool) -> None:
    assert (siteplan.state_of(view), siteplan.has_fault(view)) == (state, fault)


# -- the picture's route ----------------------------------------------------------------------------------------

@pytest.fixture()
def client(site_file: Path) -> Iterator[tuple[FlaskClient, Path]]:
    site = load_site(with_plan(site_file))
    with memory_hub(site) as hub:
        yield create_app(hub, token=TOKEN).test_client(), site_file.parent / "plan.png"


def test_the_plan_picture_is_served_behind_the_login_as_it_is_now(client: tuple[FlaskClient, Path]) -> None:
    app, picture = client
    assert app.get("/site/plan").status_code == 401
    reply = app.get("/site/plan", headers={"Authorization": f"Bearer {TOKEN}"})
    assert (reply.status_code, reply.mimetype, reply.data) == (200, "image/png", PNG)
    again = app.get("/site/plan", headers={"Authorization": f"Bearer {TOKEN}", "If-None-Match": reply.headers["ETag"]})
    assert again.status_code == 304
    picture.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 32)  # replaced by a JPEG while the sidecar runs
    assert app.get("/site/plan", headers={"Authorization": f"Bearer {TOKEN}"}).mimetype == "image/jpeg"
    picture.write_text("<svg/>")  # replaced by something that is no picture: not served
    refused = app.get("/site/plan", headers={"Authorization": f"Bearer {TOKEN}"})
    assert refused.status_code == 404 and str(picture) not in refused.get_json()["detail"]  # the log has the path
    dashboard = app.get("/", headers={"Authorization": f"Bearer {TOKEN}"}).data.decode()
    assert 'data-image="yes"' in dashboard and '<image href="/site/plan"' in dashboard
