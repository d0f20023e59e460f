"""A post answers only its PBX (issue 8, findings 1-3), tried from the attacker's side, on both SIP backends.

The attacker is a raw SIP phone at another loopback address (127.0.0.2) with no credentials. It sends the
best INVITE it can: straight at the post's SIP port, with the Request-URI of the contact the post registered
(read from Asterisk, as anyone on the path could) and an SDP asking for the post's media. For every
auto-answer policy, on both backends, it tries in every state: idle (also inside the after-alarm window),
while a genuine call-back rings or is up, in an alarm call, and while the post waits to re-send an alarm
with the PBX down. Each time the stranger gets 403 or nothing, no RTP, the post's state and alarm stay as
they were, the refusal is counted, and the genuine path (call-back, alarm to the desk) still works.

Posts run as ``sip-refuge post`` processes (mock GPIO); the desk is a raw SIP robot registered as desk-1.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sip_refuge.config import Site
from sip_refuge.pbx.asterisk import Asterisk
from tests.support.agent import AgentProcess, InProcessAgent, Status, cli, lights, wait_for
from tests.support.hardening import (
    POLICIES,
    STRANGER,
    hardening_site,
    post_address,
    post_for,
)
from tests.support.queue_desk import answer_alarm, register_desk
from tests.support.sipua import OutgoingCall, SipPeer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    return hardening_site(tmp_path_factory.mktemp("strangers-site"))


@pytest.fixture(scope="module")
def pbx(site: Site) -> Iterator[Asterisk]:
    with Asterisk(site, command="pytest tests/integration/test_post_strangers.py", boot_timeout=60) as asterisk:
        yield asterisk


class Stranger:
    """The attacker: a raw SIP phone at 127.0.0.2 calling the post's registered contact directly."""

    def __init__(self, address: tuple[str, int], post_id: str) -> None:
        self.peer = SipPeer("mallory", "", address, host=STRANGER)
        self.uri = f"sip:{post_id}@{address[0]}:{address[1]}"
        self.calls: list[OutgoingCall] = []

    def close(self) -> None:
        self.peer.close()

    def try_call(self, agent: AgentProcess, where: str) -> None:
        """One INVITE; it must be refused (403) or dropped, bring no RTP, change nothing and be counted."""
        before = agent.status()
        call = self.peer.call("", uri=self.uri)
        self.calls.append(call)
        try:
            call.wait_final(1.0)
        except TimeoutError:
            pass  # dropped unanswered: fine
        assert call.final is None or call.final.code == 403, f"{where}: the stranger got {call.final}"
        # Whatever answered would send RTP within milliseconds; give it a generous second more.
        wait_for(lambda: agent.status()["sip_counters"]["refused"] > before["sip_counters"]["refused"], 5,
                 f"{where}: the refusal counted")
        after = agent.status()
        assert call.rtp.packets == 0, f"{where}: {call.rtp.packets} RTP packets reached the stranger"
        assert same_post(before, after), f"{where}: the stranger changed the post: {before} -> {after}"


def same_post(before: Status, after: Status) -> bool:
    """State, call and alarm as they were. While an alarm waits to be re-sent, its own retries go on (fault
    <-> calling, new outgoing attempts): then the same alarm, and no incoming call, is what must hold."""
    def alarm_since(s: Status) -> object:
        return round((s["alarm"] or {}).get("since") or 0.0, 1)  # wall-mapped: microseconds of jitter

    if alarm_since(before) != alarm_since(after):
        return False
    if before["state"] == "fault" and before["alarm"] is not None:
        return after["state"] in ("fault", "calling") and (after["call"] or {}).get("direction") in (None, "out") \
            and after["lights"]["green"] == "off"
    return (before["state"] == after["state"] and (before["call"] or {}).get("id") == (after["call"] or {}).get("id")
            and before["lights"] == after["lights"])


@pytest.fixture(params=[(backend, policy) for backend in ("pjsua2", "pyvoip") for policy in POLICIES],
                ids=lambda p: f"{p[0]}-{p[1]}")
def case(request: pytest.FixtureRequest) -> tuple[str, str]:
    value: tuple[str, str] = request.param
    return value


