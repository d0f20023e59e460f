"""A real sound card through ALSA, for the pyVoIP backend's audio engine (pjsua2 opens ALSA through pjmedia itself).

The binding is pyalsaaudio (Debian: python3-alsaaudio; PyPI: pyalsaaudio, built against libasound2): a thin,
long-maintained wrapper of alsa-lib's blocking read/write API. That is exactly what a 20 ms frame engine wants
(the card's capture clock paces the engine, one period per frame) with no extra thread, callback or
PortAudio layer in between, as sounddevice would bring. Imported only here, only when a post uses a card.
"""

from __future__ import annotations

import logging

import alsaaudio

from sip_refuge.errors import RefugeError
from sip_refuge.post.sound import FRAME_SECONDS, frame_bytes

log = logging.getLogger(__name__)
PERIODS = 4  # 80 ms of buffer in the card: room for a scheduling hiccup without an overrun


class AlsaCard:
    """``device`` (``default``, ``plughw:1``...) for capture and playback, 16-bit mono at ``rate``, 20 ms periods.
    A ``plug`` device (``default`` is one) converts to what the hardware has."""

    def __init__(self, device: str, rate: int) -> None:
        self.rate, self.device = rate, device
        self._size = frame_bytes(rate)
        period = int(rate * FRAME_SECONDS)
        try:
            self._capture = alsaaudio.PCM(alsaaudio.PCM_CAPTURE, alsaaudio.PCM_NORMAL, channels=1, rate=rate,
                                          format=alsaaudio.PCM_FORMAT_S16_LE, periodsize=period,
                                          periods=PERIODS, device=device)
            self._playback = alsaaudio.PCM(alsaaudio.PCM_PLAYBACK, alsaaudio.PCM_NORMAL, channels=1, rate=rate,
                                           format=alsaaudio.PCM_FORMAT_S16_LE, periodsize=period,
                                           periods=PERIODS, device=device)
        except alsaaudio.ALSAAudioError as exc:
            raise RefugeError(f"sound card {device!r}: {exc} (devices: {', '.join(alsaaudio.pcms())})") from None
        self._pending = b""

    def capture(self) -> bytes:
        while len(self._pending) < self._size:
            length, data = self._capture.read()
            if length < 0:  # an overrun (-EPIPE): alsa-lib has recovered; the lost audio is lost
                log.warning("sound card %s: capture overrun", self.device)
                continue
            self._pending += data
        frame, self._pending = self._pending[:self._size], self._pending[self._size:]
        return frame

    def play(self, pcm: bytes) -> None:
        self._playback.write(pcm)

    def close(self) -> None:
        for pcm in (self._capture, self._playback):
            try:
                pcm.close()
            except alsaaudio.ALSAAudioError as exc:
                log.debug("sound card %s: close: %s", self.device, exc)
