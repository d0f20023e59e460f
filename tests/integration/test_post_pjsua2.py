"""The pjsua2 SIP backend against a real Asterisk 22 on loopback, with raw-SIP desk robots (tests/support/sipua).

pjsua2's Endpoint is one per process, so the tests use one backend at a time; each test starts and stops it.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from sip_refuge.config.loader import load_site
from sip_refuge.config.model import Site
from sip_refuge.config.secrets import init_secrets
from sip_refuge.pbx.asterisk import Asterisk
from sip_refuge.post import events as ev
from sip_refuge.post.sip import Account
from sip_refuge.post.sip.pjsua2 import Backend
from tests.support.audio import chirp_found
from tests.support.sipua import IncomingCall, SipPeer

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]
POST = "market-place"  # the demo site's pjsua2 post
E = TypeVar("E")


def _free_port(kind: socket.SocketKind) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_site(folder: Path) -> Site:
    """The demo site with fresh secrets and free loopback ports, so tests run beside other Asterisks."""
    folder.mkdir(parents=True, exist_ok=True)
    rtp = 20000 + 200 * secrets.randbelow(200)
    text = (ROOT / "config" / "demo.yaml").read_text(encoding="utf-8")
    text = (text.replace("sip_port: 5160", f"sip_port: {_free_port(socket.SOCK_DGRAM)}")
            .replace("port: 5139", f"port: {_free_port(socket.SOCK_STREAM)}")
            .replace("rtp_start: 31000", f"rtp_start: {rtp}").replace("rtp_end: 31999", f"rtp_end: {rtp + 199}"))
    path = folder / "site.yaml"
    path.write_text(text, encoding="utf-8")
    init_secrets(load_site(path, check_secrets=False))
    return load_site(path)


class Events:
    """The backend's emit target: a queue that tests wait on, keeping everything seen."""

    def __init__(self) -> None:
        self.queue: queue.Queue[ev.Event] = queue.Queue()
        self.seen: list[tuple[float, ev.Event]] = []
        self.emitted: list[tuple[float, ev.Event]] = []  # (time.monotonic() of emit, event)

    def emit(self, event: ev.Event) -> None:
        self.emitted.append((time.monotonic(), event))
        self.queue.put(event)

    def wait(self, kind: type[E], timeout: float = 10.0, where: Callable[[E], bool] = lambda e: True) -> E:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {kind.__name__} within {timeout} s; saw {[e for _, e in self.seen]}")
            try:
                event = self.queue.get(timeout=remaining)
            except queue.Empty:
                continue
            self.seen.append((time.monotonic(), event))
            if isinstance(event, kind) and where(event):
                return event

    def kinds(self, call_id: str) -> list[str]:
        return [type(e).__name__ for _, e in self.seen if getattr(e, "call_id", None) == call_id]


def wait_until(probe: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.1)


def contact_of(ast: Asterisk, endpoint: str) -> bool:
    """Whether Asterisk holds a registered contact for ``endpoint``, and sees it reachable or unknown."""
    out = ast.cli(f"pjsip show contacts like {endpoint}")
    return any(line.strip().startswith(f"Contact:  {endpoint}/") and ("Avail" in line or "Unknown" in line)
               for line in out.splitlines())


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    return make_site(tmp_path_factory.mktemp("pjsua2-site"))


@pytest.fixture(scope="module")
def pbx(site: Site) -> Iterator[Asterisk]:
    with Asterisk(site) as ast:
        yield ast


@pytest.fixture
def events() -> Events:
    return Events()


def start_backend(site: Site, events: Events, **options: Any) -> Backend:
    post = site.post(POST)
    backend = Backend(bind_address="127.0.0.1", **options)
    backend.start(Account(post, site.pbx, post.secret.read()), events.emit)
    return backend


@pytest.fixture
def post(site: Site, pbx: Asterisk, events: Events) -> Iterator[Backend]:
    backend = start_backend(site, events)
    try:
        events.wait(ev.Registered)
        yield backend
    finally:
        backend.stop()


