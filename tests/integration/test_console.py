"""The console on real calls: the alarm, acknowledgement, every call in view and the plain site plan.

Everything is real: Asterisk 22 on loopback, posts and desks as raw SIP peers (tests/support/sipua.py) that
call and answer through its queue, ``sip-refuge sidecar SITE`` as a subprocess following AMI with its camera
monitor on the RTSP test camera, and headless Chromium logged in as an operator. The only stand-in is
Chromium's notification display: the page's calls to the Notification API are recorded as they are made.
"""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from playwright.sync_api import Page, expect

from sip_refuge.config import Site, load_site
from sip_refuge.config.secrets import init_secrets
from sip_refuge.pbx.asterisk import Asterisk, free_port
from tests.integration.conftest import EXAMPLE, desks_ready
from tests.support.browser import Browser, log_in
from tests.support.operators import add_operator
from tests.support.pages import CAMERA_FRAME_SHOWN, SCREENSHOTS
from tests.support.rtsp_camera import TestCamera
from tests.support.sidecar import Sidecar, wait_until
from tests.support.sipua import OutgoingCall, SipPeer
from tests.support.sites import cameras_on, rtp_range

pytestmark = pytest.mark.integration

CAMERA_USER = "viewer"
OPERATOR = "alice"
WAIT_MS = 20_000  # generous: these tests prove behaviour, not speed
# Records each notification the page raises (Chromium grants the permission; headless has no screen for it).
NOTIFICATIONS = """
window.notified = [];
if (window.Notification) {
  const Real = window.Notification;
  window.Notification = class extends Real {
    constructor(title, options) { super(title, options); window.notified.push({ title, ...(options || {}) }); }
  };
}
"""
SOUNDING = """() => { const s = window.refugeConsole.sound();
  return s.playing && s.context === "running" && s.level > 0.05; }"""
# The loudest the page's alarm output gets over 1.5 s (one round of the tone and its pause).
LOUDEST = """async () => { let most = 0;
  for (let i = 0; i < 30; i += 1) { most = Math.max(most, window.refugeConsole.sound().level);
    await new Promise((r) => setTimeout(r, 50)); }
  return most; }"""


def write_site(folder: Path, camera: TestCamera, camera_password: str) -> Path:
    """The example site on free loopback ports, its cameras on the test camera, desks ringing long enough to
    answer by hand and calls waiting long enough (max_wait) that none overflows while a test looks at it."""
    data = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    pbx = data["pbx"]
    pbx.update(host="127.0.0.1", bind="127.0.0.1", sip_port=free_port(), transport="udp", qualify_frequency=5)
    pbx["rtp_start"], pbx["rtp_end"] = rtp_range()
    pbx["ami"]["port"] = free_port()
    data["queue"].update(ring_timeout=30, max_wait=300)
    data["sidecar"].update(listen=f"127.0.0.1:{free_port()}", camera_interval="5s",
                           database=str(folder / "sidecar.sqlite3"))
    data["cctv"] = []
    cameras_on(data, folder, camera, CAMERA_USER, camera_password)
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    init_secrets(load_site(path, check_secrets=False))
    return path


@dataclass
class Room:
    """The control room: PBX, sidecar, phones, and one Chromium logged in with a dashboard and a desk's page."""

    site: Site
    pbx: Asterisk
    sidecar: Sidecar
    posts: dict[str, SipPeer]
    desks: dict[str, SipPeer]
    browser: Browser
    dashboard: Page
    operator: Page
    calls: list[OutgoingCall] = field(default_factory=list)

    @property
    def pages(self) -> tuple[Page, Page]:
        return self.dashboard, self.operator

    def call(self, post_id: str) -> tuple[OutgoingCall, str]:
        """``post_id`` calls the queue; returns the call and its incident, once the sidecar has it live."""
        known = {c["incident"] for c in self.sidecar.json("/api/v1/posts")["calls"]}
        call = self.posts[post_id].call(self.site.queue.extension)
        self.calls.append(call)
        live = wait_until(lambda: next((c for c in self.sidecar.json("/api/v1/posts")["calls"]
                                        if c["post"] == post_id and c["incident"] not in known), None), 20,
                          f"the call of {post_id} live at the sidecar")
        return call, str(live["incident"])

    def incident(self, incident: str) -> dict[str, Any]:
        found = self.sidecar.incident(incident)
        assert found is not None
        return found


