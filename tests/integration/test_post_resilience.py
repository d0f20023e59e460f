"""No packet can kill or wedge a post, a dead SIP stack is a visible fault that systemd fixes, and a dead call
ends (issue 8, findings 4 and 5), on both SIP backends against a real Asterisk 22.

The fuzzer sends its corpus (:func:`tests.support.hardening.fuzz_corpus`) twice: from the stranger (127.0.0.2)
and from the PBX's own address on another port, so the parsers, not only the source filter, get every
datagram. The dead PBX is a real ``kill -9`` of the real Asterisk. Posts run as ``sip-refuge post`` processes,
except where the test must reach into the running SIP stack to break it (in-process agent).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sip_refuge.config import Site
from sip_refuge.pbx.asterisk import Asterisk
from sip_refuge.post.systemd import Notifier
from tests.support.agent import AgentProcess, InProcessAgent, lights, wait_for
from tests.support.hardening import (
    BACKENDS,
    STRANGER,
    fuzz_corpus,
    hardening_site,
    kill_pbx,
    post_address,
    post_for,
)
from tests.support.queue_desk import answer_alarm, register_desk
from tests.support.sipua import SipPeer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    return hardening_site(tmp_path_factory.mktemp("resilience-site"))


@pytest.fixture(scope="module")
def pbx(site: Site) -> Iterator[Asterisk]:
    with Asterisk(site, command="pytest tests/integration/test_post_resilience.py", boot_timeout=60) as asterisk:
        yield asterisk


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def idle(agent: InProcessAgent | AgentProcess) -> None:
    agent.wait_status(lambda s: s["state"] == "idle" and s["registered"] and lights(s), 30, "idle and registered")


# -------------------------------------------------------------------------------------------------- fuzz

def test_no_datagram_wedges_the_post_and_a_press_still_reaches_the_desk(
        site: Site, running_pbx: Asterisk, desk: SipPeer, backend: str, tmp_path: Path) -> None:
    """Malformed, huge and random SIP from a stranger and from the PBX's address leave the post idle and registered; a press then reaches the desk."""
    post = post_for(site, backend, "after_alarm")
    with AgentProcess(site, post.id, tmp_path / "state") as agent:
        idle(agent)
        host, port = post_address(running_pbx, post.id)
        corpus = fuzz_corpus(post.id, host, port)
        for source in (STRANGER, site.pbx.host):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.bind((source, 0))
                for datagram in corpus:
                    sock.sendto(datagram, (host, port))
                    time.sleep(0.002)  # a stream, not one burst the kernel would drop part of
        if backend == "pyvoip":
            # Our own parser: every datagram of the stranger dropped unread, the PBX-address ones parsed or counted.
            status = agent.wait_status(lambda s: s["sip_counters"]["refused"] >= len(corpus)
                                       and s["sip_counters"]["malformed"] >= 30, 15, "the corpus counted")
        else:
            # pjsip parses (and drops what it cannot); the INVITEs it could read reach our Gate and are refused.
            status = agent.wait_status(lambda s: s["sip_counters"]["refused"] >= 2, 15, "refused INVITEs counted")
        assert status["sip_counters"]["errors"] == 0, f"a handler failed on fuzz input: {status['sip_counters']}"
        assert status["state"] == "idle" and status["registered"] and status["faults"] == [] and lights(status)
        assert agent.proc is not None and agent.proc.poll() is None

        agent.press()  # the post still works: a real queue call, answered by the desk robot
        ring = answer_alarm(agent, desk)
        ring.hangup()
        idle(agent)
        assert not agent.reports("call", event="incoming")  # nothing of the corpus ever looked like a call


# -------------------------------------------------------------------------------------------------- dead stack

def watchdog(tmp_path: Path) -> tuple[socket.socket, Notifier]:
    """A stand-in for systemd's notify socket, and a Notifier that pings it every 0.1 s of loop turns."""
    path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.setblocking(False)
    notifier = Notifier()
    notifier.address, notifier.interval = str(path), 0.1
    return listener, notifier


def pings(listener: socket.socket) -> int:
    """Watchdog pings received since the last call."""
    count = 0
    while True:
        try:
            count += listener.recv(64) == b"WATCHDOG=1"
        except BlockingIOError:
            return count


def wait_pings(listener: socket.socket, n: int, what: str) -> None:
    seen = [0]

    def enough() -> bool:
        seen[0] += pings(listener)
        return seen[0] >= n

    wait_for(enough, 10, what)