@pytest.fixture
def desk(site: Site, pbx: Asterisk) -> Iterator[SipPeer]:
    d = site.desk("desk-1")
    with SipPeer(d.id, d.secret.read(), (site.pbx.host, site.pbx.sip_port), display=d.name) as peer:
        assert peer.register(expires=120).code == 200
        # The queue lets nobody join while its only desk is "unknown": wait until the queue sees it free.
        wait_until(lambda: "(Not in use)" in pbx.cli(f"queue show {site.queue.name}"), 10, "desk-1 free in the queue")
        yield peer
        peer.register(expires=0)


def answer(desk: SipPeer, call: IncomingCall) -> None:
    """The robot's answer, with the state set before the 200 goes out: on loopback Asterisk's ACK can
    arrive before ``IncomingCall.answer`` marks the call answered, and that ACK would be ignored."""
    with desk.lock:
        call.state = "answered"
    desk.respond(call.invite, call.source, 200, "OK", tag=call.dialog.local_tag, body=call.rtp.sdp(int(time.time())))
    desk.wait_for(lambda: call.state == "confirmed" or None, 5, "ACK to the desk's 200 OK")


def test_registers_with_asterisk(post: Backend, pbx: Asterisk) -> None:
    """The post registers with its id and secret, and Asterisk lists its contact."""
    wait_until(lambda: contact_of(pbx, POST), 10, "post contact in Asterisk")


def test_alarm_call_rings_desk_then_connects_with_dtmf_both_ways(
        post: Backend, desk: SipPeer, events: Events, site: Site, record_property: Callable[[str, object], None],
) -> None:
    """An alarm call reports 180 before the desk answers, 200 when it does, carries DTMF both ways, ends on BYE."""
    heard: list[tuple[str, str]] = []
    got_digit = threading.Event()
    post.on_dtmf = lambda call_id, digit: (heard.append((call_id, digit)), got_digit.set())
    dialled = time.monotonic()
    post.dial("alarm-1", site.queue.extension, site.pbx.host, False)
    ringing = desk.wait_incoming(timeout=10)
    record_property("dial_to_desk_invite_ms", round((ringing.invite.at - dialled) * 1000, 2))
    log.info("dial() to the desk's INVITE: %.1f ms", (ringing.invite.at - dialled) * 1000)
    assert "Market Place" in (ringing.invite.header("from") or "")
    progress = events.wait(ev.CallProgress, where=lambda e: e.call_id == "alarm-1" and e.status != 100)
    assert progress.status in (180, 183)
    assert "CallAnswered" not in events.kinds("alarm-1")  # queued, not connected: the desk still rings

    answer(desk, ringing)
    events.wait(ev.CallAnswered, where=lambda e: e.call_id == "alarm-1")
    kinds = events.kinds("alarm-1")
    assert kinds.index("CallProgress") < kinds.index("CallAnswered")

    # Post -> desk: RFC 4733 through Asterisk's bridge, once the bridge carries the post's RTP to the desk.
    desk.wait_for(lambda: ringing.rtp.packets >= 10 or None, 10, "the post's RTP at the desk")
    post.send_dtmf("alarm-1", "5")
    desk.wait_for(lambda: "5" in ringing.rtp.digits or None, 10, "DTMF 5 from the post")
    # Desk -> post: the robot needs Asterisk's RTP address first, which it learns from the INVITE's SDP.
    ringing.rtp.send_silence(3)
    ringing.rtp.send_dtmf("7")
    assert got_digit.wait(10), "no DTMF from the desk reached the post"
    assert heard[0] == ("alarm-1", "7")

    ringing.hangup()
    ended = events.wait(ev.CallEnded, where=lambda e: e.call_id == "alarm-1")
    assert ended.reason != "hung up locally"


