"""The post's sound card: a real one (ALSA), none (null), or the mock card of ``--audio-in IN.wav --audio-out OUT.wav``.

One part of the post owns the card: the SIP backend's audio path (pjsua2's conference bridge, or the pyVoIP
backend's audio engine). Prompts, the far end's voice and the self-test's chirp all go through it; nothing else
opens the device (a second process playing prompts is how intercoms end up with "device busy").

**The mock card model.** The mock card is the sound card's counterpart of ``--gpio mock``; the code above it is the
same as for a sound card, only this last step differs:

* The *world* the microphone hears is ``IN.wav`` (the caller's voice, street noise), looped.
* The microphone also hears the post's own speaker, as in a real steel post box: an echo path with a fixed delay
  (:data:`ECHO_DELAY`, 10 ms) and gain (:data:`ECHO_GAIN`, -10 dB). That is what the acoustic self-test listens for
  and what the echo canceller must remove before the caller's voice goes to the desk.
* A microphone that delivers pure digital silence (an all-zero ``IN.wav``) is a dead or disconnected capsule: it
  hears nothing, not even the speaker.
* Everything the speaker plays (prompts, the far end's voice, the self-test's chirp) is written to ``OUT.wav`` as it
  is played, frame by frame, at ``IN.wav``'s sample rate; the header is kept current, so the file can be read while
  the post runs.

``IN.wav`` and ``OUT.wav`` are 16-bit PCM mono at 8, 16 or 48 kHz.
"""

from __future__ import annotations

import logging
import threading
import time
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from sip_refuge.errors import RefugeError
from sip_refuge.post import speech
from sip_refuge.post.pcm import audioop

log = logging.getLogger(__name__)

RATES = (8000, 16000, 48000)
FRAME_SECONDS = 0.02
ECHO_DELAY = 0.010  # s from the speaker to the microphone inside the box (plus the frame the card buffers)
ECHO_GAIN = 0.316  # -10 dB: a loud speaker a few centimetres from the microphone, behind a steel front


@dataclass(frozen=True)
class Sound:
    """Which card a post uses: ``device`` is an ALSA PCM name (``default``, ``plughw:1``) or ``null`` (no card:
    the microphone hears silence, the speaker plays to nobody); ``audio_in``/``audio_out`` (both or neither) make
    it the mock card, whatever ``device`` says."""

    device: str = "null"
    audio_in: Path | None = None
    audio_out: Path | None = None

    @property
    def mock(self) -> bool:
        return self.audio_in is not None

    @property
    def null(self) -> bool:
        return not self.mock and self.device == "null"

    def describe(self) -> str:
        if self.mock:
            return f"mock card (microphone {self.audio_in}, speaker {self.audio_out})"
        return "no sound card (null)" if self.null else f"ALSA device {self.device!r}"


class Card(Protocol):
    """A sound card as the audio engine sees it: 20 ms frames of 16-bit mono at ``rate``, clocked by the card."""

    rate: int

    def capture(self) -> bytes:
        """The microphone's next frame; blocks until the card has it (the card's clock paces the engine)."""

    def play(self, pcm: bytes) -> None:
        """One frame to the speaker."""

    def close(self) -> None:
        """Release the device (idempotent)."""


def frame_bytes(rate: int) -> int:
    return int(rate * FRAME_SECONDS) * 2


def read_wav(path: Path) -> tuple[bytes, int]:
    """(16-bit samples, rate) of a mock card's input; a clear error names what is wrong with the file."""
    try:
        with wave.open(str(path), "rb") as w:
            channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
            data = w.readframes(w.getnframes())
    except (OSError, EOFError, wave.Error) as exc:
        raise RefugeError(f"{path}: cannot read it as a WAV file: {exc}") from None
    if channels != 1 or width != 2 or rate not in RATES:
        raise RefugeError(f"{path}: must be 16-bit PCM mono at 8, 16 or 48 kHz (it is {width * 8}-bit, "
                          f"{channels} channel(s), {rate} Hz)")
    if not data:
        raise RefugeError(f"{path}: holds no audio")
    return data, rate


