"""The whole post agent (runner, machine, mock panel, control socket, SIP backend) against a real Asterisk 22.

Every test runs for both SIP backends. The desk is a raw SIP robot (:class:`tests.support.sipua.SipPeer`)
registered as desk-1; desk-2 stays unregistered, so the queue rings desk-1 alone. The agent runs in this
process when the test needs its SIP backend's DTMF hooks (one pjsua2 library per process: one such agent at
a time), and as ``sip-refuge post`` otherwise. Presses and status go through the control socket, as
``sip-refuge press`` / ``sip-refuge status`` do (and some tests run those commands themselves).
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sip_refuge.config import Site
from sip_refuge.pbx.asterisk import Asterisk
from tests.integration.conftest import LogMark
from tests.support.agent import AgentProcess, InProcessAgent, cli, cli_status, lights, wait_for
from tests.support.queue_desk import answer_alarm, register_desk
from tests.support.sipua import SipPeer
from tests.support.sites import POSTS, agent_site

pytestmark = pytest.mark.integration

OFF = {"yellow": "off", "green": "off", "red": "off"}




def display_name(header: str | None) -> str:
    m = re.match(r'\s*"([^"]*)"', header or "")
    return m.group(1) if m else ""


def contact_of(pbx: Asterisk, endpoint: str) -> bool:
    """Asterisk holds a registered contact for ``endpoint`` (reachable, or not yet qualified)."""
    out = pbx.cli(f"pjsip show contacts like {endpoint}")
    return any(line.strip().startswith(f"Contact:  {endpoint}/") and ("Avail" in line or "Unknown" in line)
               for line in out.splitlines())


def post_channels(pbx: Asterisk, post_id: str) -> list[str]:
    """Asterisk's channels from or to the post right now."""
    return [line for line in pbx.cli("core show channels concise").splitlines() if line.startswith(f"PJSIP/{post_id}-")]


# ----------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    return agent_site(tmp_path_factory.mktemp("agent-site"))


@pytest.fixture(scope="module")
def pbx(site: Site) -> Iterator[Asterisk]:
    with Asterisk(site, command="pytest tests/integration/test_post_agent.py", boot_timeout=60) as asterisk:
        yield asterisk


@pytest.fixture(scope="module", params=sorted(POSTS))
def backend(request: pytest.FixtureRequest) -> str:
    """The SIP backend under test (module scope: pytest runs all of one backend's tests, then the other's)."""
    name: str = request.param
    return name


@pytest.fixture
def post_id(backend: str) -> str:
    return POSTS[backend]


def ready(agent: InProcessAgent | AgentProcess) -> None:
    agent.wait_status(lambda s: s["state"] == "idle" and s["registered"] is True and lights(s), 30,
                      "idle, registered, all lights off")


@pytest.fixture
def agent(site: Site, post_id: str, running_pbx: Asterisk, tmp_path: Path) -> Iterator[InProcessAgent]:
    """The post's agent in this process (its SIP backend reachable), idle and registered."""
    with InProcessAgent(site, post_id, tmp_path / "state") as running:
        ready(running)
        yield running


@pytest.fixture
def agent_process(site: Site, post_id: str, running_pbx: Asterisk, tmp_path: Path) -> Iterator[AgentProcess]:
    """``sip-refuge post SITE --post ID --gpio mock --state-dir DIR`` as a child process, idle and registered."""
    with AgentProcess(site, post_id, tmp_path / "state") as running:
        ready(running)
        yield running


# ----------------------------------------------------------------------------------------------- tests

def test_press_rings_desk_then_connects_with_audio_both_ways(
        site: Site, desk: SipPeer, agent: InProcessAgent) -> None:
    """A press rings the desk with the post's name, queues (yellow), connects on answer (green), carries DTMF both ways, ends idle."""
    post = agent.post
    agent.hear_dtmf()

    assert "pressed" in cli(site, "press", post.id)
    ring = desk.wait_incoming(15)
    assert display_name(ring.invite.header("from")) == post.name
    assert display_name(ring.invite.header("p-asserted-identity")) == post.name

    # Nobody has answered: the PBX holds the alarm, and `sip-refuge status` says so.
    agent.wait_state("queued")
    queued = cli_status(site, post.id)
    assert queued["state"] == "queued" and queued["registered"] is True
    assert queued["lights"] == {"yellow": "on", "green": "off", "red": "off"}
    assert queued["call"]["target"] == "queue" and queued["call"]["answered_at"] is None
    call_id = queued["call"]["id"]

    ring.answer()
    agent.wait_state("connected")
    connected = cli_status(site, post.id)
    assert connected["lights"] == {"yellow": "on", "green": "on", "red": "off"}
    assert connected["call"]["id"] == call_id and connected["call"]["answered_at"] is not None

    # Post -> desk: the post's RFC 4733 digit crosses Asterisk's bridge to the desk robot.
    desk.wait_for(lambda: ring.rtp.packets >= 10 or None, 10, "the post's RTP at the desk")
    agent.send_dtmf(call_id, "5")
    desk.wait_for(lambda: "5" in ring.rtp.digits or None, 10, f"DTMF 5 from the post (got {ring.rtp.digits})")
    # Desk -> post: once the robot sends media, Asterisk relays its digit to the post's backend.
    ring.rtp.send_silence(3)
    ring.rtp.send_dtmf("7")
    assert agent.wait_dtmf("7", 10) == call_id, f"no DTMF 7 from the desk reached the post (heard {agent.heard})"
    assert agent.heard == [(call_id, "7")]

    ring.hangup()
    ended = agent.wait_status(lambda s: s["state"] == "idle" and lights(s), 10, "idle, lights off")
    assert ended["call"] is None and ended["alarm"] is None and ended["faults"] == []
    assert cli_status(site, post.id)["state"] == "idle"