def test_a_dead_sip_thread_is_a_fault_and_starves_the_watchdog(
        site: Site, running_pbx: Asterisk, tmp_path: Path) -> None:
    """When the pyVoIP SIP thread dies, the post shows fault sip_stack (red) and stops pinging the systemd watchdog."""
    listener, notifier = watchdog(tmp_path)
    agent = InProcessAgent(site, post_for(site, "pyvoip", "after_alarm").id, tmp_path / "state")
    agent.runner.on_turn = notifier.alive
    try:
        with agent:
            idle(agent)
            wait_pings(listener, 2, "watchdog pings while healthy")

            def die() -> None:  # stands in for any error the thread's loop does not survive
                raise SystemExit("killed by the test")

            ua = agent.backend._ua  # type: ignore[attr-defined]
            ua.post(die)
            status = agent.wait_status(lambda s: "sip_stack" in s["faults"], 10, "fault sip_stack")
            assert status["state"] == "fault" and status["lights"]["red"] == "on"
            assert agent.reports("fault", fault="sip_stack", active=True) or wait_for(
                lambda: agent.reports("fault", fault="sip_stack", active=True), 10, "the fault in telemetry")
            pings(listener)  # what was sent before the fault was seen
            time.sleep(2.0)  # twenty ping intervals: a healthy loop turns at least twice in this time
            assert pings(listener) == 0, "the watchdog is still fed with a dead SIP stack"
            assert agent.status()["state"] == "fault"  # presses cannot revive it: only a restart does
    finally:
        listener.close()


def test_a_stalled_pjsua2_stack_is_a_fault_until_it_turns_again(
        site: Site, running_pbx: Asterisk, tmp_path: Path) -> None:
    """A pjsua2 owner thread stuck for seconds makes the post fault sip_stack and starves the watchdog; once it turns again the post is idle and pings resume."""
    listener, notifier = watchdog(tmp_path)
    agent = InProcessAgent(site, post_for(site, "pjsua2", "after_alarm").id, tmp_path / "state")
    agent.runner.on_turn = notifier.alive
    try:
        with agent:
            idle(agent)
            wait_pings(listener, 2, "watchdog pings while healthy")
            backend = agent.backend
            backend.stall_after = 1.0  # type: ignore[attr-defined]
            stuck = 6.0
            backend._submit(lambda: time.sleep(stuck))  # type: ignore[attr-defined]  # the owner thread blocks
            status = agent.wait_status(lambda s: "sip_stack" in s["faults"], 5, "fault sip_stack")
            assert status["state"] == "fault" and status["lights"]["red"] == "on"
            pings(listener)
            time.sleep(1.5)
            assert pings(listener) == 0, "the watchdog is still fed with a stuck SIP stack"
            idle(agent)  # it turns again: fault cleared, registered, lights off
            wait_pings(listener, 2, "watchdog pings again")
            assert agent.status()["faults"] == []
    finally:
        listener.close()


# -------------------------------------------------------------------------------------------------- dead call

@pytest.mark.parametrize("stage", ["queued", "connected"])
def test_pbx_killed_mid_call_is_seen_within_seconds_and_the_alarm_resent(
        site: Site, running_pbx: Asterisk, desk: SipPeer, backend: str, stage: str, tmp_path: Path) -> None:
    """After kill -9 of Asterisk during a queued or connected alarm call the post leaves the call (red, not green) and re-sends the same alarm once Asterisk is back."""
    post = post_for(site, backend, "after_alarm")
    with AgentProcess(site, post.id, tmp_path / "state") as agent:
        idle(agent)
        agent.press()
        ring = desk.wait_incoming(15)
        agent.wait_status(lambda s: s["state"] == "queued", 10, "queued")
        if stage == "connected":
            ring.answer()
            agent.wait_status(lambda s: s["state"] == "connected", 10, "connected")
        before = agent.status()

        kill_pbx(running_pbx)
        # Generous: the probe finds it in probe_interval + probe_timeout (9 s); the finding was 29 min.
        after = agent.wait_status(lambda s: s["state"] != stage, 30, f"the post leaving the dead {stage} call")
        assert after["state"] in ("fault", "calling"), after
        assert after["lights"]["green"] == "off" and after["lights"]["red"] == "on", after["lights"]
        assert round(after["alarm"]["since"], 1) == round(before["alarm"]["since"], 1)  # the same alarm, kept
        wait_for(lambda: agent.reports("call", event="lost", call=before["call"]["id"]), 10, "the lost call reported")

        agent.pause()  # Asterisk and the desk come back before the post's next attempt
        try:
            running_pbx.start()
            register_desk(desk, running_pbx, site)
            rung = len(desk.incoming)  # counted before the post may send: its INVITE can ring the desk at once
        finally:
            agent.resume()
        again = answer_alarm(agent, desk, index=rung)
        status = agent.status()
        assert round(status["alarm"]["since"], 1) == round(before["alarm"]["since"], 1)
        assert status["alarm"]["attempts"] >= 2
        again.hangup()
        idle(agent)
