"""The pyVoIP post backend against the real Asterisk (sandbox config rendered from a test site), with a desk robot."""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Generic, TypeVar

import pytest

from sip_refuge.config.loader import load_site
from sip_refuge.config.model import Site
from sip_refuge.config.secrets import init_secrets
from sip_refuge.errors import SipError
from sip_refuge.pbx.asterisk import Asterisk
from sip_refuge.post.events import (
    AudioHeard,
    CallAnswered,
    CallEnded,
    CallProbed,
    CallProgress,
    Event,
    IncomingCall,
    MediaResumed,
    MediaStalled,
    Registered,
)
from sip_refuge.post.sip import Account
from sip_refuge.post.sip.pyvoip import Backend
from tests.support.audio import chirp_found
from tests.support.desk_robot import DeskRobot

pytestmark = pytest.mark.integration
T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]
POST = "bus-station"  # the demo site's pyVoIP post
DESK = "desk-1"


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_rtp_range(size: int = 200) -> int:
    """A block of UDP ports nobody holds right now (Asterisk's rtp_start..rtp_end)."""
    for base in range(32000 + (os.getpid() % 50) * 400, 60000, 400):
        socks = []
        try:
            for port in (base, base + size // 2, base + size - 1):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free RTP port range")


class Recorder(Generic[T]):
    """The backend's ``emit`` (or ``on_dtmf``): keeps every item and lets the test wait for one, with a deadline."""

    def __init__(self) -> None:
        self.events: list[tuple[float, T]] = []
        self._cond = threading.Condition()

    def __call__(self, event: T) -> None:
        with self._cond:
            self.events.append((time.monotonic(), event))
            self._cond.notify_all()

    def wait(self, match: Callable[[T], bool], timeout: float, what: str, *, after: float = 0.0) -> float:
        """Time (monotonic) of the first matching event emitted at or after ``after``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for at, event in self.events:
                    if at >= after and match(event):
                        return at
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {what} within {timeout} s; events: {[e for _, e in self.events]}")
                self._cond.wait(left)

    def of(self, kind: type) -> list[tuple[float, T]]:
        with self._cond:
            return [(at, e) for at, e in self.events if isinstance(e, kind)]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    folder = tmp_path_factory.mktemp("pyvoip-site")
    text = (ROOT / "config" / "demo.yaml").read_text(encoding="utf-8")
    rtp = free_rtp_range()
    text = re.sub(r"sip_port: \d+", f"sip_port: {free_port()}", text)
    text = re.sub(r"(ami:\n\s+)port: \d+", rf"\g<1>port: {free_port(socket.SOCK_STREAM)}", text)
    text = re.sub(r"rtp_start: \d+", f"rtp_start: {rtp}", text)
    text = re.sub(r"rtp_end: \d+", f"rtp_end: {rtp + 199}", text)
    text = text.replace("database: ../var/demo.sqlite3", "database: demo.sqlite3")
    path = folder / "site.yaml"
    path.write_text(text, encoding="utf-8")
    init_secrets(load_site(path, check_secrets=False))
    site = load_site(path)
    assert site.post(POST).sip_backend == "pyvoip"
    return site


@pytest.fixture(scope="module")
def asterisk(site: Site) -> Iterator[Asterisk]:
    with Asterisk(site, command="pytest tests/integration/test_post_pyvoip.py") as ast:
        yield ast


@pytest.fixture
def desk(site: Site, asterisk: Asterisk) -> Iterator[DeskRobot]:
    d = site.desk(DESK)
    with DeskRobot(d.id, d.secret.read(), (site.pbx.host, site.pbx.sip_port), answer_after=None) as robot:
        robot.wait_registered()
        yield robot


@pytest.fixture
def post(site: Site, asterisk: Asterisk) -> Iterator[tuple[Backend, Recorder[Event]]]:
    p = site.post(POST)
    backend, events = Backend(), Recorder[Event]()
    backend.start(Account(p, site.pbx, p.secret.read()), events)
    events.wait(lambda e: isinstance(e, Registered), 10, "registration")
    yield backend, events
    backend.stop()


def contacts(asterisk: Asterisk) -> str:
    return asterisk.cli("pjsip show contacts")


def test_registers_and_leaves_no_threads_or_fds(site: Site, asterisk: Asterisk) -> None:
    """The post registers (Asterisk lists its contact), and start/stop leaves no thread or fd behind."""
    fds = set(os.listdir("/proc/self/fd"))
    threads = {t.ident for t in threading.enumerate()}
    p = site.post(POST)
    backend, events = Backend(), Recorder[Event]()
    backend.start(Account(p, site.pbx, p.secret.read()), events)
    events.wait(lambda e: isinstance(e, Registered), 10, "registration")
    assert f"{POST}/sip:{POST}@127.0.0.1" in contacts(asterisk)
    backend.stop()
    assert {t.ident for t in threading.enumerate()} - threads == set()
    assert set(os.listdir("/proc/self/fd")) - fds == set()


def test_alarm_call_rings_desk_then_audio_both_ways(site: Site, desk: DeskRobot,
                                                    post: tuple[Backend, Recorder[Event]]) -> None:
    """An alarm call rings the desk with the post's name, reports 18x before 200, and carries DTMF both ways."""
    backend, events = post
    heard: Recorder[str] = Recorder()  # digits arrive on the RTP thread; wait on them like on events
    backend.on_dtmf = lambda call_id, digit: heard(digit)
    backend.dial("alarm-1", site.queue.extension, site.pbx.host, False)
    ring = desk.wait_ring()
    assert ring.caller == site.post(POST).name
    progress_at = events.wait(lambda e: isinstance(e, CallProgress) and e.call_id == "alarm-1" and e.status != 100, 5,
                                  "18x")
    assert not events.of(CallAnswered)  # the desk has not answered yet: the post is queued, not connected
    desk.answer(ring)
    answered_at = events.wait(lambda e: e == CallAnswered("alarm-1"), 5, "CallAnswered")
    assert progress_at < answered_at
    desk.wait_answered(ring)

    backend.send_dtmf("alarm-1", "159")
    desk.wait_dtmf("159", ring)  # the post's RFC 4733 digits went through Asterisk to the desk
    desk.send_dtmf("7#", ring)
    heard.wait(lambda digit: digit == "#", 5, "DTMF 7# at the post")
    assert [digit for _, digit in heard.events] == ["7", "#"]

    desk.hangup(ring)
    events.wait(lambda e: isinstance(e, CallEnded) and e.call_id == "alarm-1", 5, "CallEnded")


def echo_check(backend: Backend, events: Recorder[Event], call_id: str) -> float:
    """The chirp sent into ``call_id`` and what came back: its correlation."""
    after = time.monotonic()
    backend.check_audio(f"{call_id}-call", "call", call_id, 3.0)
    events.wait(lambda e: isinstance(e, AudioHeard) and e.check_id == f"{call_id}-call", 20, "what the check heard",
                after=after)
    heard = [e for at, e in events.events if at >= after and isinstance(e, AudioHeard)][0]
    return chirp_found(heard.rate, heard.pcm).correlation


def test_selftest_call_brings_the_chirp_back(site: Site, post: tuple[Backend, Recorder[Event]]) -> None:
    """A call to the echo extension is answered and its check hears the chirp it sent come back."""
    backend, events = post
    backend.dial("st-1", site.self_test.extension, site.pbx.host, True)
    events.wait(lambda e: e == CallAnswered("st-1"), 5, "self-test answered")
    assert echo_check(backend, events, "st-1") > 0.9
    assert echo_check(backend, events, "no-such-call") == 0.0  # nothing to check on: an empty answer at once
    backend.hangup("st-1")


def test_callback_from_desk_is_incoming_and_answered(site: Site, desk: DeskRobot,
                                                     post: tuple[Backend, Recorder[Event]]) -> None:
    """A desk's call-back reaches the post as IncomingCall; answering it connects both ends."""
    backend, events = post
    ring = desk.call(site.post(POST).extension)
    events.wait(lambda e: isinstance(e, IncomingCall), 5, "IncomingCall")
    incoming = events.of(IncomingCall)[0][1]
    assert isinstance(incoming, IncomingCall) and incoming.caller == site.desk(DESK).name
    backend.answer(incoming.call_id)
    events.wait(lambda e: e == CallAnswered(incoming.call_id), 5, "incoming call up")
    desk.wait_answered(ring)
    desk.hangup(ring)
    events.wait(lambda e: isinstance(e, CallEnded) and e.call_id == incoming.call_id, 5, "CallEnded")


def test_silent_media_is_reported(site: Site, desk: DeskRobot, asterisk: Asterisk) -> None:
    """An answered call whose far end stops sending RTP is reported as MediaStalled (no BYE needed)."""
    p = site.post(POST)
    backend, events = Backend(), Recorder[Event]()
    backend.media_gap = 1.5
    backend.start(Account(p, site.pbx, p.secret.read()), events)
    try:
        events.wait(lambda e: isinstance(e, Registered), 10, "registration")
        backend.dial("alarm-2", site.queue.extension, site.pbx.host, False)
        ring = desk.wait_ring()
        desk.answer(ring)
        events.wait(lambda e: e == CallAnswered("alarm-2"), 5, "CallAnswered")
        desk.wait_answered(ring)
        assert not events.of(MediaStalled)  # while the desk's RTP flows
        ring.call.rtp.stop()  # the desk's media dies without a BYE (a cut cable, a crashed phone)
        events.wait(lambda e: e == MediaStalled("alarm-2"), 5, "MediaStalled")
        assert not events.of(MediaResumed)
    finally:
        backend.stop()


def test_reregisters_after_asterisk_restart(asterisk: Asterisk, post: tuple[Backend, Recorder[Event]]) -> None:
    """Asterisk restarted while the post is idle sees the post registered again within 30 s."""
    _, events = post
    asterisk.restart()
    restarted = time.monotonic()
    events.wait(lambda e: isinstance(e, Registered), 30, "registration after the restart", after=restarted)
    assert f"{POST}/sip:{POST}@127.0.0.1" in contacts(asterisk)


def test_tls_site_is_refused(site: Site) -> None:
    """A TLS site is refused at start with a SipError that says why (pyVoIP has no TLS or SRTP)."""
    p = site.post(POST)
    pbx = site.pbx.__class__(**{**site.pbx.__dict__, "transport": "tls"})
    with pytest.raises(SipError, match="UDP only"):
        Backend().start(Account(p, pbx, "unused"), Recorder[Event]())



def test_probes_are_answered_while_queued_connected_and_on_a_call_back(
        site: Site, desk: DeskRobot, post: tuple[Backend, Recorder[Event]]) -> None:
    """An OPTIONS probe in the call's dialog gets the PBX's 200 while queued (early dialog), connected, and on a call-back."""
    backend, events = post

    def probed(call_id: str) -> int | None:
        after = time.monotonic()
        backend.probe(call_id)
        events.wait(lambda e: isinstance(e, CallProbed) and e.call_id == call_id, 5, f"probe of {call_id}", after=after)
        answer = [e for at, e in events.events if at >= after and isinstance(e, CallProbed) and e.call_id == call_id]
        return answer[0].status  # type: ignore[union-attr]

    backend.dial("alarm-p", site.queue.extension, site.pbx.host, False)
    ring = desk.wait_ring()
    events.wait(lambda e: isinstance(e, CallProgress) and e.call_id == "alarm-p" and e.status != 100, 5, "18x")
    assert probed("alarm-p") == 200
    desk.answer(ring)
    events.wait(lambda e: e == CallAnswered("alarm-p"), 5, "CallAnswered")
    assert probed("alarm-p") == 200
    desk.hangup(ring)
    events.wait(lambda e: isinstance(e, CallEnded) and e.call_id == "alarm-p", 5, "CallEnded")

    back = desk.call(site.post(POST).extension)
    events.wait(lambda e: isinstance(e, IncomingCall), 5, "IncomingCall")
    incoming = events.of(IncomingCall)[0][1]
    assert isinstance(incoming, IncomingCall)
    backend.answer(incoming.call_id)
    events.wait(lambda e: e == CallAnswered(incoming.call_id), 5, "call-back up")
    assert probed(incoming.call_id) == 200
    desk.hangup(back)
    events.wait(lambda e: isinstance(e, CallEnded) and e.call_id == incoming.call_id, 5, "CallEnded")

    assert probed("no-such-call") is None  # a call the backend does not have is no call at all
    health = backend.health()
    assert health.alive and health.counters.get("errors", 0) == 0, health


def test_the_datagram_that_killed_the_sip_thread_is_counted_and_the_post_goes_on(
        site: Site, post: tuple[Backend, Recorder[Event]]) -> None:
    """Finding 4: a 200 OK with "CSeq: abc INVITE" from the PBX's address is dropped and counted, from a stranger dropped unread; the next call works."""
    backend, events = post
    datagram = (b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKx\r\nFrom: <sip:a@b>;tag=1\r\n"
                b"To: <sip:c@d>;tag=2\r\nCall-ID: x\r\nCSeq: abc INVITE\r\nContent-Length: 0\r\n\r\n")
    ua = backend._ua
    assert ua is not None
    for source in (site.pbx.host, "127.0.0.2"):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((source, 0))
            sock.sendto(datagram, (ua.host, ua.port))
    deadline = time.monotonic() + 5
    while backend.health().counters.get("refused", 0) < 1 or backend.health().counters.get("malformed", 0) < 1:
        assert time.monotonic() < deadline, backend.health()
        time.sleep(0.05)
    assert backend.health().alive
    backend.dial("st-after", site.self_test.extension, site.pbx.host, True)
    events.wait(lambda e: e == CallAnswered("st-after"), 10, "the next call answered")
    assert echo_check(backend, events, "st-after") > 0.9
