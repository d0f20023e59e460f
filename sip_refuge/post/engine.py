"""The pyVoIP backend's audio engine: the one owner of the post's sound card, in 20 ms frames.

One thread, ``audio-<post>``, clocked by the card (a real card's capture blocks until a period is there; the mock
and null cards keep a 20 ms monotonic pace). Every frame::

    microphone --> echo canceller --> the call's RTP encoder                (when a call is connected)
    the call's RTP decoder (jitter buffer) + prompts + self-test chirp --> mixer --> speaker
                                                      (the speaker's frame is the canceller's reference)

The mock card is only the last step swapped (:mod:`sip_refuge.post.sound`). Commands come from the backend's
and runner's threads and only change what the next frame does, under a lock; the frame work itself never waits
on anyone but the card.

The jitter buffer is simple and adaptive: playing starts once :data:`PREBUFFER` frames (60 ms) are queued, a run
dry is silence until it refills, a second in which the queue never fell below two frames gives one frame back
(the network turned calm: less delay; the frame dropped is the next quiet one, so no syllable is cut), and a backlog beyond :data:`MAX_BACKLOG` (240 ms) is cut back to the
prebuffer, so a burst after a network stall costs a click, not seconds of delay for the rest of the call.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from sip_refuge.post import aec, speech
from sip_refuge.post.pcm import audioop
from sip_refuge.post.sound import Card, frame_bytes

log = logging.getLogger(__name__)

PREBUFFER = 3
MAX_BACKLOG = 12
ADAPT_FRAMES = 50  # one second of frames between looks at how deep the buffer ran
QUIET = 300  # RMS of a frame the jitter buffer may drop (about -40 dBFS: a pause between words)
CARD_RETRY = 1.0  # s before a card that failed is opened again
Heard = Callable[[str, int, bytes], None]  # (check id, rate, what was heard)


class Stream(Protocol):
    """A call's media as the engine sees it (:class:`~sip_refuge.post.sip.pyvoip_rtp.RtpSession`)."""

    def send_frame(self, pcm: bytes) -> None: ...
    def take_frame(self) -> bytes | None: ...
    def pending(self) -> int: ...
    def drop_frames(self, keep: int) -> int: ...


@dataclass
class _Check:
    check_id: str
    path: str  # local: speaker -> microphone; call: into the call and back
    stream: Stream | None
    frames: int  # how long to listen
    done: Heard
    signal: bytes
    sent: int = 0
    heard: bytearray = field(default_factory=bytearray)


