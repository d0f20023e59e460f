"""RTP for the pyVoIP backend: pyVoIP's ``RTPClient`` with our own threads, DTMF sending and a media clock.

pyVoIP 1.6.8's ``RTPClient`` polls a non-blocking socket with ``sleep(0.01)``, never joins its threads, keeps
every received packet in a dict for the whole call (memory grows ~8 KB/s), encodes PCMA with the PCMU encoder,
reports a DTMF digit only when the first packet of the event (marker bit) arrives, and cannot send RFC 4733
events at all. :class:`RtpSession` keeps its constructor (codec choice, random SSRC/sequence/timestamp) and
replaces the rest: a receive thread blocked in ``select`` (woken by a socketpair on stop), a transmit thread
paced by a monotonic clock, 16-bit linear audio in and out, digits de-duplicated by event timestamp, and
``last_rx`` so the owner can tell a dead media path.

Packets from anyone but the far end (its SDP address) and the PBX are dropped and counted: a stranger can
neither play into the post's speaker nor keep a dead call looking alive. Every packet is handled in its own
``try``; a thread that dies anyway is named by :meth:`RtpSession.health`.
"""

from __future__ import annotations

import collections
import random
import selectors
import socket
import struct
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

from sip_refuge.post.sip.guard import Counters

with warnings.catch_warnings():
    # pyVoIP imports audioop, deprecated since Python 3.11 (PEP 594; audioop-lts on 3.13): quietly, as .pcm does.
    warnings.filterwarnings("ignore", message=".*audioop.*", category=DeprecationWarning)
    import audioop

    import pyVoIP.VoIP  # noqa: F401 - first: importing pyVoIP.SIP alone fails on a circular import
    from pyVoIP import RTP

FRAME = 160  # samples per 20 ms at 8 kHz
FRAME_SECONDS = 0.02
DTMF_KEYS = "0123456789*#ABCD"
EVENT_FRAMES = 5  # 100 ms of tone per digit
EVENT_END_REPEATS = 3  # RFC 4733 2.5.1.4: the end packet is sent three times
DIGIT_GAP_FRAMES = 3  # 60 ms of silence between digits so the far end sees separate events
LIVE_BACKLOG = 2  # frames (40 ms) of live audio waiting to be sent, at most: each one is delay

PCMU, PCMA, EVENT = RTP.PayloadType.PCMU, RTP.PayloadType.PCMA, RTP.PayloadType.EVENT
OFFER: dict[int, Any] = {0: PCMU, 8: PCMA, 101: EVENT}  # what we offer and accept, by payload number


def bind_rtp_socket(host: str) -> socket.socket:
    """A UDP socket on a free even port (RTP convention; RTCP would take the odd one above)."""
    for _ in range(50):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((host, random.randrange(20000, 60000, 2)))
            return sock
        except OSError:
            sock.close()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    return sock