def test_media_stalled_comes_when_the_far_end_stops_sending(
        site: Site, pbx: Asterisk, desk: SipPeer, events: Events) -> None:
    """MediaStalled comes from pjsua2's stream statistics: not while the desk's RTP flows, but once it stops."""
    backend = start_backend(site, events, media_gap=1.0)
    try:
        events.wait(ev.Registered)
        backend.dial("alarm-quiet", site.queue.extension, site.pbx.host, False)
        ringing = desk.wait_incoming(timeout=10)
        answer(desk, ringing)
        events.wait(ev.CallAnswered, where=lambda e: e.call_id == "alarm-quiet")
        ringing.rtp.send_silence(150)  # 3 s of RTP through Asterisk to the post: three media timeouts long
        stopped = time.monotonic()  # the desk goes silent without a BYE (a crashed phone, a cut cable)
        events.wait(ev.MediaStalled, where=lambda e: e.call_id == "alarm-quiet")
        when = next(t for t, e in events.emitted if isinstance(e, ev.MediaStalled))
        assert when > stopped, "MediaStalled while the desk's RTP was still flowing"
        ringing.rtp.send_silence(25)  # the desk speaks again
        events.wait(ev.MediaResumed, where=lambda e: e.call_id == "alarm-quiet")
        assert "CallEnded" not in events.kinds("alarm-quiet")  # reported, not hung up: the machine decides
        backend.hangup("alarm-quiet")
        events.wait(ev.CallEnded, where=lambda e: e.call_id == "alarm-quiet")
    finally:
        backend.stop()


def test_selftest_call_brings_the_chirp_back(post: Backend, events: Events, site: Site) -> None:
    """A call to the echo extension is answered and its check hears the chirp it sent come back."""
    post.dial("st-1", site.self_test.extension, site.pbx.host, True)
    events.wait(ev.CallAnswered, where=lambda e: e.call_id == "st-1")
    post.check_audio("st-1-call", "call", "st-1", 3.0)
    heard = events.wait(ev.AudioHeard, timeout=20)
    found = chirp_found(heard.rate, heard.pcm)
    assert heard.check_id == "st-1-call" and found.correlation > 0.9, found.describe()
    post.check_audio("no-call", "call", "no-such-call", 3.0)  # nothing to check on: an empty answer, at once
    assert events.wait(ev.AudioHeard, where=lambda e: e.check_id == "no-call").pcm == b""
    post.hangup("st-1")
    events.wait(ev.CallEnded, where=lambda e: e.call_id == "st-1")


def test_incoming_call_rings_until_answered(post: Backend, desk: SipPeer, events: Events, site: Site) -> None:
    """A desk calling the post back gets 180 while it rings; the runner's answer connects it; the desk's BYE ends it."""
    call = desk.call(site.post(POST).extension)
    incoming = events.wait(ev.IncomingCall)
    assert POST in incoming.caller or "2001" in incoming.caller
    call.wait_code(180)
    assert call.final is None  # still ringing: nothing answers until the runner says so
    post.answer(incoming.call_id)
    assert call.wait_final().code == 200
    events.wait(ev.CallAnswered, where=lambda e: e.call_id == incoming.call_id)
    call.hangup()
    events.wait(ev.CallEnded, where=lambda e: e.call_id == incoming.call_id)


def test_rejected_incoming_call_gets_the_status(post: Backend, desk: SipPeer, events: Events, site: Site) -> None:
    """reject() refuses a call-back (the desk's call fails, never connects), and the post reports the call over."""
    call = desk.call(site.post(POST).extension)
    incoming = events.wait(ev.IncomingCall)
    post.reject(incoming.call_id, 486)
    # Asterisk's Dial() turns the post's 486 into its own final answer to the desk (403, cause 21 here).
    assert call.wait_final().code >= 400
    events.wait(ev.CallEnded, where=lambda e: e.call_id == incoming.call_id)


def test_reregisters_after_asterisk_restart(tmp_path: Path, events: Events) -> None:
    """After Asterisk restarts with no memory of the post (fresh astdb), the post is registered again within 30 s."""
    site = make_site(tmp_path / "site")
    with Asterisk(site) as ast:
        backend = start_backend(site, events)
        try:
            events.wait(ev.Registered)
            ast.stop()
            shutil.rmtree(ast.dir / "db", ignore_errors=True)  # the PBX forgets every contact
            ast.start()
            back = time.monotonic()
            assert not contact_of(ast, POST)
            wait_until(lambda: contact_of(ast, POST), 30, "post registered again after the restart")
            log.info("re-registered %.1f s after Asterisk came back", time.monotonic() - back)
        finally:
            backend.stop()


