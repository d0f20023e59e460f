"""No single PBX between a caller and help (issue 12): a post on a real PBX pair reaches a desk through the
secondary Asterisk when the primary is ``kill -9``-ed while idle, while the desk rings, or mid-conversation, and
goes back to the primary once it runs again; on both SIP backends. The sidecar follows both AMIs into one
incident log and shows a dead PBX.

The pair is two real Asterisk 22 processes rendered from one site file (the primary on 127.0.0.1, the secondary on
127.0.0.2, the same ports). The desk is a SIP robot registered with both, as a desk phone with two accounts is.
Posts run as ``sip-refuge post`` processes, the sidecar as ``sip-refuge sidecar``, its CCTV target is a real
HTTP receiver verifying Standard Webhooks signatures. The promise "a desk rings within 30 s of the press" is each
wait's timeout; the figures are measured by ``bench/failover.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sip_refuge.config import Site
from sip_refuge.pbx.asterisk import free_port
from tests.support.agent import AgentProcess, Status
from tests.support.browser import Browser, log_in
from tests.support.desk_robot import DeskRobot, Ring
from tests.support.metrics import Scrape
from tests.support.operators import add_operator
from tests.support.pair import SECONDARY_HOST, Pair, pair_site, pbx_of
from tests.support.receivers import WebhookReceiver
from tests.support.sidecar import Sidecar, wait_until
from tests.support.sites import POSTS

pytestmark = pytest.mark.integration

PROMISE = 30.0  # a desk rings within this of the press (Code Blue, ASME A17.1), whatever PBX died
VISIBLE = 60.0  # a dead primary shows on /healthz, /metrics, the API, the dashboard and at the CCTV target within this
OPERATOR = "watch-officer"
BACKENDS = ("pjsua2", "pyvoip")


@dataclass
class World:
    site: Site
    pair: Pair
    sidecar: Sidecar
    receiver: WebhookReceiver
    operator_password: str

    def events(self, kind: str | None = None, after: int = 0) -> list[dict[str, Any]]:
        with self.receiver.cond:
            return [e for e in self.receiver.events[after:] if kind is None or e["type"] == kind]

    def mark(self) -> int:
        with self.receiver.cond:
            return len(self.receiver.events)

    def both_up(self) -> None:
        wait_until(lambda: all(p["up"] for p in self.sidecar.health().get("pbx", {}).values())
                   and len(self.sidecar.health()["pbx"]) == 2, 30, "the sidecar following both AMIs")

    def incidents(self, post_id: str, after: set[str]) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.sidecar.json(f"/api/v1/incidents?post={post_id}")["incidents"]
        return [i for i in found if i["id"] not in after]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    folder = tmp_path_factory.mktemp("failover")
    hook = free_port()
    site = pair_site(folder, cctv=[{"type": "webhook", "name": "vms-hook", "url": f"http://127.0.0.1:{hook}/hook",
                                    "secret_file": "secrets/webhook.secret"}])
    assert site.sidecar is not None
    receiver = WebhookReceiver((folder / "secrets" / "webhook.secret").read_text().strip())
    receiver.port = hook
    receiver.start()
    password = add_operator(site, OPERATOR)
    sidecar = Sidecar(site.path, f"http://{site.sidecar.host}:{site.sidecar.port}", extra_args=("--no-cameras",))
    try:
        with Pair(site, "pytest tests/integration/test_failover.py") as pair:
            sidecar.start()
            w = World(site, pair, sidecar, receiver, password)
            w.both_up()
            yield w
    finally:
        sidecar.close()
        receiver.stop()


@pytest.fixture
def desk(world: World) -> Iterator[DeskRobot]:
    world.pair.ensure_running()
    with world.pair.desk() as robot:
        robot.wait_registered(count=2)
        world.pair.wait_desk_ready()
        world.both_up()
        yield robot


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def both_registered(site: Site) -> dict[str, bool]:
    return {site.pbx.host: True, SECONDARY_HOST: True}


@contextmanager
def start_idle(world: World, backend: str, state: Path) -> Iterator[AgentProcess]:
    """The post of ``backend`` as a process, idle and registered with both PBXs."""
    with AgentProcess(world.site, POSTS[backend], state) as agent:
        agent.wait_status(lambda s: s["state"] == "idle" and s["registrations"] == both_registered(world.site), 30,
                          "idle and registered with both PBXs")
        world.pair.wait_post_registered(agent.post.id)
        yield agent


def ring_via(desk: DeskRobot, site: Site, index: int, pbx: str) -> Ring:
    ring = desk.wait_ring(PROMISE, index=index)
    assert pbx_of(ring.call.dest, site) == pbx, f"ring #{index} came from {ring.call.dest}, not the {pbx}"
    return ring


def connected(agent: AgentProcess) -> Status:
    return agent.wait_status(lambda s: s["state"] == "connected", 15, "connected")


def ended_incident(world: World, post_id: str, known: set[str]) -> dict[str, Any]:
    """The one incident of ``post_id`` this test made, once ended."""
    def one() -> dict[str, Any] | None:
        found = world.incidents(post_id, known)
        return found[0] if len(found) == 1 and found[0]["state"] == "ended" else None
    incident = wait_until(one, 20, f"one ended incident of {post_id}")
    assert len(world.incidents(post_id, known)) == 1
    return incident


def known_incidents(world: World, post_id: str) -> set[str]:
    return {i["id"] for i in world.incidents(post_id, set())}


def test_primary_killed_while_idle_a_press_reaches_a_desk_through_the_secondary(
        world: World, desk: DeskRobot, backend: str, tmp_path: Path) -> None:
    """With the primary kill -9-ed while the post is idle, a press rings the desk through the secondary and connects."""
    with start_idle(world, backend, tmp_path / "state") as agent:
        known, mark = known_incidents(world, agent.post.id), world.mark()
        world.pair.kill_primary()
        agent.press()
        ring = ring_via(desk, world.site, 0, "secondary")
        desk.answer(ring)
        status = connected(agent)
        assert status["call"]["host"] == SECONDARY_HOST
        desk.hangup(ring)
        agent.wait_status(lambda s: s["state"] == "idle" and s["registered"], 15, "idle again on the secondary")
        incident = ended_incident(world, agent.post.id, known)
        assert incident["pbx"] == "secondary" and incident["answered_by"] == desk.ua.user
        wait_until(lambda: [e["type"] for e in world.events(after=mark) if e["data"]["incident"] == incident["id"]]
                   == ["call.queued", "call.answered", "call.ended"], 20, "the call's events at the CCTV target")
        assert {e["data"]["pbx"] for e in world.events(after=mark) if e["data"]["incident"] == incident["id"]} \
            == {"secondary"}


def test_primary_killed_while_the_desk_rings_the_same_alarm_reaches_it_through_the_secondary(
        world: World, desk: DeskRobot, backend: str, tmp_path: Path) -> None:
    """Kill -9 of the primary while its queue rings the desk: the same alarm rings it again through the secondary, no second press."""
    with start_idle(world, backend, tmp_path / "state") as agent:
        known = known_incidents(world, agent.post.id)
        agent.press()
        ring_via(desk, world.site, 0, "primary")
        before = agent.wait_status(lambda s: s["state"] == "queued", 10, "queued on the primary")
        world.pair.kill_primary()
        again = ring_via(desk, world.site, 1, "secondary")
        desk.answer(again)
        status = connected(agent)
        assert round(status["alarm"]["since"], 1) == round(before["alarm"]["since"], 1)  # the same alarm
        assert status["alarm"]["attempts"] >= 2 and status["call"]["host"] == SECONDARY_HOST
        desk.hangup(again)
        incident = ended_incident(world, agent.post.id, known)
        kinds = [t["kind"] for t in incident["timeline"]]
        assert kinds[0] == "queued" and "moved" in kinds and incident["pbx"] == "secondary", kinds


def test_primary_killed_mid_conversation_the_post_redials_and_the_operator_is_connected_again(
        world: World, desk: DeskRobot, backend: str, tmp_path: Path) -> None:
    """Kill -9 of the primary during an answered alarm call: the post re-dials through the secondary, a desk is connected again, and the incident log has one incident with both legs."""
    with start_idle(world, backend, tmp_path / "state") as agent:
        known = known_incidents(world, agent.post.id)
        agent.press()
        first = ring_via(desk, world.site, 0, "primary")
        desk.answer(first)
        before = connected(agent)
        world.pair.kill_primary()
        again = ring_via(desk, world.site, 1, "secondary")
        desk.answer(again)
        status = connected(agent)
        assert round(status["alarm"]["since"], 1) == round(before["alarm"]["since"], 1)
        assert status["call"]["id"] != before["call"]["id"] and status["call"]["host"] == SECONDARY_HOST
        desk.hangup(again)
        incident = ended_incident(world, agent.post.id, known)
        legs = [(t["kind"], t["detail"].get("pbx")) for t in incident["timeline"]
                if t["kind"] in ("queued", "answered", "moved", "ended")]
        assert legs == [("queued", "primary"), ("answered", "primary"), ("moved", "secondary"),
                        ("answered", "secondary"), ("ended", "secondary")], incident["timeline"]
        assert incident["pbx"] == "secondary" and incident["outcome"] == "ended"


def test_a_restarted_primary_takes_the_posts_and_the_sidecar_back_without_losing_an_event(
        world: World, desk: DeskRobot, backend: str, tmp_path: Path) -> None:
    """After the primary died and came back, the post registers with it again, its next alarm goes through it, and the sidecar records and sends every event of that call."""
    with start_idle(world, backend, tmp_path / "state") as agent:
        mark = world.mark()
        world.pair.kill_primary()
        agent.wait_status(lambda s: s["registrations"][world.site.pbx.host] is False and s["state"] == "idle", 30,
                          "the primary seen gone, the post still idle")
        world.pair.primary.start()
        agent.wait_status(lambda s: s["registrations"] == both_registered(world.site), 30, "registered with both again")
        desk.wait_registered(count=3)
        world.pair.wait_desk_ready()
        world.both_up()
        known = known_incidents(world, agent.post.id)
        agent.press()
        ring = ring_via(desk, world.site, 0, "primary")
        desk.answer(ring)
        connected(agent)
        desk.hangup(ring)
        incident = ended_incident(world, agent.post.id, known)
        assert incident["pbx"] == "primary"
        wait_until(lambda: [e["type"] for e in world.events(after=mark) if e["data"].get("incident") == incident["id"]]
                   == ["call.queued", "call.answered", "call.ended"], 20, "every event of the call at the CCTV target")
        pbx_events = [(e["type"], e["data"]["pbx"]["role"]) for e in world.events(after=mark)
                      if e["type"].startswith("pbx.")]
        assert pbx_events == [("pbx.down", "primary"), ("pbx.up", "primary")]
        assert world.receiver.malformed == []


def test_primary_pbx_dead_is_visible(world: World, desk: DeskRobot, tmp_path: Path) -> None:
    """A kill -9 of the primary shows within 60 s on /healthz, /metrics, the dashboard's API, the open dashboard and as pbx.down at the CCTV target."""
    mark = world.mark()
    browser = Browser(tmp_path / "chromium")
    try:
        page = browser.page()
        log_in(page, world.sidecar.url + "/", OPERATOR, world.operator_password)
        page.wait_for_selector("#posts li")
        assert page.locator("#pbx-state").text_content() == ""  # both up: no banner
        world.pair.kill_primary()
        page.wait_for_function("document.getElementById('pbx-state').textContent.includes('The primary PBX')",
                               timeout=VISIBLE * 1000)
        assert f"The primary PBX ({world.site.pbx.host}) is down since" in str(page.locator("#pbx-state").text_content())
        assert browser.errors == []
    finally:
        browser.close()
    host = world.site.pbx.host
    health = wait_until(lambda: (h := world.sidecar.health())["status"] == "degraded"
                        and any(p.startswith(f"pbx primary ({host}): down since") for p in h["problems"]) and h,
                        VISIBLE, "the dead primary on /healthz")
    assert health["pbx"]["primary"]["up"] is False and health["pbx"]["secondary"]["up"] is True
    wait_until(lambda: Scrape(world.sidecar.metrics()).value("refuge_pbx_up", pbx="primary", host=host) == 0,
               VISIBLE, "refuge_pbx_up 0 for the primary")
    assert Scrape(world.sidecar.metrics()).value("refuge_pbx_up", pbx="secondary", host=SECONDARY_HOST) == 1
    wait_until(lambda: world.sidecar.json("/api/v1/posts")["pbx"]["primary"]["up"] is False, VISIBLE,
               "the dead primary in /api/v1/posts")
    [down] = wait_until(lambda: world.events("pbx.down", after=mark), VISIBLE, "pbx.down at the CCTV target")
    assert down["data"]["pbx"] == {"role": "primary", "host": host} and down["data"]["post"] is None
    assert world.receiver.rejected == 0 and world.receiver.malformed == []