def test_unanswered_alarm_reaches_the_overflow(
        site: Site, running_pbx: Asterisk, desk: SipPeer, agent: InProcessAgent) -> None:
    """An alarm no desk answers overflows after queue.max_wait: the overflow route answers and the post is connected to it."""
    post = agent.post
    agent.hear_dtmf()
    mark = LogMark(running_pbx.messages_log)

    agent.press()
    ring = desk.wait_incoming(15)  # desk-1 rings; nobody answers
    agent.wait_status(lambda s: s["state"] == "queued" and lights(s, yellow="on"), 10, "queued, yellow on")
    status = agent.wait_status(lambda s: s["state"] == "connected", site.queue.max_wait + 15,
                               "connected to the overflow")
    assert lights(status, yellow="on", green="on")
    ring.wait_state("cancelled", 10)  # the desk stopped ringing: it did not answer, the overflow did
    def overflow_logged() -> str | None:
        text = mark.text()
        return text if f"{site.queue.overflow}@refuge-overflow-route" in text else None

    log = wait_for(overflow_logged, 10, "the overflow route in Asterisk's log")
    assert f"alarm from post {post.id} not answered" in log and f"overflow to {site.queue.overflow}" in log

    # The sandbox's overflow route echoes: the post's digit comes back, so the post really talks to it.
    call_id = status["call"]["id"]

    def echo_back() -> bool:
        agent.send_dtmf(call_id, "4")  # again until heard: digits sent during the route's beep are lost
        return bool(agent.wait_dtmf("4", 1.0) == call_id)

    wait_for(echo_back, 15, "DTMF echoed by the overflow route")

    running_pbx.cli("channel request hangup all")  # the overflow ends the call
    agent.wait_status(lambda s: s["state"] == "idle" and lights(s), 10, "idle after the overflow hung up")


def test_press_while_asterisk_is_down_retries_until_the_desk_answers(
        site: Site, running_pbx: Asterisk, desk: SipPeer, agent_process: AgentProcess) -> None:
    """A press with Asterisk stopped shows fault (red) and keeps re-sending; once Asterisk is back the same alarm rings the desk and connects."""
    agent = agent_process
    running_pbx.stop()
    cli(site, "press", agent.post.id)
    fault = agent.wait_status(lambda s: s["state"] == "fault" and lights(s, red="on"), 60, "fault, red on")
    alarm_since = fault["alarm"]["since"]
    agent.wait_status(lambda s: s["alarm"]["attempts"] >= 2 and lights(s, red="on"), 60, "a retry, red still on")

    # Freeze the post while Asterisk starts and the desk registers again. Otherwise a retry (or the post's
    # re-registration, which re-sends the alarm at once) can reach the queue before desk-1 is back in it;
    # the queue, with no desk, would hand the alarm straight to the overflow route.
    agent.pause()
    try:
        running_pbx.start()
        register_desk(desk, running_pbx, site)
    finally:
        agent.resume()

    ring = answer_alarm(agent, desk)
    assert display_name(ring.invite.header("from")) == agent.post.name
    connected = agent.status()
    # The alarm's start, mapped to wall time each time status is read (a few microseconds of jitter).
    assert abs(connected["alarm"]["since"] - alarm_since) < 0.01, "a new alarm: the old one was not re-sent"
    assert connected["alarm"]["attempts"] >= 2
    dials = agent.reports("call", event="dial", target="queue")
    assert len(dials) == connected["alarm"]["attempts"]
    # One alarm at the desk. An attempt that the returning PBX let in just as the post gave it up (after the
    # freeze both timers are due at once) rings for milliseconds and is cancelled: that is not a second alarm.
    assert len([c for c in desk.incoming if c.state != "cancelled"]) == 1, [c.state for c in desk.incoming]

    ring.hangup()
    agent.wait_status(lambda s: s["state"] == "idle" and lights(s), 10, "idle after the desk hung up")


