"""The pjsua2 backend's audio: the conference bridge owns the sound card; calls, prompts and the chirp meet there.

Two bridge ports stand for the card: the *speaker* and the *microphone*. With a real card they are pjmedia's sound
device (ALSA) ports, and pjmedia's own echo canceller (speex) sits at the device. With the mock card (``--audio-in``
/ ``--audio-out``) pjsua runs on the null device, whose clock drives the bridge, and one :class:`CardPort` (a
pjsua2 ``AudioMediaPort``) stands in for both, with speexdsp's canceller (:mod:`sip_refuge.post.aec`) in place of
pjmedia's; everything above is the same. Without any card (``null``) the null device's own ports stand in.

What is connected to what:

* a connected call: call -> speaker, microphone -> call;
* prompts: one ``AudioMediaPlayer`` at a time -> speaker, the next when it ends;
* the self-test's ``local`` check: chirp player -> speaker, microphone -> :class:`ListenPort` (the canceller off
  meanwhile, or it would remove the chirp it is meant to hear); the ``call`` check: chirp player -> call ->
  :class:`ListenPort`, and the call is never connected to the speaker or microphone.

Everything here runs on the backend's owner thread (pjsua may only be called from there), except the ports'
``onFrame*`` callbacks, which pjmedia's clock thread calls: they only copy bytes, never call pjsua, and swallow
every error (an exception escaping into the clock thread would take the process down).
"""

from __future__ import annotations

import logging
import tempfile
import wave
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sip_refuge.errors import SipError
from sip_refuge.post import aec, speech
from sip_refuge.post.audio import prompt_path
from sip_refuge.post.sip.pjsua2_api import MediaSettings, pj
from sip_refuge.post.sound import MockCard, frame_bytes
from sip_refuge.post.soundcard import Sound

log = logging.getLogger(__name__)
BRIDGE_RATE = 16000  # the conference bridge's clock (pjsua's default): wideband for G.722


def _format(rate: int) -> Any:
    fmt = pj.MediaFormatAudio()
    fmt.type = pj.PJMEDIA_TYPE_AUDIO
    fmt.clockRate, fmt.channelCount, fmt.frameTimeUsec, fmt.bitsPerSample = rate, 1, 20000, 16
    return fmt


def _release(media: Any) -> None:
    """Free the C++ side of one of our pjsua2 media objects now, while its Python object is whole (owner thread).

    pjmedia's clock thread may be inside one of the object's callbacks, waiting for the GIL. SWIG's destructor
    lets go of the GIL and waits, under the port's lock, for that callback to end; the callback then meets a
    whole object, and none comes after. Left to Python's deallocation, the C++ side would be deleted from inside
    it, and the waiting callback would meet an object half torn down: CI saw an AttributeError from it, and under
    qemu it crashed the post at stop.
    """
    if isinstance(media, (CardPort, ListenPort)):
        media.closed = True
    destroy = getattr(type(media), "__swig_destroy__", None)
    if destroy is not None:
        destroy(media)  # SWIG disowns it: the Python object's own deallocation deletes nothing again


def _put(frame: Any, pcm: bytes) -> None:
    frame.type = pj.PJMEDIA_FRAME_TYPE_AUDIO
    frame.buf = pj.ByteVector(pcm)
    frame.size = len(pcm)


class CardPort(pj.AudioMediaPort):  # type: ignore[misc]  # the SWIG binding ships no types
    """The mock card on the bridge: the bridge's mix for the speaker comes in (every tick, even silence), the
    microphone's frame (echo cancelled unless :attr:`cancel` is off) goes out on the next request."""

    # Closed until __init__ says otherwise, and again while the object is torn down: pjmedia's clock thread can
    # call in while Python clears the instance's attributes (before SWIG's destructor takes the port off the
    # bridge), and must then find the class's value, not an AttributeError.
    closed = True

    def __init__(self, card: MockCard, canceller: aec.EchoCanceller | None) -> None:
        super().__init__()
        self.card, self.canceller = card, canceller
        self.cancel = canceller is not None
        self.closed = False
        self._silence = bytes(frame_bytes(card.rate))
        self._mic = self._silence

    def onFrameReceived(self, frame: Any) -> None:  # noqa: N802 - pjsua2's name; pjmedia's clock thread
        try:
            if self.closed:
                return
            size = int(frame.size)
            speaker = bytes(frame.buf)[:size] if size else self._silence
            speaker = speaker.ljust(len(self._silence), b"\0")[:len(self._silence)]
            heard = self.card.exchange(speaker)
            canceller = self.canceller
            self._mic = canceller.process(heard, speaker) if canceller is not None and self.cancel else heard
        except BaseException:  # noqa: BLE001 - the clock thread's boundary: never let an error into pjmedia
            log.exception("mock card: speaker frame failed")

    def onFrameRequested(self, frame: Any) -> None:  # noqa: N802
        try:
            if not self.closed:
                _put(frame, self._mic)
        except BaseException:  # noqa: BLE001
            log.exception("mock card: microphone frame failed")


