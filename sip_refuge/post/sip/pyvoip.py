"""The pyVoIP SIP backend of the post: pure Python, PCMU/PCMA + RFC 4733 DTMF over UDP, no TLS or SRTP.

Built on pyVoIP 1.6.8's SIP parser and RTP client through :mod:`.pyvoip_ua`, which explains why pyVoIP's own
``VoIPPhone`` is not used (among other things: the ~1 s late ANSWERED came from its ``Timer(1, ...)`` hand-off
of incoming INVITEs, and its ACKs made Asterisk drop every call after 32 s).

The sound card belongs to :class:`~sip_refuge.post.engine.AudioEngine` (8 kHz, 20 ms frames, speexdsp's echo
canceller): a connected call's RTP is carried to and from it, prompts and the self-test's chirp play through it.
A self-test call is never connected to the card; :meth:`Backend.check_audio` uses it.

SIP runs on the agent's one thread (created in :meth:`Backend.start`, joined in :meth:`Backend.stop`); its
callbacks only build an event and call ``emit``. Timing policy (how long the PBX may stay silent, how long a
silence on the media is dead) is the machine's: this backend reports facts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sip_refuge.errors import SipError
from sip_refuge.post.audio import prompt_pcm
from sip_refuge.post.engine import AudioEngine
from sip_refuge.post.events import (
    AudioHeard,
    CallAnswered,
    CallEnded,
    CallFailed,
    CallProbed,
    CallProgress,
    IncomingCall,
    MediaResumed,
    MediaStalled,
    Registered,
    RegistrationFailed,
    Unregistered,
)
from sip_refuge.post.sip import Account, Emit, Health
from sip_refuge.post.sip.guard import Counters, local_address_for, pbx_addresses
from sip_refuge.post.sip.pyvoip_ua import Call, Prefixed, Ua
from sip_refuge.post.sound import open_card

log = logging.getLogger(__name__)
RATE = 8000  # G.711's rate: the engine runs at the codec's rate, so no resampling between card and RTP


class Backend:
    """:class:`sip_refuge.post.sip.SipBackend` on pyVoIP."""

    def __init__(self) -> None:
        self.media_gap = 1.0  # s without RTP on an answered call -> MediaStalled (and MediaResumed when it is back)
        self.refresh_interval = 15.0  # s at most between REGISTERs (a restarted PBX has us back within it)
        self.on_dtmf: Callable[[str, str], None] | None = None  # (call_id, digit), called on the RTP thread
        self._ua: Ua | None = None
        self._engine: AudioEngine | None = None
        self._emit: Emit | None = None
        self._account: Account | None = None
        self._log: Prefixed = Prefixed(log, {"who": "post ?"})
        self._calls: dict[str, Call] = {}  # by the machine's call id
        self._selftests: set[str] = set()  # calls to the echo extension: never connected to the card
        self._prompts: dict[str, bytes] = {}
        self._counters = Counters(self._log)

    # -- SipBackend -------------------------------------------------------------------------------------
    def start(self, account: Account, emit: Emit) -> None:
        if account.pbx.transport != "udp":
            raise SipError(f"post {account.post.id}: the pyVoIP backend speaks SIP over UDP only (no TLS, no SRTP, "
                           f"no TCP) but pbx.transport is {account.pbx.transport!r}; use sip_backend: pjsua2 "
                           "for this post")
        if self._ua is not None:
            raise SipError(f"post {account.post.id}: the pyVoIP backend is already started")
        self._account, self._emit = account, emit
        self._log = Prefixed(log, {"who": f"post {account.post.id}"})
        self._counters = Counters(self._log)
        pbx = account.pbx
        # SIP and RTP only on the address that routes to the PBX, and only from the PBX's addresses.
        trusted = pbx_addresses(pbx, self._log)
        host = local_address_for(pbx.host, pbx.sip_port)
        sound = account.sound
        self._engine = AudioEngine(lambda: open_card(sound, RATE), RATE, name=account.post.id)
        self._engine.start()
        self._ua = Ua(user=account.post.id, password=account.password, server=(pbx.host, pbx.sip_port),
                      listener=self, display=account.post.name, local_port=account.local_port,
                      name=account.post.id, refresh_interval=self.refresh_interval, keep_audio=True,
                      media_gap=self.media_gap, on_dtmf=self._on_dtmf, logger=self._log,
                      host=host, trusted=trusted, counters=self._counters)
        self._log.info("pyVoIP agent on %s:%d registering to %s:%d; %s, echo canceller %s", self._ua.host,
                       self._ua.port, account.pbx.host, account.pbx.sip_port, sound.describe(),
                       "on" if self._engine.echo_cancelling else "MISSING")
        self._ua.start()

    def dial(self, call_id: str, extension: str, host: str, selftest: bool) -> None:
        ua = self._need()
        self._log.info("call %s: dialling %s at %s%s", call_id, extension, host, " (self-test)" if selftest else "")
        if selftest:
            self._selftests.add(call_id)
        self._calls[call_id] = ua.dial(extension, host, key=call_id)

    def answer(self, call_id: str) -> None:
        self._on_call(call_id, "answer", lambda ua, call: ua.answer_now(call))

    def reject(self, call_id: str, status: int) -> None:
        self._on_call(call_id, f"reject {status}", lambda ua, call: ua.reject_now(call, status))

    def hangup(self, call_id: str) -> None:
        self._on_call(call_id, "hang up", lambda ua, call: ua.hangup_now(call))
        self._forget(call_id)

    def send_dtmf(self, call_id: str, digits: str) -> None:
        call = self._calls.get(call_id)
        if call is not None:
            self._log.info("call %s: sending DTMF %s", call_id, digits)
            call.rtp.send_dtmf(digits)

    def play_prompt(self, name: str) -> None:
        engine, account = self._engine, self._account
        if engine is None or account is None:
            return
        if name not in self._prompts:
            self._prompts[name] = prompt_pcm(name, account.prompts_dir, RATE)
        engine.play(self._prompts[name])

    def stop_prompts(self) -> None:
        if self._engine is not None:
            self._engine.stop_prompts()

    def check_audio(self, check_id: str, path: str, call_id: str | None, seconds: float) -> None:
        engine = self._engine
        call = self._calls.get(call_id) if call_id else None
        if engine is None or (path == "call" and (call is None or call.state != "confirmed")):
            self._log.warning("check %s: nothing to check on (%s)", check_id, "no call" if engine else "no audio")
            self._send(AudioHeard(check_id, RATE))
            return
        self._log.info("check %s: chirp on the %s path", check_id, path)
        engine.check(check_id, path, call.rtp if call is not None else None, seconds,
                     lambda cid, rate, pcm: self._send(AudioHeard(cid, rate, pcm)))

    def probe(self, call_id: str) -> None:
        ua, call = self._ua, self._calls.get(call_id)
        if ua is None or call is None:
            self._send(CallProbed(call_id, None))  # a call we no longer have is no call at all
            return
        ua.post(lambda: ua.probe_now(call, lambda status: self._probed(call_id, status)))

    def _probed(self, call_id: str, status: int | None) -> None:
        if status is None:
            self._log.warning("call %s: the PBX did not answer a probe", call_id)
        self._send(CallProbed(call_id, status))

    def health(self) -> Health:
        ua, engine = self._ua, self._engine
        problem = (ua.health() if ua is not None else "") or (engine.health() if engine is not None else "")
        return Health(not problem, problem, self._counters.snapshot())

    def stop(self) -> None:
        ua, self._ua = self._ua, None
        engine, self._engine = self._engine, None
        if ua is not None:
            ua.stop()
        if engine is not None:
            engine.stop()
        self._calls.clear()
        self._selftests.clear()
        if ua is not None:
            self._log.info("pyVoIP agent stopped")

    # -- helpers ----------------------------------------------------------------------------------------
    def _need(self) -> Ua:
        if self._ua is None:
            raise SipError("the pyVoIP backend is not started")
        return self._ua

    def _on_call(self, call_id: str, what: str, action: Callable[[Ua, Call], None]) -> None:
        ua, call = self._ua, self._calls.get(call_id)
        if ua is None or call is None:
            return  # a call we no longer know: the Protocol makes this a no-op
        self._log.info("call %s: %s", call_id, what)
        ua.post(lambda: action(ua, call))

    def _forget(self, call_id: str) -> None:
        call = self._calls.pop(call_id, None)
        self._selftests.discard(call_id)
        if call is not None and self._engine is not None:
            self._engine.disconnect(call.rtp)

    def _send(self, event: Any) -> None:
        if self._emit is not None:
            self._emit(event)

    def _on_dtmf(self, call: Call, digit: str) -> None:
        if self.on_dtmf is not None:  # RTP thread: tests get the digit at once
            self.on_dtmf(call.key, digit)

    # -- UaListener (agent thread) ----------------------------------------------------------------------
    def on_registered(self, expires: int) -> None:
        self._log.debug("registered for %d s", expires)
        self._send(Registered(self._account.pbx.host if self._account else ""))

    def on_registration_failed(self, reason: str, status: int | None) -> None:
        self._log.warning("registration failed: %s", reason)
        self._send(RegistrationFailed(reason, status))

    def on_unregistered(self, reason: str) -> None:
        self._log.warning("registration lost: %s", reason)
        self._send(Unregistered(reason))

    def on_progress(self, call: Call, status: int) -> None:
        self._log.info("call %s: %d", call.key, status)
        self._send(CallProgress(call.key, status))

    def on_answered(self, call: Call) -> None:
        self._log.info("call %s: answered", call.key)
        if call.key not in self._selftests and self._engine is not None:
            self._engine.connect(call.rtp)
        self._send(CallAnswered(call.key))

    def on_failed(self, call: Call, status: int | None, reason: str) -> None:
        self._log.warning("call %s: failed: %s", call.key, reason)
        self._forget(call.key)
        self._send(CallFailed(call.key, status, reason))

    def on_ended(self, call: Call, reason: str) -> None:
        self._log.info("call %s: ended by the far end (%s)", call.key, reason)
        self._forget(call.key)
        self._send(CallEnded(call.key, reason))

    def on_incoming(self, call: Call) -> None:
        self._log.info("call %s: incoming from %s", call.key, call.caller)
        self._calls[call.key] = call
        self._send(IncomingCall(call.key, call.caller))

    def on_media_stalled(self, call: Call) -> None:
        self._log.warning("call %s: no RTP for %.1f s", call.key, self.media_gap)
        self._send(MediaStalled(call.key))

    def on_media_resumed(self, call: Call) -> None:
        self._log.info("call %s: RTP again", call.key)
        self._send(MediaResumed(call.key))