def test_reregisters_within_30s_after_asterisk_restarts(
        site: Site, running_pbx: Asterisk, agent_process: AgentProcess) -> None:
    """An idle post is registered again within 30 s after Asterisk restarts having forgotten every contact."""
    agent = agent_process
    post_id = agent.post.id
    wait_for(lambda: contact_of(running_pbx, post_id), 10, f"{post_id}'s contact before the restart")
    running_pbx.stop()
    shutil.rmtree(running_pbx.dir / "db", ignore_errors=True)  # a fresh astdb: the PBX has no contact at all
    running_pbx.start()
    assert not contact_of(running_pbx, post_id)

    wait_for(lambda: contact_of(running_pbx, post_id), 30, f"{post_id}'s contact after the restart")
    status = agent.wait_status(lambda s: s["state"] == "idle" and s["registered"] is True and lights(s), 5,
                               "idle and registered after the restart")
    assert status["faults"] == []


def test_callback_inside_the_window_after_an_alarm_is_auto_answered(
        site: Site, desk: SipPeer, agent: InProcessAgent) -> None:
    """Right after an alarm call, a desk calling the post back is answered by the post without a press."""
    post = agent.post
    agent.press()
    answer_alarm(agent, desk).hangup()
    agent.wait_status(lambda s: s["state"] == "idle" and lights(s), 10, "idle after the alarm call")

    call = desk.call(post.extension)
    status = agent.wait_status(lambda s: s["state"] == "connected", 10, "connected to the call-back")
    assert status["call"]["direction"] == "in" and status["call"]["target"] == "callback"
    assert lights(status, green="on")
    assert call.wait_final(10).code == 200

    call.hangup()
    agent.wait_status(lambda s: s["state"] == "idle" and lights(s), 10, "idle after the call-back")


def test_callback_outside_the_window_rings_until_pressed(
        site: Site, desk: SipPeer, agent: InProcessAgent) -> None:
    """With no recent alarm (auto_answer after_alarm), a call-back rings the post and only a press answers it."""
    post = agent.post
    assert post.auto_answer == "after_alarm"
    call = desk.call(post.extension)
    ringing = agent.wait_status(lambda s: s["state"] == "ringing", 10, "ringing")
    assert lights(ringing, green="blink")
    assert ringing["call"]["direction"] == "in" and ringing["call"]["answered_at"] is None
    assert call.final is None, f"the call-back was answered without a press: {call.final}"
    assert agent.reports("call", event="answered") == []

    cli(site, "press", post.id)
    assert call.wait_final(10).code == 200
    connected = agent.wait_status(lambda s: s["state"] == "connected", 10, "connected after the press")
    assert lights(connected, green="on")
    assert connected["alarm"] is None  # the press answered the call; it raised no alarm

    call.hangup()
    agent.wait_status(lambda s: s["state"] == "idle" and lights(s), 10, "idle after the call-back")
    assert desk.invites() == []


def test_press_during_a_self_test_aborts_it_and_calls_at_once(
        site: Site, running_pbx: Asterisk, desk: SipPeer, agent: InProcessAgent) -> None:
    """A press while the self-test call is up hangs the test call up and places the alarm call at once (the desk rings)."""
    post_id = agent.post.id
    agent.selftest()
    testing = agent.wait_status(lambda s: s["state"] == "selftest", 10, "self-test call")
    test_call = testing["call"]["id"]
    agent.press()

    ring = desk.wait_incoming(15)
    status = agent.wait_status(lambda s: s["state"] == "queued", 10, "queued")
    assert status["call"]["target"] == "queue" and status["call"]["id"] != test_call
    assert status["last_self_test"] is None, "the self-test ran to a verdict instead of being aborted"
    # The telemetry sender writes its outbox on its own thread, a moment after the machine's report.
    wait_for(lambda: agent.reports("selftest", result="aborted", call=test_call), 5, "the self-test's aborted report")
    # Only the alarm call is left at the PBX: the self-test call was hung up.
    wait_for(lambda: len(post_channels(running_pbx, post_id)) == 1, 10, "one channel from the post")

    ring.answer()
    agent.wait_state("connected")
    ring.hangup()
    agent.wait_status(lambda s: s["state"] == "idle" and lights(s), 10, "idle")


def test_fifty_presses_in_one_second_make_one_call(
        site: Site, running_pbx: Asterisk, desk: SipPeer, agent_process: AgentProcess) -> None:
    """Fifty presses within one second place exactly one call: one INVITE at the desk, one channel at the PBX."""
    agent = agent_process
    post_id = agent.post.id
    start = time.monotonic()
    for n in range(50):
        agent.press()
        time.sleep(max(0.0, start + (n + 1) * 0.02 - time.monotonic()))  # paced: 50 presses over one second

    ring = answer_alarm(agent, desk)
    wait_for(lambda: len(post_channels(running_pbx, post_id)) == 1, 10, "one channel from the post")
    assert len(desk.invites()) == 1
    status = agent.status()
    assert status["alarm"]["attempts"] == 1
    assert len(agent.reports("call", event="dial")) == 1

    ring.hangup()
    agent.wait_status(lambda s: s["state"] == "idle" and lights(s), 10, "idle")
    assert len(desk.invites()) == 1
    assert len(agent.reports("call", event="dial")) == 1