class Player(pj.AudioMediaPlayer):  # type: ignore[misc]
    """A WAV player that notes its end (``onEof2`` comes on pjmedia's clock thread: a flag, nothing more)."""

    ended = False

    def onEof2(self) -> None:  # noqa: N802 - pjsua2's name
        self.ended = True


class ListenPort(pj.AudioMediaPort):  # type: ignore[misc]
    """Records what the bridge sends it, up to ``seconds``; :attr:`full` then."""

    closed = True  # as CardPort's: the clock thread may call in while the object is built or torn down

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.limit = int(seconds * BRIDGE_RATE) * 2
        self.heard = bytearray()
        self.closed = False

    @property
    def full(self) -> bool:
        return len(self.heard) >= self.limit

    def onFrameReceived(self, frame: Any) -> None:  # noqa: N802 - pjmedia's clock thread
        try:
            if self.closed or self.full:
                return
            size = int(frame.size)
            self.heard += bytes(frame.buf)[:size] if size else bytes(frame_bytes(BRIDGE_RATE))
        except BaseException:  # noqa: BLE001
            log.exception("self-test listener: frame failed")


@dataclass
class _Check:
    check_id: str
    path: str
    listener: ListenPort
    player: Any
    source: Any  # what the listener records: the microphone or the call


class BridgeAudio:
    """The card, the prompts and the self-test's checks on one pjsua2 Endpoint (owner thread only)."""

    def __init__(self, ep: Any, sound: Sound, media: MediaSettings, post_id: str, prompts_dir: Path | None) -> None:
        self.ep, self.sound, self.media, self.post = ep, sound, media, post_id
        self.prompts_dir = prompts_dir
        self.echo_cancelling = False
        self._card: MockCard | None = None
        self._port: CardPort | None = None
        self._speaker: Any = None
        self._mic: Any = None
        self._prompts: deque[str] = deque()
        self._player: Player | None = None
        self._check: _Check | None = None
        self._calls: list[Any] = []
        self._dir = tempfile.TemporaryDirectory(prefix="sip-refuge-audio-")
        self._chirp = Path(self._dir.name) / "chirp.wav"
        with wave.open(str(self._chirp), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(BRIDGE_RATE)
            w.writeframes(speech.pcm16(speech.check_signal(BRIDGE_RATE)))

    # -- the card -------------------------------------------------------------------------------------
    def open(self) -> None:
        """Choose and open the card (after libInit, before calls)."""
        manager = self.ep.audDevManager()
        if self.sound.mock:
            assert self.sound.audio_in is not None and self.sound.audio_out is not None
            manager.setNullDev()  # its clock drives the bridge; the card port is the card
            self._card = MockCard(self.sound.audio_in, self.sound.audio_out, BRIDGE_RATE)
            canceller = aec.EchoCanceller(BRIDGE_RATE, BRIDGE_RATE // 50, self.media.ec_tail_ms) \
                if aec.available() else None
            self.echo_cancelling = canceller is not None
            self._port = CardPort(self._card, canceller)
            self._port.createPort(f"card-{self.post}", _format(BRIDGE_RATE))
            self._speaker = self._mic = self._port
        elif self.sound.null or manager.getDevCount() == 0:
            manager.setNullDev()
            self._speaker, self._mic = manager.getPlaybackDevMedia(), manager.getCaptureDevMedia()
        else:
            if self.sound.device != "default":
                index = self._device_index(manager, self.sound.device)
                manager.setCaptureDev(index)
                manager.setPlaybackDev(index)
            self.echo_cancelling = self.media.ec_tail_ms > 0
            self._speaker, self._mic = manager.getPlaybackDevMedia(), manager.getCaptureDevMedia()
        log.info("%s: audio on %s, echo canceller %s", self.post, self.sound.describe(),
                 "on" if self.echo_cancelling else "off" if self.sound.null else "MISSING")

    @staticmethod
    def _device_index(manager: Any, name: str) -> int:
        names = []
        for index in range(manager.getDevCount()):
            info = manager.getDevInfo(index)  # kept in a name while read (SWIG)
            names.append(str(info.name))
            if name in names[-1]:
                return index
        raise SipError(f"sound card {name!r} not found (pjmedia sees: {', '.join(names) or 'none'})")

    def close(self) -> None:
        """Stop everything and free the card (before libDestroy)."""
        self.stop_prompts()
        self._end_check()
        self._calls.clear()
        port, self._port = self._port, None
        if port is not None:
            _release(port)  # before the card closes: no frame reaches it after this
        if self._card is not None:
            self._card.close()
            self._card = None
        self._speaker = self._mic = None
        self._dir.cleanup()

    # -- calls ----------------------------------------------------------------------------------------
    def connect(self, media: Any) -> None:
        """A call's audio stream to the speaker and from the microphone."""
        if self._speaker is None:
            return
        media.startTransmit(self._speaker)
        self._mic.startTransmit(media)

    # -- prompts --------------------------------------------------------------------------------------
    def play_prompt(self, name: str) -> None:
        self._prompts.append(str(prompt_path(name, self.prompts_dir)))
        if self._player is None:
            self._next_prompt()

    def stop_prompts(self) -> None:
        self._prompts.clear()
        player, self._player = self._player, None
        if player is not None and self._speaker is not None:
            try:
                player.stopTransmit(self._speaker)
            except pj.Error as exc:
                log.debug("%s: prompt stop: %s", self.post, exc)
        if player is not None:
            _release(player)  # the player leaves the bridge here, on the owner thread

    def _next_prompt(self) -> None:
        ended, self._player = self._player, None
        if ended is not None:
            _release(ended)
        if not self._prompts or self._speaker is None:
            return
        path = self._prompts.popleft()
        player = Player()
        player.createPlayer(path, pj.PJMEDIA_FILE_NO_LOOP)
        player.startTransmit(self._speaker)
        self._player = player

    # -- the self-test's checks -----------------------------------------------------------------------
    def check(self, check_id: str, path: str, call_media: Any, seconds: float) -> None:
        """Start a check (see the module's docstring); :meth:`tick` returns it when it has heard enough."""
        self._end_check()
        source = self._mic if path == "local" else call_media
        sink = self._speaker if path == "local" else call_media
        if source is None or sink is None:
            raise SipError(f"no {'audio device' if path == 'local' else 'call'} to check")
        listener = ListenPort(seconds)
        listener.createPort(f"listen-{check_id}", _format(BRIDGE_RATE))
        player = pj.AudioMediaPlayer()
        player.createPlayer(str(self._chirp), pj.PJMEDIA_FILE_NO_LOOP)
        if path == "local":
            self._echo_cancel(False)  # the canceller would remove the very chirp the microphone must hear
        source.startTransmit(listener)
        player.startTransmit(sink)
        self._check = _Check(check_id, path, listener, player, source)

    def _echo_cancel(self, on: bool) -> None:
        if self._port is not None:
            self._port.cancel = on and self._port.canceller is not None
        elif self.echo_cancelling:
            self.ep.audDevManager().setEcOptions(self.media.ec_tail_ms if on else 0, 0)

    def _end_check(self) -> _Check | None:
        check, self._check = self._check, None
        if check is None:
            return None
        check.listener.closed = True
        for what, target in ((check.source, check.listener),):
            try:
                what.stopTransmit(target)
            except pj.Error as exc:  # the call went away under the check
                log.debug("%s: check %s: %s", self.post, check.check_id, exc)
        _release(check.listener)  # what it heard stays readable: a Python attribute
        if check.path == "local":
            self._echo_cancel(True)
        return check

    def call_gone(self, media: Any) -> None:
        """A call's stream is going away: a check listening to it has heard all it will."""
        check = self._check
        if check is not None and check.source is media:
            check.listener.limit = len(check.listener.heard)

    def tick(self) -> tuple[str, int, bytes] | None:
        """Prompts in turn, and a check that has heard enough: (check id, rate, what it heard)."""
        if self._player is not None and self._player.ended:
            self._next_prompt()
        check = self._check
        if check is not None and check.listener.full:
            self._end_check()
            return check.check_id, BRIDGE_RATE, bytes(check.listener.heard)
        return None
