"""A desk-phone robot for tests and the demo: a registered pyVoIP phone that rings, answers and listens.

It registers as an operator desk, records when each INVITE arrived and who was calling, answers after a
configurable delay (or when told), plays a tone or DTMF into the call, detects a tone in what it hears with a
Goertzel filter over the 8 kHz audio, records RFC 4733 digits, hangs up and can call a post back. It runs on
the same small SIP agent as the post's pyVoIP backend (:mod:`sip_refuge.post.sip.pyvoip_ua`), so it answers
the moment it decides to: pyVoIP's own ``VoIPPhone`` would answer a second late.

    with DeskRobot("desk-1", password, ("127.0.0.1", 5160), answer_after=0.5) as desk:
        desk.wait_registered()
        ring = desk.wait_ring()
        desk.wait_answered()
        assert desk.detect_tone(1000.0)
"""

from __future__ import annotations

import array
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TypeVar

from sip_refuge.post.sip.pyvoip_ua import Call, Ua

T = TypeVar("T")
RATE = 8000
FRAME = 160  # samples per 20 ms frame


@dataclass
class Ring:
    """One call that reached the desk (an INVITE), with what the desk saw of it."""

    call: Call
    caller: str  # the caller ID shown (display name, else user)
    invite_at: float  # time.monotonic() when the INVITE arrived
    answered_at: float | None = None  # when the desk's call was up (ACK for our 200 OK)
    ended_at: float | None = None
    end_reason: str = ""
    digits: list[str] = field(default_factory=list)


def goertzel_power(samples: array.array[int], freq: float, rate: int = RATE) -> float:
    """Relative power of ``freq`` in ``samples``: 1.0 for a pure tone at that frequency, near 0 without it."""
    n = len(samples)
    if n == 0:
        return 0.0
    coeff = 2.0 * math.cos(2.0 * math.pi * freq / rate)
    s1 = s2 = 0.0
    energy = 0.0
    for x in samples:
        s0 = x + coeff * s1 - s2
        s2, s1 = s1, s0
        energy += x * x
    if energy < n * 100.0:  # silence (about -50 dBFS): no tone whatever the ratio says
        return 0.0
    power = s1 * s1 + s2 * s2 - coeff * s1 * s2
    return power / (energy * n / 2.0)


def tone_pcm(freq: float, seconds: float, amplitude: float = 0.3) -> bytes:
    """16-bit linear 8 kHz samples of a sine tone (native byte order, as audioop wants)."""
    count = int(seconds * RATE)
    peak = amplitude * 32767
    return array.array("h", (int(peak * math.sin(2 * math.pi * freq * i / RATE)) for i in range(count))).tobytes()


