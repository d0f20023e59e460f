"""Which sound card a post uses: plain data, no numpy, so that the SIP backends' interface (and
``config check --post`` on a machine without the post's packages) can name it without the audio code."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