class RtpSession(RTP.RTPClient):
    """One audio stream of one call. Create it before the SDP (its port goes in the SDP), ``start`` it once
    the far end's address is known, ``stop`` it when the call ends (joins its threads, closes its socket)."""

    def __init__(self, host: str, *, name: str, on_dtmf: Callable[[str], None] | None = None,
                 keep_audio: bool = False, trusted: frozenset[str] = frozenset(),
                 counters: Counters | None = None) -> None:
        """``trusted``: addresses media is accepted from besides the far end's SDP address (empty: anyone)."""
        self.sock = bind_rtp_socket(host)
        super().__init__(dict(OFFER), host, self.sock.getsockname()[1], "0.0.0.0", 0,
                         RTP.TransmitType.SENDRECV, dtmf=on_dtmf)
        self.name = name
        self.keep_audio = keep_audio
        self.event_pt = 101
        self.last_rx = 0.0  # monotonic time of the last packet received; 0.0 = none yet
        self.started = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._out_audio: collections.deque[bytes] = collections.deque()
        self._digits: collections.deque[str] = collections.deque()
        self._in_audio: collections.deque[bytes] = collections.deque(maxlen=500)  # 10 s
        self.recording: bytearray | None = None  # every frame received, in order, once record() is on
        self._in_ready = threading.Condition(self._lock)
        self._last_event_ts: int | None = None
        self._event: dict[str, int] | None = None  # the digit being sent: key, start timestamp, packets sent
        self._wake_r, self._wake_w = socket.socketpair()
        self._threads: list[threading.Thread] = []
        self.trusted = trusted
        self.counters = counters
        self.failure = ""  # why a thread of this session died, if one did

    @property
    def port(self) -> int:
        return int(self.inPort)

    def set_remote(self, host: str, port: int, assoc: dict[int, Any]) -> None:
        """Use the far end's SDP: where to send and which payload numbers it chose."""
        self.outIP, self.outPort = host, port
        audio = [pt for pt, kind in assoc.items() if kind in (PCMU, PCMA)]
        if audio:
            self.preference = assoc[audio[0]]
            self.audio_pt = audio[0]
        else:
            self.audio_pt = 0 if self.preference == PCMU else 8
        self.event_pt = next((pt for pt, kind in assoc.items() if kind == EVENT), 101)
        self.assoc = {**OFFER, **assoc}

    # -- life cycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        if self.started:
            return
        self.started = True
        if not hasattr(self, "audio_pt"):
            self.audio_pt = 0
        self.sin = self.sout = self.sock  # pyVoIP's attribute names, for code that reads them
        for target, role in ((self._receive, "rx"), (self._transmit, "tx")):
            thread = threading.Thread(target=self._thread_main, args=(target, role), name=f"rtp-{role}-{self.name}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self.NSD = False
        self._stop.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # already closed by an earlier stop()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=2.0)
        self._threads.clear()
        with self._in_ready:
            self._in_ready.notify_all()
        for sock in (self.sock, self._wake_r, self._wake_w):
            sock.close()

    # -- audio and DTMF, from any thread ---------------------------------------------------------------
    def write_pcm(self, pcm: bytes) -> None:
        """Queue 16-bit signed linear 8 kHz audio to send (split into 20 ms frames; the tail is padded)."""
        step = FRAME * 2
        with self._lock:
            for i in range(0, len(pcm), step):
                self._out_audio.append(pcm[i:i + step].ljust(step, b"\0"))

    def send_frame(self, pcm: bytes) -> None:
        """Queue one live 20 ms frame (a microphone's): a backlog beyond :data:`LIVE_BACKLOG` frames is dropped from
        its old end, so a sender clocked a little faster than this stream cannot build up delay."""
        with self._lock:
            self._out_audio.append(pcm)
            while len(self._out_audio) > LIVE_BACKLOG:
                self._out_audio.popleft()

    def pending(self) -> int:
        """Received frames not yet read."""
        with self._lock:
            return len(self._in_audio)

    def take_frame(self) -> bytes | None:
        """The oldest received frame, or None; never waits."""
        with self._lock:
            return self._in_audio.popleft() if self._in_audio else None

    def drop_frames(self, keep: int) -> int:
        """Drop the oldest received frames until ``keep`` are left; how many went."""
        with self._lock:
            gone = max(0, len(self._in_audio) - keep)
            for _ in range(gone):
                self._in_audio.popleft()
            return gone

    def record(self) -> None:
        """Keep every frame received from now on in :attr:`recording` as well (a test's ear)."""
        with self._lock:
            self.recording = bytearray()

    def send_dtmf(self, digits: str) -> None:
        with self._lock:
            self._digits.extend(d for d in digits.upper() if d in DTMF_KEYS)

    def read_pcm(self, timeout: float) -> bytes | None:
        """One received 20 ms frame (16-bit linear), or None when none arrives within ``timeout``."""
        with self._in_ready:
            if not self._in_audio and not self._stop.is_set():
                self._in_ready.wait(timeout)
            return self._in_audio.popleft() if self._in_audio else None

    def health(self) -> str:
        """Empty while the session's threads run (or it has not started, or has stopped); else what is wrong."""
        if self.failure:
            return self.failure
        if self.started and not self._stop.is_set():
            dead = [t.name for t in self._threads if not t.is_alive()]
            if dead:
                return f"RTP thread {dead[0]} is not running"
        return ""

    # -- threads ----------------------------------------------------------------------------------------
    def _thread_main(self, target: Callable[[], None], role: str) -> None:
        try:
            target()
        except BaseException as exc:  # noqa: BLE001 - the thread's boundary: health() reports it
            if not self._stop.is_set():
                self.failure = f"RTP {role} thread died: {type(exc).__name__}: {exc}"

    def _receive(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self.sock, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in sel.select():
                    if key.fileobj is self._wake_r:
                        return
                    try:
                        packet, source = self.sock.recvfrom(2048)
                    except OSError:
                        return
                    if self.trusted and source[0] != self.outIP and source[0] not in self.trusted:
                        self._count("rtp_refused", "RTP from %s:%s dropped: not the far end", *source)
                        continue
                    try:
                        self._on_packet(packet)
                    except Exception as exc:  # noqa: BLE001 - per packet: one odd packet must not end the media
                        self._count("rtp_malformed", "RTP packet from %s:%s could not be handled: %r", *source, exc)

    def _count(self, kind: str, message: str, *args: object) -> None:
        if self.counters is not None:
            self.counters.count(kind, message, *args)

    def _on_packet(self, packet: bytes) -> None:
        self.last_rx = time.monotonic()  # anything from the far end shows the media path is alive
        try:
            msg = RTP.RTPMessage(packet, self.assoc)
        except (RTP.RTPParseError, IndexError, ValueError, KeyError, struct.error):
            return  # not RTP we understand (comfort noise, RTCP on the same port): skip it
        if msg.payload_type == EVENT:
            self._on_event(msg)
        elif self.keep_audio and msg.payload_type in (PCMU, PCMA):
            decode = audioop.ulaw2lin if msg.payload_type == PCMU else audioop.alaw2lin
            pcm = decode(msg.payload, 2)
            with self._in_ready:
                self._in_audio.append(pcm)
                if self.recording is not None:
                    self.recording += pcm
                self._in_ready.notify_all()

    def _on_event(self, msg: Any) -> None:
        # Every packet of one event carries the event's start timestamp: a new timestamp is a new digit,
        # even when its first packet (the one with the marker bit) was lost.
        if len(msg.payload) < 4 or msg.timestamp == self._last_event_ts or msg.payload[0] >= len(DTMF_KEYS):
            return
        self._last_event_ts = msg.timestamp
        if self.dtmf is not None:
            self.dtmf(DTMF_KEYS[msg.payload[0]])

    def _transmit(self) -> None:
        deadline = time.monotonic()
        while not self._stop.wait(max(0.0, deadline - time.monotonic())):
            deadline += FRAME_SECONDS
            if deadline < time.monotonic() - 0.2:  # we were starved (GIL, load): don't burst to catch up
                deadline = time.monotonic()
            try:
                self._send_next()
            except OSError:
                if self._stop.is_set():
                    return
                # A transient send error (no route yet, ICMP refusal) must not end the call's media.
                continue

    def _send_next(self) -> None:
        with self._lock:
            event = self._event_step()
            frame = None if event or not self._out_audio else self._out_audio.popleft()
        if event is not None:
            payload, marker, ts = event
            self._send(self.event_pt, payload, marker, ts)
            return
        pcm = frame or b"\0" * (FRAME * 2)
        encode = audioop.lin2ulaw if self.preference == PCMU else audioop.lin2alaw
        self._send(self.audio_pt, encode(pcm, 2), False, self.outTimestamp)
        self.outTimestamp = (self.outTimestamp + FRAME) & 0xFFFFFFFF

    def _event_step(self) -> tuple[bytes, bool, int] | None:
        """The next RFC 4733 packet of the digit being sent, or None to send audio (lock held)."""
        state = self._event
        if state is None:
            if not self._digits:
                return None
            state = self._event = {"key": DTMF_KEYS.index(self._digits.popleft()), "ts": self.outTimestamp, "n": 0}
        n = state["n"]
        state["n"] = n + 1
        if n < EVENT_FRAMES + EVENT_END_REPEATS - 1:
            end = n >= EVENT_FRAMES - 1
            duration = FRAME * min(n + 1, EVENT_FRAMES)
            payload = struct.pack("!BBH", state["key"], (0x80 if end else 0) | 10, duration)
            # All packets of an event carry its start timestamp; the media clock runs on underneath.
            self.outTimestamp = (self.outTimestamp + FRAME) & 0xFFFFFFFF
            return payload, n == 0, state["ts"]
        if n >= EVENT_FRAMES + EVENT_END_REPEATS - 1 + DIGIT_GAP_FRAMES:
            self._event = None
        return None

    def _send(self, pt: int, payload: bytes, marker: bool, ts: int) -> None:
        self.outSequence = (self.outSequence + 1) & 0xFFFF
        header = struct.pack("!BBHII", 0x80, (0x80 if marker else 0) | pt, self.outSequence, ts, self.outSSRC)
        self.sock.sendto(header + payload, (self.outIP, self.outPort))