class DeskRobot:
    """An operator desk on a real PBX, driven by a test. Use as a context manager."""

    def __init__(self, user: str, password: str, server: tuple[str, int], *, answer_after: float | None = 0.0,
                 display: str = "") -> None:
        """``answer_after``: seconds from the INVITE to answering; None leaves every call ringing until
        :meth:`answer` (or :meth:`reject`)."""
        self.answer_after = answer_after
        self.rings: list[Ring] = []
        self.outgoing: list[Ring] = []  # calls this desk placed (call-backs)
        self.registrations = 0
        self._cond = threading.Condition()
        self._by_call: dict[str, Ring] = {}
        self.ua = Ua(user=user, password=password, server=server, listener=self, display=display or user,
                     name=f"robot-{user}", keep_audio=True, on_dtmf=self._on_dtmf, media_gap=3600.0)

    # -- life cycle -------------------------------------------------------------------------------------
    def start(self) -> DeskRobot:
        self.ua.start()
        return self

    def stop(self) -> None:
        self.ua.stop()

    def __enter__(self) -> DeskRobot:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # -- waiting (deadlines, never fixed sleeps) ---------------------------------------------------------
    def wait_for(self, probe: Callable[[], T | None], timeout: float, what: str) -> T:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = probe()
                if value is not None and value is not False:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"desk robot {self.ua.user}: no {what} within {timeout} s")
                self._cond.wait(left)

    def wait_registered(self, timeout: float = 10.0, count: int = 1) -> None:
        self.wait_for(lambda: self.registrations >= count, timeout, f"registration #{count}")

    def wait_ring(self, timeout: float = 10.0, index: int = 0) -> Ring:
        return self.wait_for(lambda: self.rings[index] if len(self.rings) > index else None, timeout, "INVITE")

    def wait_answered(self, ring: Ring | None = None, timeout: float = 10.0) -> Ring:
        return self.wait_for(lambda: self._pick(ring) if self._pick(ring).answered_at else None, timeout,
                             "answered call")

    def wait_ended(self, ring: Ring | None = None, timeout: float = 10.0) -> Ring:
        return self.wait_for(lambda: self._pick(ring) if self._pick(ring).ended_at else None, timeout, "call end")

    def wait_dtmf(self, digits: str, ring: Ring | None = None, timeout: float = 10.0) -> None:
        self.wait_for(lambda: digits in "".join(self._pick(ring).digits), timeout, f"DTMF {digits}")

    def _pick(self, ring: Ring | None) -> Ring:
        if ring is not None:
            return ring
        current = [r for r in (*self.rings, *self.outgoing)]
        if not current:
            raise LookupError(f"desk robot {self.ua.user} has no call")
        return max(current, key=lambda r: r.invite_at)

    # -- actions ----------------------------------------------------------------------------------------
    def answer(self, ring: Ring | None = None) -> None:
        call = self._pick(ring).call
        self.ua.post(lambda: self.ua.answer_now(call))

    def reject(self, ring: Ring | None = None, status: int = 486) -> None:
        call = self._pick(ring).call
        self.ua.post(lambda: self.ua.reject_now(call, status))

    def hangup(self, ring: Ring | None = None) -> None:
        picked = self._pick(ring)
        self.ua.post(lambda: self.ua.hangup_now(picked.call))
        with self._cond:
            picked.ended_at = picked.ended_at or time.monotonic()
            picked.end_reason = picked.end_reason or "hung up by the desk"
            self._cond.notify_all()

    def call(self, extension: str) -> Ring:
        """Call ``extension`` (a post's call-back number); the Ring is in :attr:`outgoing`."""
        call = self.ua.dial(extension)
        ring = Ring(call, extension, time.monotonic())
        with self._cond:
            self.outgoing.append(ring)
            self._by_call[call.key] = ring
        return ring

    def send_dtmf(self, digits: str, ring: Ring | None = None) -> None:
        self._pick(ring).call.rtp.send_dtmf(digits)

    def play_tone(self, freq: float, seconds: float = 1.0, ring: Ring | None = None) -> None:
        self._pick(ring).call.rtp.write_pcm(tone_pcm(freq, seconds))

    def play_pcm(self, pcm: bytes, ring: Ring | None = None) -> None:
        """Play 16-bit 8 kHz mono audio (e.g. a recorded voice) into the call."""
        self._pick(ring).call.rtp.write_pcm(pcm)

    def record(self, ring: Ring | None = None) -> None:
        """Keep everything this call brings from now on (16-bit 8 kHz), for :meth:`recording`."""
        self._pick(ring).call.rtp.record()

    def recording(self, ring: Ring | None = None) -> bytes:
        """What the call brought since :meth:`record`, frame after frame as it arrived."""
        kept = self._pick(ring).call.rtp.recording
        return bytes(kept) if kept is not None else b""

    def detect_tone(self, freq: float, ring: Ring | None = None, *, timeout: float = 5.0, min_ms: int = 200,
                    threshold: float = 0.5) -> bool:
        """Listen until ``freq`` has been heard for ``min_ms`` without a break, or ``timeout`` passes."""
        rtp = self._pick(ring).call.rtp
        deadline = time.monotonic() + timeout
        run = 0
        while time.monotonic() < deadline:
            frame = rtp.read_pcm(timeout=max(0.0, deadline - time.monotonic()))
            if frame is None:
                continue
            samples = array.array("h")
            samples.frombytes(frame)
            run = run + len(samples) if goertzel_power(samples, freq) >= threshold else 0
            if run * 1000 >= min_ms * RATE:
                return True
        return False

    # -- UaListener (the agent's thread) ----------------------------------------------------------------
    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def on_registered(self, expires: int) -> None:
        with self._cond:
            self.registrations += 1
            self._cond.notify_all()

    def on_registration_failed(self, reason: str, status: int | None) -> None:
        self._notify()

    def on_unregistered(self, reason: str) -> None:
        self._notify()

    def on_progress(self, call: Call, status: int) -> None:
        self._notify()

    def on_answered(self, call: Call) -> None:
        with self._cond:
            ring = self._by_call.get(call.key)
            if ring is not None:
                ring.answered_at = time.monotonic()
            self._cond.notify_all()

    def on_failed(self, call: Call, status: int | None, reason: str) -> None:
        self.on_ended(call, f"failed: {status} {reason}")

    def on_ended(self, call: Call, reason: str) -> None:
        with self._cond:
            ring = self._by_call.get(call.key)
            if ring is not None and ring.ended_at is None:
                ring.ended_at, ring.end_reason = time.monotonic(), reason
            self._cond.notify_all()

    def on_incoming(self, call: Call) -> None:
        invite_at = call.invite.at if call.invite is not None else time.monotonic()
        ring = Ring(call, call.caller, invite_at)
        with self._cond:
            self.rings.append(ring)
            self._by_call[call.key] = ring
            self._cond.notify_all()
        if self.answer_after is not None:
            self.ua.call_later(max(0.0, invite_at + self.answer_after - time.monotonic()),
                               lambda: self.ua.answer_now(call))

    def on_media_stalled(self, call: Call) -> None:
        self._notify()

    def on_media_resumed(self, call: Call) -> None:
        self._notify()

    def _on_dtmf(self, call: Call, digit: str) -> None:
        with self._cond:
            ring = self._by_call.get(call.key)
            if ring is not None:
                ring.digits.append(digit)
            self._cond.notify_all()
