"""The pjsua2 backend's calls: placing, answering, probing and ending them, and pjsua's call callbacks.

:class:`CallHandling` is a part of :class:`~sip_refuge.post.sip.pjsua2.Backend` (its methods run on the
backend's owner thread only, as every pjsua call must): the per-call records, the commands on a call, and
what pjsua reports about one (state, transactions, media, digits) turned into the machine's events. A
callback only updates its record and emits; anything that needs pjsua again is enqueued (``_internal``).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sip_refuge.errors import SipError
from sip_refuge.post import events as ev
from sip_refuge.post.sip import Account, Emit
from sip_refuge.post.sip import pjsua2_api as api
from sip_refuge.post.sip.guard import Counters, Gate
from sip_refuge.post.sip.pjsua2_api import pj
from sip_refuge.post.sip.pjsua2_audio import BridgeAudio

log = logging.getLogger("sip_refuge.post.sip.pjsua2")  # one logger for the backend, whichever part speaks

Command = Callable[[], None]


@dataclass
class CallRecord:
    """What the backend knows about one call. Callbacks and commands both run on the owner thread; the
    lock around the call table is for the runner-side look-ups only."""

    call_id: str
    outgoing: bool
    selftest: bool = False
    call: Any = None
    progress: int = 0
    responded: bool = False  # any response to our INVITE, 100 Trying included: the PBX is alive
    answered: bool = False
    media_up: bool = False
    finished: bool = False
    local_hangup: bool = False
    created: float = 0.0
    media: Any = None  # the call's audio stream on the bridge, once it has one
    # silent media
    rx_packets: int | None = None
    rx_changed: float = 0.0
    stalled: bool = False
    probing: bool = False  # an OPTIONS of ours is out in this call's dialog


def guarded(backend: CallHandling, what: str, run: Callable[[], None]) -> None:
    """Run a callback body; an exception escaping into pjsip's C code would abort the process."""
    try:
        run()
    except Exception:  # noqa: BLE001 - thread boundary (pjsip's thread): log, count and keep the post alive
        backend._counters.count("errors", "%s: pjsua2 callback %s failed", backend._post, what, exc_info=True)


class PjCall(pj.Call):  # type: ignore[misc]  # the SWIG binding ships no types
    """A pjsua2 Call whose callbacks report to the backend."""

    def __init__(self, backend: CallHandling, record: CallRecord, account: Any, pj_call_id: int = -1) -> None:
        super().__init__(account, pj_call_id)
        self.backend, self.record = backend, record

    def onCallState(self, prm: Any) -> None:  # noqa: N802 - pjsua2's name
        guarded(self.backend, "onCallState", lambda: self.backend._on_call_state(self.record, self, prm))

    def onCallTsxState(self, prm: Any) -> None:  # noqa: N802
        guarded(self.backend, "onCallTsxState", lambda: self.backend._on_tsx_state(self.record, prm))

    def onCallMediaState(self, prm: Any) -> None:  # noqa: N802
        guarded(self.backend, "onCallMediaState", lambda: self.backend._on_media_state(self.record))

    def onDtmfDigit(self, prm: Any) -> None:  # noqa: N802
        guarded(self.backend, "onDtmfDigit", lambda: self.backend._on_dtmf(self.record, str(prm.digit)))