def test_stranger_is_refused_in_every_state_and_the_pbx_path_still_works(
        site: Site, running_pbx: Asterisk, desk: SipPeer, case: tuple[str, str], tmp_path: Path) -> None:
    """A stranger's INVITE is refused (403/nothing, no RTP, nothing changes) idle, ringing, in calls and while re-sending, for each policy."""
    backend, policy = case
    post = post_for(site, backend, policy)
    with AgentProcess(site, post.id, tmp_path / "state") as agent:
        agent.wait_status(lambda s: s["state"] == "idle" and s["registered"] and lights(s), 30, "idle")
        stranger = Stranger(post_address(running_pbx, post.id), post.id)
        try:
            # Idle, in standby.
            stranger.try_call(agent, "idle")

            # A genuine call-back from the desk, through the PBX.
            callback = desk.call(post.extension)
            if policy == "always":
                agent.wait_status(lambda s: s["state"] == "connected", 10, "call-back answered by policy")
            else:
                agent.wait_status(lambda s: s["state"] == "ringing", 10, "call-back ringing")
                stranger.try_call(agent, "ringing")
                cli(site, "press", post.id)  # a press answers the genuine one
            assert callback.wait_final(10).code == 200
            agent.wait_status(lambda s: s["state"] == "connected" and s["call"]["direction"] == "in", 10,
                              "connected to the call-back")
            stranger.try_call(agent, "in a call-back")
            callback.hangup()
            agent.wait_status(lambda s: s["state"] == "idle" and lights(s), 10, "idle after the call-back")

            # An alarm call, then idle inside the after-alarm window (finding 1: that is when it listened).
            agent.press()
            ring = answer_alarm(agent, desk)
            stranger.try_call(agent, "in an alarm call")
            ring.hangup()
            agent.wait_status(lambda s: s["state"] == "idle" and lights(s), 10, "idle after the alarm")
            stranger.try_call(agent, "idle inside the auto-answer window")
            auto = desk.call(post.extension)  # the genuine call-back inside the window follows the policy
            if policy == "never":
                agent.wait_status(lambda s: s["state"] == "ringing", 10, "ringing (never)")
                auto.hangup()
            else:
                assert auto.wait_final(10).code == 200
                auto.hangup()
            agent.wait_status(lambda s: s["state"] == "idle" and lights(s), 10, "idle again")

            # Waiting to re-send: the PBX is down after a press (finding 3: the stranger cancelled the alarm).
            running_pbx.stop()
            agent.press()
            waiting = agent.wait_status(lambda s: s["state"] == "fault" and s["alarm"] is not None
                                        and s["call"] is None, 60, "waiting to re-send")
            stranger.try_call(agent, "waiting to re-send")
            agent.pause()  # the PBX and the desk come back before the next attempt goes out
            try:
                running_pbx.start()
                register_desk(desk, running_pbx, site)
                rung = len(desk.incoming)  # counted before the post may send: its INVITE can ring the desk at once
            finally:
                agent.resume()
            ring = answer_alarm(agent, desk, index=rung)
            resent = agent.status()
            assert round(resent["alarm"]["since"], 1) == round(waiting["alarm"]["since"], 1), "the alarm was lost"
            ring.hangup()
            agent.wait_status(lambda s: s["state"] == "idle" and lights(s), 10, "idle at the end")
            assert not agent.reports("call", event="incoming", caller="mallory")
        finally:
            stranger.close()


def test_stranger_rtp_is_dropped_by_the_pyvoip_post(
        site: Site, running_pbx: Asterisk, desk: SipPeer, tmp_path: Path) -> None:
    """RTP sprayed at a pyVoIP post's media port by a stranger is dropped and counted; the call's media goes on."""
    post = post_for(site, "pyvoip", "after_alarm")
    with InProcessAgent(site, post.id, tmp_path / "state") as agent:
        agent.wait_status(lambda s: s["state"] == "idle" and s["registered"], 30, "idle")
        agent.hear_dtmf()
        agent.press()
        ring = answer_alarm(agent, desk)
        call_id = agent.status()["call"]["id"]
        backend = agent.backend
        media_port = backend._calls[call_id].rtp.port  # type: ignore[attr-defined]
        host = post_address(running_pbx, post.id)[0]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as spray:
            spray.bind((STRANGER, 0))
            for n in range(50):  # RFC 4733 "9" (end of event), a new event each time
                spray.sendto(bytes([0x80, 101, 0, n, 0, 0, 1, n, 1, 2, 3, 4, 9, 0x8A, 0, 160]), (host, media_port))
        wait_for(lambda: agent.status()["sip_counters"]["rtp_refused"] >= 50, 5, "50 RTP packets refused")
        assert agent.wait_dtmf("9", 0.5) is None, "the stranger's DTMF reached the post"
        ring.rtp.send_silence(3)
        ring.rtp.send_dtmf("7")
        assert agent.wait_dtmf("7", 10) == call_id  # the desk's media still gets through
        ring.hangup()
        agent.wait_status(lambda s: s["state"] == "idle", 10, "idle")