@pytest.fixture(scope="module")
def room(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Room]:
    folder = tmp_path_factory.mktemp("console")
    password = "cam-" + secrets.token_hex(8)
    with TestCamera(["sutton-market", "idlewells", "kirkby-bus-station"], user=CAMERA_USER,
                    password=password) as camera:
        site_file = write_site(folder, camera, password)
        site = load_site(site_file)
        assert site.sidecar is not None
        operator_password = add_operator(site, OPERATOR)
        sidecar = Sidecar(site_file, f"http://{site.sidecar.host}:{site.sidecar.port}")
        phones: dict[str, SipPeer] = {}
        try:
            with Asterisk(site, command="pytest tests/integration/test_console.py", boot_timeout=60) as pbx, \
                    Browser(folder / "chromium") as browser:
                for phone in [*site.posts, *site.desks]:
                    phones[phone.id] = SipPeer(phone.id, phone.secret.read(), (site.pbx.host, site.pbx.sip_port))
                    assert phones[phone.id].register().code == 200, f"{phone.id} could not register"
                wait_until(lambda: desks_ready(pbx, site), 20, "desks ready in the queue")
                sidecar.start()
                sidecar.wait_ami()
                wait_until(lambda: all(p["online"] and p["camera"]["ok"] for p in sidecar.posts().values()), 30,
                           "every post online and its camera checked")
                browser.context.grant_permissions(["notifications"], origin=sidecar.url)
                browser.context.add_init_script(NOTIFICATIONS)
                dashboard = browser.page()
                log_in(dashboard, sidecar.url + "/", OPERATOR, operator_password)
                operator = browser.page()
                operator.goto(sidecar.url + "/operator?desk=desk-1")
                for page in (dashboard, operator):
                    expect(page.locator("#link-state")).to_have_attribute("data-state", "open", timeout=WAIT_MS)
                    # The click that lets the page sound the alarm, as an operator starts a console. (Chromium
                    # lets a second page of an origin the operator clicked in play sound at once: then the
                    # console has started by itself, and says so.)
                    if page.locator("#start-console").is_visible():
                        page.locator("#start-console").click()
                    expect(page.locator("#console-state")).to_have_attribute("data-state", "started")
                    assert page.evaluate("window.refugeConsole.sound().context") == "running"
                yield Room(site, pbx, sidecar, {p.id: phones[p.id] for p in site.posts},
                           {d.id: phones[d.id] for d in site.desks}, browser, dashboard, operator)
        finally:
            sidecar.close()
            for peer in phones.values():
                peer.close()


@pytest.fixture(autouse=True)
def quiet_room(room: Room) -> Iterator[None]:
    """Each test starts with no call anywhere and no alarm on, however the one before ended."""
    yield
    for call in room.calls:
        call.hangup()
    room.calls.clear()
    wait_until(lambda: "0 active channels" in room.pbx.cli("core show channels count"), 20, "no call left")
    wait_until(lambda: not room.sidecar.json("/api/v1/posts")["calls"], 20, "no live call at the sidecar")
    for missed in room.sidecar.json("/api/v1/posts")["missed"]:
        room.sidecar.session.post(f"{room.sidecar.url}/api/v1/incidents/{missed['incident']}/acknowledge", timeout=10)
    for page in room.pages:
        expect(page.locator("body")).to_have_attribute("data-alarm", "off", timeout=WAIT_MS)


def expect_alarm(page: Page) -> None:
    """The alarm is on, seen (data-alarm, the red bar) and heard (the page's tone, measured at its output)."""
    expect(page.locator("body")).to_have_attribute("data-alarm", "on", timeout=WAIT_MS)
    expect(page.locator("#alarm")).to_be_visible()
    page.wait_for_function(SOUNDING, polling=20, timeout=WAIT_MS)
    expect(page.locator("body")).to_have_attribute("data-sound", "on")


def expect_quiet(page: Page, title: str) -> None:
    """The alarm is off: nothing on the page says so, and its output is silent over a whole round of the tone."""
    expect(page.locator("body")).to_have_attribute("data-alarm", "off", timeout=WAIT_MS)
    expect(page.locator("body")).to_have_attribute("data-sound", "off")
    expect(page.locator("#alarm")).to_be_hidden()
    assert page.evaluate("window.refugeConsole.sound().playing") is False
    # The analyser still holds the last samples of a tone for a moment after it stops (longer on a loaded
    # machine): wait for the output to fall silent once, then it must stay silent over a whole round.
    page.wait_for_function("window.refugeConsole.sound().level === 0", polling=20, timeout=WAIT_MS)
    assert page.evaluate(LOUDEST) == 0
    expect(page).to_have_title(title, timeout=5000)