class CallHandling:
    """The calls of a :class:`~sip_refuge.post.sip.pjsua2.Backend` (owner thread only)."""

    # Set up by the Backend.
    media_gap: float
    on_dtmf: Callable[[str, str], None] | None
    _account: Account | None
    _accounts: dict[str, Any]
    _audio: BridgeAudio | None
    _calls: dict[str, CallRecord]
    _counters: Counters
    _emit: Emit
    _ep: Any
    _gate: Gate | None
    _incoming_ids: itertools.count[int]
    _lock: threading.Lock
    _post: str
    _queue: queue.Queue[object]

    def _check_media(self, rec: CallRecord, now: float) -> None:
        count = api.rx_packets(rec.call)
        if count is None:  # no audio stream (re-INVITE in progress): judge it on the next tick
            return
        if count != rec.rx_packets:
            rec.rx_packets, rec.rx_changed = count, now
            if rec.stalled:
                rec.stalled = False
                log.info("%s: RTP on call %s again", self._post, rec.call_id)
                self._emit(ev.MediaResumed(rec.call_id))
        elif now - rec.rx_changed >= self.media_gap and not rec.stalled:
            rec.stalled = True
            log.warning("%s: no RTP on call %s for %.1f s", self._post, rec.call_id, now - rec.rx_changed)
            self._emit(ev.MediaStalled(rec.call_id))

    def _check_audio(self, check_id: str, path: str, call_id: str | None, seconds: float) -> None:
        rec = self._record(call_id) if call_id else None
        if rec is not None and not rec.finished and rec.media is None and rec.call is not None:
            rec.media = api.call_audio(rec.call)  # answered before its media callback was handled
        media = rec.media if rec is not None and not rec.finished else None
        try:
            if self._audio is None or (path == "call" and media is None):
                raise SipError("no call audio to check" if self._audio else "no audio")
            self._audio.check(check_id, path, media, seconds)
            log.info("%s: check %s: chirp on the %s path", self._post, check_id, path)
        except (SipError, pj.Error) as exc:
            log.warning("%s: check %s cannot run: %s", self._post, check_id, exc)
            self._emit(ev.AudioHeard(check_id, 0))

    def _dial(self, call_id: str, extension: str, host: str, selftest: bool) -> None:
        account = self._account
        assert account is not None
        port, suffix = api.pbx_port(account.pbx)
        uri = f"sip:{extension}@{host}:{port}{suffix}"
        rec = CallRecord(call_id, outgoing=True, selftest=selftest, created=time.monotonic())
        # The account of the PBX the call goes to: its From and Contact are the registration that PBX knows.
        acc = self._accounts.get(host) or self._accounts[account.pbx.host]
        rec.call = PjCall(self, rec, acc)
        with self._lock:
            self._calls[call_id] = rec  # before makeCall: its first callbacks may come before it returns
        log.info("%s: dialling %s (call %s%s)", self._post, uri, call_id, ", self-test" if selftest else "")
        try:
            rec.call.makeCall(uri, api.call_op())
        except Exception as exc:  # noqa: BLE001 - pj.Error (bad URI, too many calls) or worse: the machine needs CallFailed
            log.warning("%s: call %s could not start: %s", self._post, call_id, exc)
            self._finish(rec, ev.CallFailed(call_id, None, f"cannot place call: {exc}"))

    def _answer(self, call_id: str, status: int) -> None:
        rec = self._record(call_id)
        if rec is None or rec.outgoing or rec.finished:
            log.info("%s: no ringing call %s to answer with %d", self._post, call_id, status)
            return
        if status >= 300:
            rec.local_hangup = True
        rec.call.answer(api.call_op(status))

    def _hangup(self, call_id: str, reason: str) -> None:
        rec = self._record(call_id)
        if rec is None or rec.finished:
            return
        log.info("%s: hanging up call %s (%s)", self._post, call_id, reason)
        self._end_call(rec)

    def _end_call(self, rec: CallRecord) -> None:
        # pjsua may report DISCONNECTED from inside hangup(), on this same thread: mark the record first.
        rec.local_hangup = True
        try:
            rec.call.hangup(api.call_op())
        except Exception as exc:  # noqa: BLE001 - a call already going away raises; it ends either way
            log.info("%s: hangup of %s: %s", self._post, rec.call_id, exc)

    def _send_dtmf(self, call_id: str, digits: str) -> None:
        rec = self._record(call_id)
        if rec is None or not rec.answered or rec.finished:
            log.warning("%s: no established call %s for DTMF", self._post, call_id)
            return
        rec.call.dialDtmf(digits)  # RFC 4733 events on the RTP stream

    def _connect_audio(self, rec: CallRecord) -> None:
        if rec.finished or self._ep is None or self._audio is None:
            return
        media = api.call_audio(rec.call)
        if media is None or media is rec.media:
            return
        rec.media = media
        if not rec.selftest:  # the echo call carries only the self-test's chirp
            self._audio.connect(media)

    def _forget(self, rec: CallRecord) -> None:
        with self._lock:
            if self._calls.get(rec.call_id) is rec:
                del self._calls[rec.call_id]
        rec.call = None  # the pjsua2 Call is destroyed here, on the owner thread

    def _record(self, call_id: str) -> CallRecord | None:
        with self._lock:
            return self._calls.get(call_id)

    def _internal(self, command: Command) -> None:
        command._internal = True  # type: ignore[attr-defined]
        self._queue.put(command)

    def _on_incoming(self, acc: Any, pj_call_id: int, source: str, message: str) -> None:
        head, _, body = message.partition("\r\n\r\n")
        request_line = head.split("\r\n", 1)[0].split()
        uri = request_line[1] if len(request_line) == 3 else ""
        if self._gate is None or self._gate.refuse_callback(source, uri, body) is not None:
            self._refuse(acc, pj_call_id)  # before the runner (and its auto-answer policy) hears of it
            return
        rec = CallRecord(f"in-{next(self._incoming_ids)}", outgoing=False, created=time.monotonic())
        rec.call = PjCall(self, rec, acc, pj_call_id)
        caller = api.remote_uri(rec.call)
        with self._lock:
            self._calls[rec.call_id] = rec
        log.info("%s: incoming call %s from %s", self._post, rec.call_id, caller)
        self._internal(lambda: self._send_ringing(rec))
        self._emit(ev.IncomingCall(rec.call_id, caller))

    def _refuse(self, acc: Any, pj_call_id: int) -> None:
        # Kept as a finished record until pjsua reports it gone: dropping a live pjsua2 Call hangs it up again.
        rec = CallRecord(f"refused-{next(self._incoming_ids)}", outgoing=False, created=time.monotonic(),
                      finished=True, local_hangup=True)
        rec.call = PjCall(self, rec, acc, pj_call_id)
        with self._lock:
            self._calls[rec.call_id] = rec
        # Not from inside the callback: a final answer there frees the INVITE pjsua2 frees again on return
        # (an assertion aborts the process).
        self._internal(lambda: rec.call.answer(api.call_op(403)) if rec.call is not None else None)

    def _probe(self, call_id: str) -> None:
        rec = self._record(call_id)
        if rec is None or rec.finished or rec.call is None:
            self._emit(ev.CallProbed(call_id, None))  # a call we no longer have is no call at all
            return
        rec.probing = True
        try:
            rec.call.sendRequest(api.request_param("OPTIONS"))
        except Exception as exc:  # noqa: BLE001 - pj.Error: the dialog cannot take a request (it is going away)
            rec.probing = False
            log.warning("%s: call %s: cannot probe: %s", self._post, call_id, exc)
            self._emit(ev.CallProbed(call_id, None))

    def _send_ringing(self, rec: CallRecord) -> None:
        if not rec.finished and not rec.answered and not rec.local_hangup:
            rec.call.answer(api.call_op(180))

    def _on_call_state(self, rec: CallRecord, call: Any, prm: Any) -> None:
        state, code, reason = api.call_state(call)
        if state in (api.INV_EARLY, api.INV_CONNECTING, api.INV_CONFIRMED):
            rec.responded = True
        if rec.finished and state == api.INV_DISCONNECTED:
            self._internal(lambda: self._forget(rec))  # the call given up on is gone from pjsua at last
            return
        if rec.finished:  # given up on (no response): a late answer must not resurrect it
            return
        if state == api.INV_EARLY and rec.outgoing and code in (180, 183) and code != rec.progress:
            rec.progress = code
            log.info("%s: call %s: %d %s", self._post, rec.call_id, code, reason)
            self._emit(ev.CallProgress(rec.call_id, code))
        elif state == api.INV_CONFIRMED and not rec.answered:
            rec.answered = True
            log.info("%s: call %s answered", self._post, rec.call_id)
            self._emit(ev.CallAnswered(rec.call_id))
        elif state == api.INV_DISCONNECTED:
            event: ev.Event
            if rec.local_hangup:
                event = ev.CallEnded(rec.call_id, "hung up locally")
            elif rec.answered or not rec.outgoing:
                event = ev.CallEnded(rec.call_id, f"{code} {reason}".strip())
            else:
                status = None if api.local_failure(prm) or code == 0 else code
                event = ev.CallFailed(rec.call_id, status, reason)
            log.info("%s: call %s over: %s", self._post, rec.call_id, event)
            self._finish(rec, event)

    def _finish(self, rec: CallRecord, event: ev.Event, *, forget: bool = True) -> None:
        rec.finished = True
        if rec.media is not None and self._audio is not None:
            self._audio.call_gone(rec.media)
        self._emit(event)
        if forget:
            self._internal(lambda: self._forget(rec))

    def _on_tsx_state(self, rec: CallRecord, prm: Any) -> None:
        if not rec.responded and api.invite_response(prm):
            rec.responded = True
            if rec.outgoing:
                self._emit(ev.CallProgress(rec.call_id, 100))  # the PBX is there: the machine's fast-fail is off
        final = api.request_final(prm, "OPTIONS") if rec.probing else None
        if final is not None:
            rec.probing = False
            status, received = final
            if not received:
                log.warning("%s: call %s: the PBX did not answer a probe (%d made up by pjsip)", self._post,
                            rec.call_id, status)
            self._emit(ev.CallProbed(rec.call_id, status if received else None))

    def _on_media_state(self, rec: CallRecord) -> None:
        rec.media_up = True
        self._internal(lambda: self._connect_audio(rec))

    def _on_dtmf(self, rec: CallRecord, digit: str) -> None:
        hook = self.on_dtmf
        if hook is not None:
            hook(rec.call_id, digit)

