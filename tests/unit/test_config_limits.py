"""``sidecar.limits`` in the site file: the HTTP server's caps and deadlines, with located mistakes."""

from __future__ import annotations

from pathlib import Path

import pytest

from sip_refuge.config import HttpLimits, load_site
from sip_refuge.errors import ConfigError
from tests.support.sites import example_copy

CAMERA_LINE = "  camera_interval: 60s                    # seconds between camera health probes\n"


@pytest.fixture()
def site_file(tmp_path: Path) -> Path:
    return example_copy(tmp_path)


def with_limits(path: Path, *lines: str) -> Path:
    text = path.read_text()
    assert CAMERA_LINE in text
    path.write_text(text.replace(CAMERA_LINE, CAMERA_LINE + "  limits:\n" + "".join(f"    {x}\n" for x in lines)))
    return path


def test_limits_default_when_absent_and_take_durations(site_file: Path) -> None:
    site = load_site(site_file)
    assert site.sidecar is not None and site.sidecar.limits == HttpLimits()
    site = load_site(with_limits(site_file, "per_client: 8", "header_timeout: 5s", "idle_timeout: 2m"))
    assert site.sidecar is not None
    assert site.sidecar.limits == HttpLimits(per_client=8, header_timeout=5, idle_timeout=120)


@pytest.mark.parametrize(("line", "message"), [
    ("workers: 1", "sidecar.limits.workers: 1 is out of range 2..256"),
    ("per_client: 5000", "sidecar.limits.per_client: 5000 is out of range 1..1000"),
    ("reserve: 600", "sidecar.limits.reserve: 600 is out of range 0..500"),
    ("header_timeout: forever", "sidecar.limits.header_timeout: 'forever' is not a duration"),
    ("conections: 10", "sidecar.limits.conections: "),
])
def test_a_bad_limit_names_its_line(site_file: Path, line: str, message: str) -> None:
    with_limits(site_file, line)
    number = site_file.read_text().splitlines().index(f"    {line}") + 1
    with pytest.raises(ConfigError) as info:
        load_site(site_file)
    found = [str(p) for p in info.value.problems]
    assert any(p.startswith(f"{site_file}:{number}: {message}") for p in found), found


def test_live_views_cannot_exceed_streams(site_file: Path) -> None:
    with_limits(site_file, "streams: 40", "live_views: 50")
    with pytest.raises(ConfigError) as info:
        load_site(site_file)
    assert any("sidecar.limits.live_views: 50 is above streams (40)" in str(p) for p in info.value.problems)
