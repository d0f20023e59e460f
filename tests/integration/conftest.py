"""Fixtures for tests against a real Asterisk: sites on free loopback ports, one Asterisk per session, phones."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from sip_refuge.config import Desk, Post, Site, load_site
from sip_refuge.config.secrets import init_secrets
from sip_refuge.pbx.asterisk import Asterisk, free_port
from tests.support.queue_desk import DESK, register_desk
from tests.support.sipua import SipPeer
from tests.support.sites import rtp_range
from tests.support.waiting import wait_for as wait_until

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config" / "site.example.yaml"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: needs a real Asterisk (and other real services)")




def write_site(folder: Path, **queue: Any) -> Site:
    """The example site moved onto free loopback ports, with fresh secrets, in ``folder``."""
    data = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    pbx = data["pbx"]
    pbx.update(host="127.0.0.1", bind="127.0.0.1", sip_port=free_port(), transport="udp", qualify_frequency=5)
    pbx["rtp_start"], pbx["rtp_end"] = rtp_range()
    pbx["ami"]["port"] = free_port()
    data["queue"].update(queue)
    if data.get("sidecar"):
        data["sidecar"]["listen"] = f"127.0.0.1:{free_port()}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    init_secrets(load_site(path, check_secrets=False))
    return load_site(path)


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    # Short waits so the overflow test takes seconds; every other test answers well within them.
    return write_site(tmp_path_factory.mktemp("site"), max_wait=6, ring_timeout=5)


@pytest.fixture(scope="session")
def pbx(site: Site) -> Iterator[Asterisk]:
    with Asterisk(site, command="pytest tests/integration", boot_timeout=60) as asterisk:
        yield asterisk


@dataclass
class Phones:
    """Every post and desk of the site as a registered SIP phone, by id."""

    posts: dict[str, SipPeer]
    desks: dict[str, SipPeer]

    def all(self) -> list[SipPeer]:
        return [*self.posts.values(), *self.desks.values()]


def every_phone(site: Site) -> list[Post | Desk]:
    return [*site.posts, *site.desks]


def peer(site: Site, phone_id: str, *, password: str | None = None, display: str | None = None) -> SipPeer:
    phone = next((p for p in every_phone(site) if p.id == phone_id), None)
    secret = password if password is not None else (phone.secret.read() if phone else "")
    return SipPeer(phone_id, secret, (site.pbx.host, site.pbx.sip_port), display=display)




def desks_ready(pbx: Asterisk, site: Site) -> bool:
    """Every desk is a queue member Asterisk would ring now (its contact qualified)."""
    text = pbx.cli(f"queue show {site.queue.name}")
    return all(re.search(rf"\(PJSIP/{re.escape(d.id)}\).*\(Not in use\)", text) for d in site.desks)


@pytest.fixture
def phones(pbx: Asterisk, site: Site) -> Iterator[Phones]:
    """Fresh peers per test (no inbox left over from another test), registered, desks ready to ring."""
    posts = {p.id: peer(site, p.id) for p in site.posts}
    desks = {d.id: peer(site, d.id) for d in site.desks}
    made = Phones(posts, desks)
    try:
        for phone in made.all():
            response = phone.register()
            assert response.code == 200, f"{phone.user} could not register: {response}"
        wait_until(lambda: desks_ready(pbx, site), 10, "desk ready in the queue")
        yield made
    finally:
        for phone in made.all():
            phone.sign_off()
        try:
            wait_until(lambda: "0 active channels" in pbx.cli("core show channels count"), 10, "idle Asterisk")
        except AssertionError:
            # Fail this test, but hand the next one a clean Asterisk instead of a cascade of failures.
            pbx.cli("channel request hangup all")
            raise


@pytest.fixture
def running_pbx(pbx: Asterisk) -> Iterator[Asterisk]:
    """The module's Asterisk, running; a test that stopped it and failed gets it started again afterwards."""
    if not pbx.running:
        pbx.start()
    yield pbx
    if not pbx.running:
        pbx.start()


@pytest.fixture
def desk(running_pbx: Asterisk, site: Site) -> Iterator[SipPeer]:
    """desk-1 as a registered robot (tests/support/queue_desk.py); afterwards Asterisk must have no channel left."""
    d = site.desk(DESK)
    robot = SipPeer(d.id, d.secret.read(), (site.pbx.host, site.pbx.sip_port), display=d.name)
    try:
        register_desk(robot, running_pbx, site)
        yield robot
    finally:
        robot.sign_off()
    if running_pbx.running:
        try:
            wait_until(lambda: "0 active channels" in running_pbx.cli("core show channels count"), 15,
                       "idle Asterisk")
        except AssertionError:
            running_pbx.cli("channel request hangup all")  # hand the next test a clean PBX, but fail this one
            raise


class LogMark:
    """What Asterisk logged (messages.log) since this mark was made."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def text(self) -> str:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read().decode("utf-8", "replace")
