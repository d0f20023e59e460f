"""No single PBX between a caller and help (issue 12): a post on a real PBX pair reaches a desk through the
secondary Asterisk when the primary is ``kill -9``-ed while idle, while the desk rings, or mid-conversation, and
goes back to the primary once it runs again; on both SIP backends.

The pair is two real Asterisk 22 processes rendered from one site file (the primary on 127.0.0.1, the secondary on
127.0.0.2, the same ports). The desk is a SIP robot registered with both, as a desk phone with two accounts is.
Posts run as ``sip-refuge post`` processes. The promise "a desk rings within 30 s of the press" is each wait's
timeout; the figures are measured by ``bench/failover.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from sip_refuge.config import Site
from tests.support.agent import AgentProcess, Status
from tests.support.desk_robot import DeskRobot, Ring
from tests.support.pair import SECONDARY_HOST, Pair, pair_site, pbx_of
from tests.support.sites import POSTS

pytestmark = pytest.mark.integration

PROMISE = 30.0  # a desk rings within this of the press (Code Blue, ASME A17.1), whatever PBX died
BACKENDS = ("pjsua2", "pyvoip")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    return pair_site(tmp_path_factory.mktemp("failover-site"))


@pytest.fixture(scope="module")
def pair(site: Site) -> Iterator[Pair]:
    with Pair(site, "pytest tests/integration/test_failover.py") as both:
        yield both


@pytest.fixture
def desk(pair: Pair) -> Iterator[DeskRobot]:
    pair.ensure_running()
    with pair.desk() as robot:
        robot.wait_registered(count=2)
        pair.wait_desk_ready()
        yield robot


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def both_registered(site: Site) -> dict[str, bool]:
    return {site.pbx.host: True, SECONDARY_HOST: True}


@contextmanager
def start_idle(site: Site, pair: Pair, backend: str, state: Path) -> Iterator[AgentProcess]:
    """The post of ``backend`` as a process, idle and registered with both PBXs."""
    with AgentProcess(site, POSTS[backend], state) as agent:
        agent.wait_status(lambda s: s["state"] == "idle" and s["registrations"] == both_registered(site), 30,
                          "idle and registered with both PBXs")
        pair.wait_post_registered(agent.post.id)
        yield agent


def ring_via(desk: DeskRobot, site: Site, index: int, pbx: str) -> Ring:
    ring = desk.wait_ring(PROMISE, index=index)
    assert pbx_of(ring.call.dest, site) == pbx, f"ring #{index} came from {ring.call.dest}, not the {pbx}"
    return ring


def connected(agent: AgentProcess) -> Status:
    return agent.wait_status(lambda s: s["state"] == "connected", 15, "connected")


def test_primary_killed_while_idle_a_press_reaches_a_desk_through_the_secondary(
        site: Site, pair: Pair, desk: DeskRobot, backend: str, tmp_path: Path) -> None:
    """With the primary kill -9-ed while the post is idle, a press rings the desk through the secondary and connects."""
    with start_idle(site, pair, backend, tmp_path / "state") as agent:
        pair.kill_primary()
        agent.press()
        ring = ring_via(desk, site, 0, "secondary")
        desk.answer(ring)
        status = connected(agent)
        assert status["call"]["host"] == SECONDARY_HOST
        desk.hangup(ring)
        agent.wait_status(lambda s: s["state"] == "idle" and s["registered"], 15, "idle again on the secondary")


def test_primary_killed_while_the_desk_rings_the_same_alarm_reaches_it_through_the_secondary(
        site: Site, pair: Pair, desk: DeskRobot, backend: str, tmp_path: Path) -> None:
    """Kill -9 of the primary while its queue rings the desk: the same alarm rings it again through the secondary, no second press."""
    with start_idle(site, pair, backend, tmp_path / "state") as agent:
        agent.press()
        ring_via(desk, site, 0, "primary")
        before = agent.wait_status(lambda s: s["state"] == "queued", 10, "queued on the primary")
        pair.kill_primary()
        again = ring_via(desk, site, 1, "secondary")
        desk.answer(again)
        status = connected(agent)
        assert round(status["alarm"]["since"], 1) == round(before["alarm"]["since"], 1)  # the same alarm
        assert status["alarm"]["attempts"] >= 2 and status["call"]["host"] == SECONDARY_HOST
        desk.hangup(again)


def test_primary_killed_mid_conversation_the_post_redials_and_the_operator_is_connected_again(
        site: Site, pair: Pair, desk: DeskRobot, backend: str, tmp_path: Path) -> None:
    """Kill -9 of the primary during an answered alarm call: the post re-dials through the secondary and a desk is connected again."""
    with start_idle(site, pair, backend, tmp_path / "state") as agent:
        agent.press()
        first = ring_via(desk, site, 0, "primary")
        desk.answer(first)
        before = connected(agent)
        pair.kill_primary()
        again = ring_via(desk, site, 1, "secondary")
        desk.answer(again)
        status = connected(agent)
        assert round(status["alarm"]["since"], 1) == round(before["alarm"]["since"], 1)
        assert agent.reports("call", event="lost", call=before["call"]["id"])
        desk.hangup(again)


def test_a_restarted_primary_takes_the_posts_back(
        site: Site, pair: Pair, desk: DeskRobot, backend: str, tmp_path: Path) -> None:
    """After the primary died and came back, the post registers with it again and its next alarm goes through it."""
    with start_idle(site, pair, backend, tmp_path / "state") as agent:
        pair.kill_primary()
        agent.wait_status(lambda s: s["registrations"][site.pbx.host] is False and s["state"] == "idle", 30,
                          "the primary seen gone, the post still idle")
        pair.primary.start()
        agent.wait_status(lambda s: s["registrations"] == both_registered(site), 30, "registered with both again")
        desk.wait_registered(count=3)
        pair.wait_desk_ready()
        agent.press()
        ring = ring_via(desk, site, 0, "primary")
        desk.answer(ring)
        connected(agent)
        desk.hangup(ring)