def test_invites_from_the_pbx_not_through_the_registration_are_refused(
        site: Site, running_pbx: Asterisk, tmp_path: Path) -> None:
    """From the PBX's own address, an INVITE not aimed at the registered contact, or asking for media elsewhere, gets 403 on both backends."""
    for backend in ("pjsua2", "pyvoip"):
        post = post_for(site, backend, "always")
        with AgentProcess(site, post.id, tmp_path / backend) as agent:
            agent.wait_status(lambda s: s["state"] == "idle" and s["registered"], 30, "idle")
            host, port = post_address(running_pbx, post.id)
            contact = f"sip:{post.id}@{host}:{port}"
            # The PBX's address (127.0.0.1 here) on another port: the Gate decides, not the source filter.
            with SipPeer("impostor", "", (host, port), host=site.pbx.host) as impostor:
                refused = [impostor.call("", uri=f"sip:someone-else@{host}:{port}"),  # not the post's contact
                           impostor.call("", uri=f"sip:{post.id}@{host}:{port + 1}"),  # not its address
                           impostor.call("", uri=contact, media_host=STRANGER)]  # media to the stranger
                for call in refused:
                    assert call.wait_final(5).code == 403, (backend, call.uri, call.codes)
                assert all(call.rtp.packets == 0 for call in refused)
            status = agent.wait_status(lambda s: s["sip_counters"]["refused"] >= 3, 5, "three refusals counted")
            assert status["state"] == "idle" and status["call"] is None and lights(status)
            assert not agent.reports("call", event="incoming")


def test_stranger_rtp_cannot_take_a_pjsua2_posts_microphone(
        site: Site, running_pbx: Asterisk, desk: SipPeer, tmp_path: Path) -> None:
    """RTP sprayed at a pjsua2 post's media port never makes it send its microphone to the stranger (no latching)."""
    post = post_for(site, "pjsua2", "after_alarm")
    with InProcessAgent(site, post.id, tmp_path / "state") as agent:
        agent.wait_status(lambda s: s["state"] == "idle" and s["registered"], 30, "idle")
        agent.hear_dtmf()
        agent.press()
        ring = answer_alarm(agent, desk)
        call_id = agent.status()["call"]["id"]
        host, port = pjsua2_rtp_address(agent, call_id).rsplit(":", 1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as spray:
            spray.bind((STRANGER, 0))
            spray.settimeout(0.2)
            # Valid PCMU frames with a steady SSRC and rising sequence numbers: what pjmedia would latch onto.
            for n in range(200):
                header = bytes([0x80, 0, n >> 8, n & 0xFF]) + (n * 160).to_bytes(4, "big") + b"\x0b\xad\xf0\x0d"
                spray.sendto(header + b"\xff" * 160, (host, int(port)))
            received = 0
            for _ in range(15):  # 3 s: the post sends 50 frames a second to whoever it latched onto
                try:
                    spray.recv(2048)
                    received += 1
                except TimeoutError:
                    pass
        assert received == 0, f"the post sent {received} RTP packets to the stranger"
        agent.send_dtmf(call_id, "5")
        wait_for(lambda: "5" in ring.rtp.digits, 10, "the post's DTMF at the desk (its media still goes there)")
        ring.hangup()
        agent.wait_status(lambda s: s["state"] == "idle", 10, "idle")


def pjsua2_rtp_address(agent: InProcessAgent, call_id: str) -> str:
    """``ip:port`` of a pjsua2 call's local RTP socket, read on the backend's owner thread (pjsua allows no other)."""
    backend: Any = agent.backend
    found: list[str] = []
    done = threading.Event()

    def read() -> None:
        try:
            info = backend._calls[call_id].call.getMedTransportInfo(0)
            found.append(str(info.localRtpName))
        finally:
            done.set()

    backend._submit(read)
    assert done.wait(5), "the pjsua2 owner thread did not run the look-up"
    return found[0]
