"""The pyVoIP SIP backend of the post: pure Python, PCMU/PCMA + RFC 4733 DTMF over UDP, no TLS or SRTP.

Built on pyVoIP 1.6.8's SIP parser and RTP client through :mod:`.pyvoip_ua`, which explains why pyVoIP's own
``VoIPPhone`` is not used (among other things: the ~1 s late ANSWERED came from its ``Timer(1, ...)`` hand-off
of incoming INVITEs, and its ACKs made Asterisk drop every call after 32 s).

Everything here runs on the agent's one thread (created in :meth:`Backend.start`, joined in
:meth:`Backend.stop`); its callbacks only build an event and call ``emit``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from sip_refuge.errors import SipError
from sip_refuge.post.events import (
    CallAnswered,
    CallEnded,
    CallFailed,
    CallProbed,
    CallProgress,
    IncomingCall,
    MediaTimeout,
    Registered,
    RegistrationFailed,
    SelfTestResult,
    Unregistered,
)
from sip_refuge.post.sip import Account, Emit, Health
from sip_refuge.post.sip.guard import Counters, local_address_for, pbx_addresses
from sip_refuge.post.sip.pyvoip_ua import Call, Prefixed, Ua

log = logging.getLogger(__name__)

SELFTEST_START = 0.3  # s after answer before the digits go: Echo() is running by then
SELFTEST_TIMEOUT = 6.0  # s for the digits to come back


class Backend:
    """:class:`sip_refuge.post.sip.SipBackend` on pyVoIP."""

    def __init__(self) -> None:
        self.media_timeout = 20.0  # s without RTP on an answered call -> MediaTimeout
        self.refresh_interval = 15.0  # s at most between REGISTERs (a restarted PBX has us back within it)
        self.on_dtmf: Callable[[str, str], None] | None = None  # (call_id, digit), called on the RTP thread
        self._ua: Ua | None = None
        self._emit: Emit | None = None
        self._account: Account | None = None
        self._log: Prefixed = Prefixed(log, {"who": "post ?"})
        self._calls: dict[str, Call] = {}  # by the machine's call id
        self._selftests: dict[str, _SelfTest] = {}
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
        self._ua = Ua(user=account.post.id, password=account.password, server=(pbx.host, pbx.sip_port),
                      listener=self, display=account.post.name, local_port=account.local_port,
                      name=account.post.id, refresh_interval=self.refresh_interval,
                      media_timeout=self.media_timeout, on_dtmf=self._on_dtmf, logger=self._log,
                      host=host, trusted=trusted, counters=self._counters)
        self._log.info("pyVoIP agent on %s:%d registering to %s:%d", self._ua.host, self._ua.port,
                       account.pbx.host, account.pbx.sip_port)
        self._ua.start()

    def dial(self, call_id: str, extension: str, host: str, selftest: bool) -> None:
        ua = self._need()
        self._log.info("call %s: dialling %s at %s%s", call_id, extension, host, " (self-test)" if selftest else "")
        call = ua.dial(extension, host, key=call_id)
        self._calls[call_id] = call
        if selftest:
            self._selftests[call_id] = _SelfTest(self._account.selftest_digits if self._account else "1379")

    def answer(self, call_id: str) -> None:
        self._on_call(call_id, "answer", lambda ua, call: ua.answer_now(call))

    def reject(self, call_id: str, status: int) -> None:
        self._on_call(call_id, f"reject {status}", lambda ua, call: ua.reject_now(call, status))

    def hangup(self, call_id: str) -> None:
        self._on_call(call_id, "hang up", lambda ua, call: ua.hangup_now(call))
        self._calls.pop(call_id, None)
        self._selftests.pop(call_id, None)

    def send_dtmf(self, call_id: str, digits: str) -> None:
        call = self._calls.get(call_id)
        if call is not None:
            self._log.info("call %s: sending DTMF %s", call_id, digits)
            call.rtp.send_dtmf(digits)

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
        ua = self._ua
        problem = ua.health() if ua is not None else ""
        return Health(not problem, problem, self._counters.snapshot())

    def stop(self) -> None:
        ua, self._ua = self._ua, None
        if ua is None:
            return
        ua.stop()
        self._calls.clear()
        self._selftests.clear()
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

    def _send(self, event: Any) -> None:
        if self._emit is not None:
            self._emit(event)

    def _on_dtmf(self, call: Call, digit: str) -> None:
        # RTP thread: hand the digit to the agent's thread for the self-test; tests get it at once.
        if self.on_dtmf is not None:
            self.on_dtmf(call.key, digit)
        ua = self._ua
        if ua is not None and call.key in self._selftests:
            ua.post(lambda: self._selftest_heard(call, digit))

    # -- self-test (agent thread) -----------------------------------------------------------------------
    def _selftest_begin(self, call: Call) -> None:
        test = self._selftests.get(call.key)
        if test is None or call.state != "confirmed":
            return
        test.sent_at = time.monotonic()
        call.rtp.send_dtmf(test.digits)
        self._need().call_later(SELFTEST_TIMEOUT, lambda: self._selftest_done(call, False))

    def _selftest_heard(self, call: Call, digit: str) -> None:
        test = self._selftests.get(call.key)
        if test is None or not test.sent_at:
            return
        test.heard += digit
        if test.digits in test.heard:
            self._selftest_done(call, True)

    def _selftest_done(self, call: Call, passed: bool) -> None:
        test = self._selftests.pop(call.key, None)
        if test is None:
            return
        detail = (f"echo returned {test.digits} in {time.monotonic() - test.sent_at:.2f} s" if passed
                  else f"sent {test.digits}, heard {test.heard or 'nothing'} within {SELFTEST_TIMEOUT:.0f} s")
        self._log.info("call %s: self-test %s: %s", call.key, "passed" if passed else "FAILED", detail)
        self._send(SelfTestResult(call.key, passed, detail))
        self._calls.pop(call.key, None)
        self._need().hangup_now(call)

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
        self._send(CallAnswered(call.key))
        if call.key in self._selftests:
            self._need().call_later(SELFTEST_START, lambda: self._selftest_begin(call))

    def on_failed(self, call: Call, status: int | None, reason: str) -> None:
        self._log.warning("call %s: failed: %s", call.key, reason)
        self._calls.pop(call.key, None)
        self._send(CallFailed(call.key, status, reason))
        if self._selftests.pop(call.key, None) is not None:
            self._send(SelfTestResult(call.key, False, f"self-test call failed: {reason}"))

    def on_ended(self, call: Call, reason: str) -> None:
        self._log.info("call %s: ended by the far end (%s)", call.key, reason)
        self._calls.pop(call.key, None)
        if self._selftests.pop(call.key, None) is not None:
            self._send(SelfTestResult(call.key, False, f"self-test call ended early ({reason})"))
        self._send(CallEnded(call.key, reason))

    def on_incoming(self, call: Call) -> None:
        self._log.info("call %s: incoming from %s", call.key, call.caller)
        self._calls[call.key] = call
        self._send(IncomingCall(call.key, call.caller))

    def on_media_timeout(self, call: Call) -> None:
        self._log.warning("call %s: no RTP for %.0f s", call.key, self.media_timeout)
        self._send(MediaTimeout(call.key))


class _SelfTest:
    def __init__(self, digits: str) -> None:
        self.digits = digits
        self.heard = ""
        self.sent_at = 0.0