def test_a_new_call_sounds_the_alarm_on_both_pages_until_a_desk_answers(room: Room) -> None:
    """A real call sounds the alarm (tone, notification, flashing title, red bar) on both pages; a desk's answer silences it."""
    post, desk = room.site.posts[0], room.site.desks[0]
    titles = [page.title() for page in room.pages]
    rung = len(room.desks[desk.id].incoming)
    call, incident = room.call(post.id)
    for page in room.pages:
        expect_alarm(page)
        page.wait_for_function("name => document.title === `⚠ CALL: ${name}`", arg=post.name, timeout=WAIT_MS)
        expect(page.locator("#alarm .alarm-calls")).to_contain_text(f"{post.name} ")
        notes = page.evaluate("window.notified")
        assert [(n["title"], n["tag"], n["requireInteraction"]) for n in notes] == \
            [(f"Refuge call: {post.name}", incident, True)]
    expect(room.dashboard.locator(f"#marker-{post.id}")).to_have_attribute("data-state", "calling")
    expect(room.operator.locator("#banner")).to_have_attribute("data-state", "queued")
    room.dashboard.evaluate("window.scrollTo(0, 0)")
    room.dashboard.screenshot(path=SCREENSHOTS / "alarm.png")

    room.desks[desk.id].wait_incoming(15, index=rung).answer()
    assert call.wait_final(10).code == 200
    for page, title in zip(room.pages, titles, strict=True):
        expect_quiet(page, title)
    expect(room.operator.locator("#banner")).to_have_attribute("data-state", "answered-here")
    expect(room.dashboard.locator(f"#marker-{post.id}")).to_have_attribute("data-state", "answered")
    found = room.incident(incident)
    assert found["answered_by"] == desk.id and found["acknowledged_at"] is None
    call.hangup()
    wait_until(lambda: room.incident(incident)["state"] == "ended", 20, "the call ended")
    for page in room.pages:  # an answered call leaves no missed alarm behind
        expect(page.locator("body")).to_have_attribute("data-alarm", "off")
    assert room.browser.errors == []


def test_an_operator_acknowledges_and_every_console_goes_quiet(room: Room) -> None:
    """Acknowledge on one page silences both and is recorded; a call abandoned unacknowledged keeps the alarm until acknowledged."""
    post = room.site.posts[1]
    titles = [page.title() for page in room.pages]
    rung = len(room.desks["desk-1"].incoming)
    call, incident = room.call(post.id)
    room.desks["desk-1"].wait_incoming(15, index=rung)  # the desks ring; nobody answers
    for page in room.pages:
        expect_alarm(page)
    room.operator.locator("#acknowledge").click()
    for page, title in zip(room.pages, titles, strict=True):
        expect_quiet(page, title)
    expect(room.dashboard.locator(f"#calls li[data-incident='{incident}']")).to_contain_text(
        f"acknowledged by {OPERATOR}")
    expect(room.operator.locator("#acknowledged")).to_contain_text(f"Alarm acknowledged by {OPERATOR} at ")
    found = room.incident(incident)
    assert found["acknowledged_by"] == OPERATOR and found["acknowledged_at"].endswith("Z")
    step = next(t for t in found["timeline"] if t["kind"] == "acknowledged")
    assert step["detail"] == {"by": OPERATOR, "desk": "desk-1"}
    audit = room.sidecar.json("/api/v1/audit?limit=20")["entries"]
    assert any((e["action"], e["outcome"], e["actor"], e["target"]) == ("incident.acknowledge", "ok", OPERATOR, incident)
               for e in audit)
    # The caller gives up: acknowledged already, so the alarm stays off.
    call.hangup()
    wait_until(lambda: room.incident(incident)["outcome"] == "abandoned", 20, "the call abandoned")
    expect(room.dashboard.locator(f"#incidents tr[data-incident='{incident}']")).to_contain_text("Abandoned",
                                                                                                  timeout=WAIT_MS)
    for page in room.pages:
        expect(page.locator("body")).to_have_attribute("data-alarm", "off")

    # A caller who gives up before anyone answers or acknowledges: a missed call, still an alarm.
    other = room.site.posts[2]
    rung = len(room.desks["desk-1"].incoming)
    call, missed = room.call(other.id)
    room.desks["desk-1"].wait_incoming(15, index=rung)
    call.hangup()
    wait_until(lambda: room.incident(missed)["outcome"] == "abandoned", 20, "the second call abandoned")
    expect(room.dashboard.locator("#calls li.none")).to_be_visible(timeout=WAIT_MS)
    for page in room.pages:
        expect_alarm(page)
        expect(page.locator("#alarm .alarm-calls")).to_contain_text("missed: the caller hung up before any desk answered")
    room.dashboard.locator(f"#alarm button.acknowledge[data-incident='{missed}']").click()
    for page, title in zip(room.pages, titles, strict=True):
        expect_quiet(page, title)
    assert room.incident(missed)["acknowledged_by"] == OPERATOR
    assert room.browser.errors == []