def test_dial_with_asterisk_down_fails_and_works_again_once_it_is_back(tmp_path: Path, events: Events) -> None:
    """With Asterisk stopped a dial gets no CallProgress and ends in one CallFailed (status None, or 408/503); once it is back, calls work."""
    site = make_site(tmp_path / "site")
    with Asterisk(site) as ast:
        backend = start_backend(site, events)
        try:
            events.wait(ev.Registered)
            ast.stop()
            backend.dial("alarm-down", site.queue.extension, site.pbx.host, False)
            # The machine gives a silent PBX up after 4 s (no CallProgress at all); pjsip's own timer B ends it.
            failed = events.wait(ev.CallFailed, timeout=40, where=lambda e: e.call_id == "alarm-down")
            assert failed.status in (None, 408, 503)
            assert events.kinds("alarm-down") == ["CallFailed"]  # one verdict, no progress, no CallEnded after it
            # Once Asterisk is back, the next attempt goes through (the machine's retry).
            ast.start()
            backend.dial("alarm-back", site.self_test.extension, site.pbx.host, True)
            progress = events.wait(ev.CallProgress, timeout=20, where=lambda e: e.call_id == "alarm-back")
            assert progress.status == 100  # 100 Trying tells the machine the PBX is there
            events.wait(ev.CallAnswered, timeout=20, where=lambda e: e.call_id == "alarm-back")
        finally:
            backend.stop()


def _resources() -> tuple[int, int, list[str]]:
    """Open fds, OS threads, and Python threads (pjsip's own thread shows as a dummy Python thread)."""
    python = sorted(t.name for t in threading.enumerate() if not isinstance(t, threading._DummyThread))
    return len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task")), python


def test_start_stop_leaks_no_threads_or_fds(site: Site, pbx: Asterisk, events: Events) -> None:
    """Three start/register/call/stop cycles leave the fd count, OS threads and Python threads as they were."""
    # One cycle first: pjlib's one-time initialisation (its own caches) is not a leak.
    backend = start_backend(site, events)
    events.wait(ev.Registered)
    backend.stop()
    before = _resources()
    for n in range(3):
        backend = start_backend(site, events)
        events.wait(ev.Registered)
        backend.dial(f"st-leak-{n}", site.self_test.extension, site.pbx.host, True)
        events.wait(ev.CallAnswered, where=lambda e, n=n: e.call_id == f"st-leak-{n}")
        backend.stop()  # with the call still up: stop must hang it up before libDestroy

    def settled() -> bool:  # a thread of the previous test may still be on its way out: growth is the leak
        fds, tasks, python = _resources()
        return fds <= before[0] and tasks <= before[1] and python == before[2]
    wait_until(settled, 5, f"resources back to {before} (now {_resources()})")


def test_probes_are_answered_while_queued_connected_and_on_a_call_back(
        post: Backend, desk: SipPeer, events: Events, site: Site) -> None:
    """An OPTIONS probe in the call's dialog gets the PBX's 200 while queued (early dialog), connected, and on a call-back."""
    post.dial("alarm-p", site.queue.extension, site.pbx.host, False)
    ringing = desk.wait_incoming(10)
    events.wait(ev.CallProgress, where=lambda e: e.call_id == "alarm-p" and e.status != 100)
    post.probe("alarm-p")
    assert events.wait(ev.CallProbed, where=lambda e: e.call_id == "alarm-p").status == 200
    answer(desk, ringing)
    events.wait(ev.CallAnswered, where=lambda e: e.call_id == "alarm-p")
    post.probe("alarm-p")
    assert events.wait(ev.CallProbed, where=lambda e: e.call_id == "alarm-p").status == 200
    ringing.hangup()
    events.wait(ev.CallEnded, where=lambda e: e.call_id == "alarm-p")

    call = desk.call(site.post(POST).extension)
    incoming = events.wait(ev.IncomingCall)
    post.answer(incoming.call_id)
    assert call.wait_final().code == 200
    events.wait(ev.CallAnswered, where=lambda e: e.call_id == incoming.call_id)
    post.probe(incoming.call_id)
    assert events.wait(ev.CallProbed, where=lambda e: e.call_id == incoming.call_id).status == 200
    call.hangup()
    events.wait(ev.CallEnded, where=lambda e: e.call_id == incoming.call_id)

    post.probe("no-such-call")  # a call the backend does not have is no call at all
    assert events.wait(ev.CallProbed, where=lambda e: e.call_id == "no-such-call").status is None
    health = post.health()
    assert health.alive and health.counters.get("errors", 0) == 0, health
