"""Known signals and WAV files for speech tests and the speech benchmark.

:func:`babble` is a stand-in for a voice that a test can recognise anywhere: band-limited noise (300-3400 Hz,
inside G.711's band) in syllable-long bursts with pauses. Noise has one sharp correlation peak, so the delay is
found exactly; the bursts give the echo canceller and the jitter buffer the stop-and-go of real speech. Two seeds
give two unrelated voices (the caller's and the operator's).
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

from sip_refuge.post import speech
from sip_refuge.post.speech import Samples


def babble(seconds: float, rate: int, seed: int, level: float = 0.25) -> Samples:
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / rate)
    spectrum[(freqs < 300) | (freqs > 3400)] = 0
    noise = np.fft.irfft(spectrum, n)
    noise /= np.sqrt(np.mean(noise ** 2))
    envelope = np.zeros(n)
    t = 0
    while t < n:
        burst = int(rng.uniform(0.12, 0.35) * rate)
        gap = int(rng.uniform(0.04, 0.2) * rate)
        ramp = np.sin(np.linspace(0, np.pi, max(1, min(burst, n - t))))
        envelope[t:t + len(ramp)] = ramp * rng.uniform(0.5, 1.0)
        t += burst + gap
    return np.clip(noise * envelope * level, -0.99, 0.99)


def write_wav(path: Path, x: Samples, rate: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(speech.pcm16(x))
    return path


def read_wav(path: Path) -> tuple[Samples, int]:
    """A mono 16-bit WAV as floats (also one still being written: the header is current)."""
    with wave.open(str(path), "rb") as w:
        rate = w.getframerate()
        data = w.readframes(w.getnframes())
    return speech.samples(data[: len(data) // 2 * 2]), rate


def wav_seconds(path: Path) -> float:
    try:
        with wave.open(str(path), "rb") as w:
            return w.getnframes() / w.getframerate()
    except (OSError, EOFError, wave.Error):
        return 0.0


def at_rate(x: Samples, rate: int, to: int) -> Samples:
    return speech.resample(x, rate, to)


def chirp_found(rate: int, pcm: bytes) -> speech.Match:
    """How clearly a check's recording holds the self-test's chirp."""
    if not rate or not pcm:
        return speech.Match(0.0, 0.0, -120.0, -120.0, 0)
    return speech.match(speech.test_signal(rate), speech.samples(pcm), rate, segment=speech.CHECK_SEGMENT)
