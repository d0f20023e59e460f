"""What was heard: pure analysis of audio for the self-test, the speech tests and the speech benchmark.

No I/O, clocks or threads: arrays in, numbers out. Samples are 16-bit signed linear (``bytes`` in native order, as
``audioop`` and the sound cards use them, or numpy arrays).

:func:`match` finds a known signal in a recording by normalised cross-correlation. It cuts the reference into
segments of about a second and finds each one separately: a jitter buffer that slips by a frame in the middle of a
recording (a loaded 2-core post does that) shifts the later segments, which a single correlation over the whole
signal would smear into two half-height peaks. The result is the median over segments, so one garbled second does
not decide, and a silent or unrelated stream scores near 0 (a normalised peak of 1.0 is a perfect copy at any
level).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Samples = npt.NDArray[np.float64]
SILENCE_DBFS = -70.0  # quieter than this is no signal at all: its correlation is not computed (it would be noise)
TEST_SIGNAL_SECONDS = 1.0
CHECK_LEAD = 0.3  # s of silence a check plays before the chirp: the far end's media path is up by then
CHECK_SEGMENT = 0.5  # s: a check is judged in halves, so one slip of a jitter buffer mid-chirp does not fail it


def samples(pcm: bytes | npt.NDArray[np.int16]) -> Samples:
    """16-bit samples as floats in [-1, 1)."""
    raw = np.frombuffer(pcm, dtype=np.int16) if isinstance(pcm, bytes | bytearray) else np.asarray(pcm)
    return raw.astype(np.float64) / 32768.0


def pcm16(x: Samples) -> bytes:
    """Floats in [-1, 1) as 16-bit samples (clipped)."""
    return bytes(np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16).tobytes())


def level_dbfs(x: Samples) -> float:
    """RMS level relative to full scale; -inf dB is returned as -120."""
    if len(x) == 0:
        return -120.0
    rms = math.sqrt(float(np.mean(x * x)))
    return 20 * math.log10(rms) if rms > 1e-6 else -120.0


def resample(x: Samples, rate: int, to: int) -> Samples:
    """Band-limited resampling (FFT): exact for the signals compared here, cheap for seconds of audio."""
    if rate == to or len(x) == 0:
        return x
    n = int(round(len(x) * to / rate))
    spectrum = np.fft.rfft(x)
    keep = n // 2 + 1
    if keep <= len(spectrum):
        spectrum = spectrum[:keep]
    else:
        spectrum = np.concatenate([spectrum, np.zeros(keep - len(spectrum), dtype=spectrum.dtype)])
    return np.fft.irfft(spectrum, n) * (n / len(x))


def test_signal(rate: int) -> Samples:
    """The self-test's sound: a one-second logarithmic chirp, 400 Hz to 3 kHz (inside every codec's band, G.711
    included), at half scale with 20 ms fades. A chirp has one sharp correlation peak, however the room or the
    codec colours it, and is not speech, so nobody nearby takes it for a voice."""
    n = int(rate * TEST_SIGNAL_SECONDS)
    t = np.arange(n) / rate
    f0, f1 = 400.0, 3000.0
    k = math.log(f1 / f0) / TEST_SIGNAL_SECONDS
    phase = 2 * math.pi * f0 * (np.exp(k * t) - 1) / k
    fade = np.minimum(1.0, np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.02 * rate))
    return 0.5 * np.sin(phase) * fade


def check_signal(rate: int) -> Samples:
    """What a self-test check plays: :data:`CHECK_LEAD` of silence, then :func:`test_signal`."""
    return np.concatenate([np.zeros(int(CHECK_LEAD * rate)), test_signal(rate)])


@dataclass(frozen=True)
class Match:
    """How well a recording holds a reference signal.

    ``correlation``: the median normalised correlation peak over the reference's segments, 0..1 (0 also when the
    recording is silent). ``delay``: seconds from the start of the recording to where the reference starts in it
    (the median over segments). ``gain_db``: the level of the reference's copy in the recording relative to the
    reference itself (-10 dB: a third of its amplitude). ``level_dbfs``: the recording's own RMS level.
    ``segments``: how many were compared."""

    correlation: float
    delay: float
    gain_db: float
    level_dbfs: float
    segments: int

    def describe(self) -> str:
        return (f"correlation {self.correlation:.2f}, delay {self.delay * 1000:.0f} ms, gain {self.gain_db:.1f} dB, "
                f"level {self.level_dbfs:.0f} dBFS")


def _correlate(ref: Samples, rec: Samples) -> tuple[int, float, float]:
    """(lag, normalised peak, gain) of ``ref`` inside ``rec`` (len(rec) >= len(ref))."""
    n, m = len(ref), len(rec)
    size = 1 << (n + m - 1).bit_length()
    num = np.fft.irfft(np.fft.rfft(rec, size) * np.conj(np.fft.rfft(ref, size)), size)[: m - n + 1]
    energy = np.concatenate([[0.0], np.cumsum(rec * rec)])
    windows = energy[n:] - energy[: m - n + 1]
    ref_energy = float(np.dot(ref, ref))
    floor = n * 10 ** (SILENCE_DBFS / 10)
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = np.where(windows > floor, num / np.sqrt(np.maximum(windows, floor) * ref_energy), 0.0)
    lag = int(np.argmax(norm))
    gain = float(num[lag]) / ref_energy if ref_energy > 0 else 0.0
    return lag, float(norm[lag]), gain


def match(reference: Samples, recording: Samples, rate: int, *, segment: float | None = 1.0,
          skip_quiet: bool = True) -> Match:
    """Find ``reference`` in ``recording`` (both at ``rate``); see :class:`Match`.

    ``segment``: seconds per segment (None: the whole reference at once). Segments of the reference that are
    (nearly) silent say nothing and are skipped when ``skip_quiet``."""
    level = level_dbfs(recording)
    size = len(reference) if segment is None else max(1, int(segment * rate))
    found: list[tuple[float, float, float]] = []
    for start in range(0, max(1, len(reference) - size + 1), size):
        part = reference[start:start + size]
        if len(part) == 0 or (skip_quiet and level_dbfs(part) < -45.0):
            continue
        if len(recording) < len(part):
            found.append((0.0, 0.0, 0.0))
            continue
        lag, peak, gain = _correlate(part, recording)
        found.append((peak, (lag - start) / rate, gain))
    if not found:
        return Match(0.0, 0.0, -120.0, level, 0)
    peaks = sorted(found)
    middle = peaks[len(peaks) // 2]
    gain = middle[2]
    return Match(middle[0], middle[1], 20 * math.log10(gain) if gain > 1e-6 else -120.0, level, len(found))