class AudioEngine:
    """Owns ``card`` (opened by ``open_card`` on the engine's thread, so a card that fails is retried there)."""

    def __init__(self, open_card: Callable[[], Card], rate: int, *, name: str, echo_cancel: bool = True) -> None:
        self.rate, self.name = rate, name
        self._open_card = open_card
        self._frame = frame_bytes(rate)
        self._silence = bytes(self._frame)
        self._lock = threading.Lock()
        self._stream: Stream | None = None
        self._playing = False
        self._shallowest = MAX_BACKLOG  # the fewest frames waiting at any frame of the current second
        self._adapt_in = ADAPT_FRAMES
        self._shrink = False  # a calm second passed: drop the next quiet frame
        self._prompts: collections.deque[bytes] = collections.deque()
        self._prompt_pos = 0
        self._check: _Check | None = None
        self._want_aec = echo_cancel
        self._canceller: aec.EchoCanceller | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failure = ""
        self.card_error = ""
        self.frames = 0
        self.underruns = 0
        self.echo_cancelling = False

    # -- life cycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._want_aec and aec.available():
            self._canceller = aec.EchoCanceller(self.rate, self._frame // 2)
            self.echo_cancelling = True
        elif self._want_aec:
            log.warning("%s: no echo canceller (libspeexdsp1 missing): the desk will hear its own voice back", self.name)
        self._thread = threading.Thread(target=self._main, name=f"audio-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
        if self._canceller is not None:
            self._canceller.close()
            self._canceller = None

    def health(self) -> str:
        """Empty while the engine's thread turns; else what is wrong."""
        if self.failure:
            return self.failure
        if self._thread is not None and not self._thread.is_alive() and not self._stop.is_set():
            return f"audio thread audio-{self.name} is not running"
        return ""

    # -- commands (any thread) --------------------------------------------------------------------------
    def connect(self, stream: Stream) -> None:
        """Carry ``stream`` to and from the card (the call is up)."""
        with self._lock:
            self._stream, self._playing = stream, False
            self._shallowest, self._adapt_in = MAX_BACKLOG, ADAPT_FRAMES

    def disconnect(self, stream: Stream) -> None:
        with self._lock:
            if self._stream is stream:
                self._stream = None
            if self._check is not None and self._check.stream is stream:
                self._check.stream = None  # the call went: the check hears nothing more from it

    def play(self, pcm: bytes) -> None:
        """Queue a prompt (16-bit at the engine's rate): prompts play one after another."""
        with self._lock:
            self._prompts.append(pcm)

    def stop_prompts(self) -> None:
        with self._lock:
            self._prompts.clear()
            self._prompt_pos = 0

    def check(self, check_id: str, path: str, stream: Stream | None, seconds: float, done: Heard) -> None:
        """Play the self-test's chirp on ``path`` (``local``: the speaker; ``call``: into ``stream``) and record the
        other end of that path (the raw microphone, before the canceller; or what ``stream`` brings back) for
        ``seconds``; then ``done(check_id, rate, pcm)`` on the engine's thread."""
        signal = speech.pcm16(speech.check_signal(self.rate))
        with self._lock:
            self._check = _Check(check_id, path, stream, int(seconds / 0.02), done, signal)

    # -- the thread -------------------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - the thread's boundary: health() reports it
            self.failure = f"audio thread died: {type(exc).__name__}: {exc}"
            log.critical("%s: %s", self.name, self.failure, exc_info=True)

    def _run(self) -> None:
        speaker = self._silence
        while not self._stop.is_set():
            try:
                card = self._open_card()
            except Exception as exc:  # noqa: BLE001 - a card that cannot open now may later (USB re-plugged)
                self.card_error = str(exc)
                log.error("%s: sound card: %s; trying again", self.name, exc)
                self._stop.wait(CARD_RETRY)
                continue
            self.card_error = ""
            try:
                while not self._stop.is_set():
                    microphone = card.capture()
                    speaker = self._turn(microphone, speaker)
                    card.play(speaker)
                    self.frames += 1
            except Exception as exc:  # noqa: BLE001 - a card error: reopen it rather than lose the post's audio
                self.card_error = str(exc)
                log.exception("%s: sound card failed; reopening it", self.name)
                self._stop.wait(CARD_RETRY)
            finally:
                card.close()

    def _turn(self, microphone: bytes, last_speaker: bytes) -> bytes:
        """One frame: the microphone's frame in, the speaker's frame out."""
        finished: _Check | None = None
        with self._lock:
            stream, check = self._stream, self._check
            voice = microphone
            if self._canceller is not None:
                voice = self._canceller.process(microphone, last_speaker)
            mix = self._far_end(stream) if stream is not None else self._silence
            prompt = self._next_prompt()
            if prompt is not None:
                mix = audioop.add(mix, prompt, 2)
            if check is not None:
                chirp = check.signal[check.sent * self._frame:(check.sent + 1) * self._frame].ljust(self._frame, b"\0")
                check.sent += 1
                if check.path == "local":
                    mix = audioop.add(mix, chirp, 2)
                    check.heard += microphone  # the raw microphone: the canceller would remove the chirp
                elif check.stream is not None:
                    check.stream.send_frame(chirp)
                    while (frame := check.stream.take_frame()) is not None:
                        check.heard += frame
                if check.sent >= check.frames:
                    finished, self._check = check, None
            if stream is not None:
                stream.send_frame(voice)
        if finished is not None:
            finished.done(finished.check_id, self.rate, bytes(finished.heard))
        return mix

    def _far_end(self, stream: Stream) -> bytes:
        waiting = stream.pending()
        if waiting > MAX_BACKLOG:
            stream.drop_frames(PREBUFFER)
        elif not self._playing and waiting >= PREBUFFER:
            self._playing = True
        if not self._playing:
            return self._silence
        self._shallowest = min(self._shallowest, waiting)
        self._adapt_in -= 1
        if self._adapt_in <= 0:
            self._shrink = self._shrink or self._shallowest >= 2
            self._shallowest, self._adapt_in = MAX_BACKLOG, ADAPT_FRAMES
        frame = stream.take_frame()
        if self._shrink and frame is not None and stream.pending() >= 1 and audioop.rms(frame, 2) < QUIET:
            self._shrink = False
            frame = stream.take_frame()  # one frame less of delay, taken out of a pause
        if frame is None:
            self._playing = False
            self.underruns += 1
            return self._silence
        return frame if len(frame) == self._frame else frame[:self._frame].ljust(self._frame, b"\0")

    def _next_prompt(self) -> bytes | None:
        if not self._prompts:
            return None
        pcm = self._prompts[0]
        frame = pcm[self._prompt_pos:self._prompt_pos + self._frame]
        self._prompt_pos += self._frame
        if self._prompt_pos >= len(pcm):
            self._prompts.popleft()
            self._prompt_pos = 0
        return frame.ljust(self._frame, b"\0")