def test_three_calls_at_once_are_all_in_view_longest_waiting_first(room: Room) -> None:
    """Three posts call a real Asterisk at once: three rows, longest waiting first, and selecting each shows its live camera."""
    order = ["kirkby-bus-station", "sutton-market", "idlewells"]
    incidents = [room.call(post_id)[1] for post_id in order]
    page = room.operator
    rows = page.locator("#call-list button.call-row")
    expect(rows).to_have_count(3, timeout=WAIT_MS)
    assert [rows.nth(i).get_attribute("data-incident") for i in range(3)] == incidents
    names = [room.site.post(p).name for p in order]
    for i, name in enumerate(names):
        expect(rows.nth(i).locator("strong")).to_have_text(name)
        rows.nth(i).locator(".mini img").evaluate("img => img.decode()")  # the post camera's thumbnail
        assert rows.nth(i).locator(".mini img").evaluate("img => img.naturalWidth") > 0
    expect(room.dashboard.locator("#calls li")).to_have_count(3, timeout=WAIT_MS)
    assert [room.dashboard.locator("#calls li").nth(i).get_attribute("data-incident") for i in range(3)] == incidents

    # The waiting times count on from the sidecar's clock, the first caller's the longest.
    def seconds(text: str) -> int:
        found = re.fullmatch(r"(\d+):(\d\d)", text)
        assert found is not None, text
        return int(found.group(1)) * 60 + int(found.group(2))

    first = [seconds(rows.nth(i).locator("[data-since]").inner_text()) for i in range(3)]
    assert first == sorted(first, reverse=True), first
    page.wait_for_function("w => Number(document.querySelector('#call-list [data-since]').textContent.split(':')[1]) "
                           "!== w", arg=first[0] % 60, timeout=WAIT_MS)

    for i, (post_id, name) in enumerate(zip(order, names, strict=True)):
        rows.nth(i).click()
        expect(rows.nth(i)).to_have_attribute("aria-pressed", "true")
        expect(page.locator("#post-name")).to_have_text(name)
        expect(page.locator("#camera")).to_have_attribute("src", re.compile(rf"^/cameras/{post_id}/live\.mjpeg"))
        page.wait_for_function(CAMERA_FRAME_SHOWN, polling=50, timeout=WAIT_MS)
        expect(page.locator("#incident")).to_contain_text(incidents[i])
        for j in range(3):
            if j != i:
                expect(rows.nth(j)).to_have_attribute("aria-pressed", "false")
    # From the keyboard: Tab to a call, Enter shows it; the list is drawn anew and the focus stays on it.
    rows.nth(0).focus()
    page.keyboard.press("Enter")
    expect(rows.nth(0)).to_have_attribute("aria-pressed", "true")
    expect(page.locator("#post-name")).to_have_text(names[0])
    expect(rows.nth(0)).to_be_focused()
    rows.nth(1).click()
    expect(page.locator("#post-name")).to_have_text(names[1])
    page.wait_for_function(CAMERA_FRAME_SHOWN, polling=50, timeout=WAIT_MS)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=SCREENSHOTS / "operator-calls.png")
    assert room.browser.errors == []


def test_the_plain_plan_puts_posts_where_their_lat_lon_say(room: Room) -> None:
    """Without a plan picture the dashboard draws the posts to scale around their centroid (equirectangular), north up."""
    page = room.dashboard
    expect(page.locator("#plan")).to_have_attribute("data-image", "no")
    centres = page.evaluate("""ids => Object.fromEntries(ids.map((id) => {
      const r = document.querySelector(`#marker-${id} .dot`).getBoundingClientRect();
      return [id, [r.left + r.width / 2, r.top + r.height / 2]]; }))""", [p.id for p in room.site.posts])
    box = page.evaluate("(() => { const r = document.getElementById('plan').getBoundingClientRect();"
                        " return [r.left, r.top, r.right, r.bottom]; })()")
    located = {p.id: (p.location.lat, p.location.lon) for p in room.site.posts}
    lat0 = math.radians(sum(lat for lat, _ in located.values()) / len(located))
    east = {k: lon * math.cos(lat0) for k, (_, lon) in located.items()}  # degrees, shrunk to the centroid's
    a, b, c = "sutton-market", "kirkby-bus-station", "idlewells"
    # Pixels per degree, from two posts far apart: the same east-west and north-south (to scale), north up.
    per_x = (centres[b][0] - centres[a][0]) / (east[b] - east[a])
    per_y = -(centres[b][1] - centres[a][1]) / (located[b][0] - located[a][0])
    assert per_x > 0 and abs(per_x / per_y - 1) < 0.01, (per_x, per_y)
    predicted = (centres[a][0] + per_x * (east[c] - east[a]), centres[a][1] - per_y * (located[c][0] - located[a][0]))
    assert math.dist(predicted, centres[c]) < 1.5, (predicted, centres[c])
    for x, y in centres.values():
        assert box[0] < x < box[2] and box[1] < y < box[3]
    for post in room.site.posts:
        expect(page.locator(f"#marker-{post.id}")).to_have_attribute("data-state", "idle")