class Resampler:
    """Streaming conversion between 8, 16 and 48 kHz (integer ratios), frame by frame, with a windowed-sinc FIR
    (128 taps per phase) whose state carries across frames: band-limited, unlike audioop.ratecv, whose aliasing
    would be heard in a speech benchmark as the post's fault. The filter's delay is cut off the start, so a sample
    leaves at the time it would have without conversion."""

    TAPS = 128

    def __init__(self, rate: int, to: int) -> None:
        self.up, self.down = (to // rate, 1) if to >= rate else (1, rate // to)
        if rate * self.up // self.down != to:
            raise ValueError(f"no integer ratio from {rate} to {to} Hz")
        factor = max(self.up, self.down)
        n = self.TAPS * factor
        t = np.arange(n) - (n - 1) / 2
        self._fir = np.sinc(t / factor) * np.hamming(n) * (self.up / factor)
        self._tail = np.zeros(n - 1)
        self._phase = 0  # of the decimation, across frames
        self._skip = int(round((n - 1) / 2 / self.down))  # the filter's group delay, in output samples
        self.identity = rate == to

    def __call__(self, pcm: bytes) -> bytes:
        if self.identity:
            return pcm
        x = speech.samples(pcm)
        if self.up > 1:
            stuffed = np.zeros(len(x) * self.up)
            stuffed[:: self.up] = x
            x = stuffed
        y = np.convolve(np.concatenate([self._tail, x]), self._fir, mode="valid")
        self._tail = np.concatenate([self._tail, x])[-(len(self._fir) - 1):]
        if self.down > 1:
            y = y[self._phase:: self.down]
            self._phase = (self._phase - len(x)) % self.down
        if self._skip:
            skipped, self._skip = min(self._skip, len(y)), self._skip - min(self._skip, len(y))
            y = y[skipped:]
        return speech.pcm16(y)


class Pacer:
    """A card's clock where there is no card: one frame every 20 ms of the monotonic clock, without catching up
    in a burst after a stall (a starved process must not dump seconds of audio at once)."""

    def __init__(self) -> None:
        self._next: float | None = None

    def wait(self) -> None:
        now = time.monotonic()
        if self._next is None or self._next < now - 0.2:
            self._next = now
        elif self._next > now:
            time.sleep(self._next - now)
        self._next += FRAME_SECONDS


class NullCard:
    """No sound card: the microphone hears digital silence, the speaker plays to nobody; clocked by :class:`Pacer`."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._pacer = Pacer()
        self._silence = bytes(frame_bytes(rate))

    def capture(self) -> bytes:
        self._pacer.wait()
        return self._silence

    def play(self, pcm: bytes) -> None:
        return None

    def close(self) -> None:
        return None


class MockCard:
    """The mock card (see the module's docstring for its model), at ``rate`` for the engine above it.

    :meth:`exchange` is one tick of the card without a clock, for pjsua2's conference bridge, which has its own;
    :meth:`capture` and :meth:`play` add the clock for the pyVoIP engine. Thread-safe."""

    def __init__(self, audio_in: Path, audio_out: Path, rate: int, *, echo_gain: float = ECHO_GAIN) -> None:
        """``echo_gain``: of the speaker in the microphone (0: no echo path, as a headset; the benchmark's bare
        SIP clients use that)."""
        world, in_rate = read_wav(audio_in)
        self.echo_gain = echo_gain
        self.rate, self.file_rate = rate, in_rate
        self.dead = not any(world)  # all zeros: a dead or disconnected capsule
        if in_rate != rate:
            world = speech.pcm16(speech.resample(speech.samples(world), in_rate, rate))
        self._world = world
        self._pos = 0
        self._frame = frame_bytes(rate)
        self._echo = bytearray(int(ECHO_DELAY * rate) * 2)  # the speaker's sound on its way to the microphone
        self._lock = threading.Lock()
        self._to_file = Resampler(rate, in_rate)
        self._pacer = Pacer()
        self._last_played = bytes(self._frame)
        self.started: float | None = None  # monotonic time of the card's first tick
        try:
            audio_out.parent.mkdir(parents=True, exist_ok=True)
            self._out: wave.Wave_write | None = wave.open(str(audio_out), "wb")
        except OSError as exc:
            raise RefugeError(f"{audio_out}: cannot write the mock speaker's recording: {exc}") from None
        self._out.setnchannels(1)
        self._out.setsampwidth(2)
        self._out.setframerate(in_rate)
        self.out_path = audio_out
        self.played_frames = 0

    # -- the card, one frame at a time ------------------------------------------------------------------
    def exchange(self, speaker: bytes) -> bytes:
        """One tick of the card: ``speaker`` is what the speaker plays now (written to ``OUT.wav`` and sent down the
        echo path); the result is what the microphone hears now (the world plus the echo). A card plays and
        records at once, so the echo's delay is fixed whatever the callers' timing."""
        size = len(speaker)
        with self._lock:
            if self.started is None:
                self.started = time.monotonic()
            self._echo += speaker
            echo = bytes(self._echo[:size])
            del self._echo[:size]
            out = self._out
            if out is not None:
                pcm = speaker
                out.writeframes(self._to_file(pcm))  # the wave module rewrites the header's sizes on every write: readable at once
                self.played_frames += 1
            if self.dead:
                return bytes(size)
            world = bytearray()
            while len(world) < size:
                take = self._world[self._pos:self._pos + size - len(world)]
                world += take
                self._pos = (self._pos + len(take)) % len(self._world)
        return audioop.add(bytes(world), audioop.mul(echo, 2, self.echo_gain), 2)

    # -- Card (the pyVoIP engine): the speaker's frame is heard on the next capture -------------------------
    def capture(self) -> bytes:
        self._pacer.wait()
        return self.exchange(self._last_played)

    def play(self, pcm: bytes) -> None:
        self._last_played = pcm

    def close(self) -> None:
        with self._lock:
            out, self._out = self._out, None
        if out is not None:
            try:
                out.close()
            except OSError as exc:
                log.warning("mock card: closing %s: %s", self.out_path, exc)


def open_card(sound: Sound, rate: int) -> Card:
    """The card ``sound`` names, for an engine at ``rate`` (the pyVoIP backend; pjsua2 opens ALSA itself)."""
    if sound.mock:
        assert sound.audio_in is not None and sound.audio_out is not None
        return MockCard(sound.audio_in, sound.audio_out, rate)
    if sound.null:
        return NullCard(rate)
    from sip_refuge.post.alsa import AlsaCard  # pyalsaaudio only where a card is used

    return AlsaCard(sound.device, rate)
