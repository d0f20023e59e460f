"""The pjsua2 SIP backend of the post: pjsip's C stack, with TLS/SRTP, echo canceller and jitter buffer.

pjsua may only be called from the thread that created it (or inside its own callbacks): a call from any
other Python thread aborts the whole process (``notes/platform.md``). So :class:`Backend` owns one
thread, ``pjsua2-<post>``, that creates the library, runs pjsip's event loop (``libHandleEvents``), runs
every command the runner enqueues (dial, answer, hangup...) and destroys the library again. pjsip gets no
worker threads of its own (:func:`~sip_refuge.post.sip.pjsua2_api.endpoint_config`), so every callback
also runs on the owner thread, between commands. Callbacks only update the small per-call records,
build events and call ``emit``; anything that needs pjsua is enqueued as a command.

The sound card is the conference bridge's (:mod:`~sip_refuge.post.sip.pjsua2_audio`): calls, prompts (players)
and the self-test's chirp meet there; a real card is pjmedia's ALSA device with its echo canceller, the mock
card an ``AudioMediaPort`` on the null device's clock. The backend reports facts (responses, 100 Trying included;
``MediaStalled``/``MediaResumed``; what a check heard); every timing decision is the machine's.

The binding is pjproject's official SWIG one, built by :mod:`sip_refuge.post.sip.pjsua2_build`
(``make venv``); :mod:`~sip_refuge.post.sip.pjsua2_api` holds what this module asks of it.

A command wakes the owner thread at once: :meth:`Backend._submit` sends a CRLF keep-alive (which pjsip
reads and ignores) to a loopback-only UDP transport, so pjsip's wait for packets returns.

SIP and RTP are bound to the address that routes to the PBX, never 0.0.0.0. pjsip parses (and drops what it
cannot parse) by itself; every INVITE then goes through :class:`~sip_refuge.post.sip.guard.Gate` in
``onIncomingCall`` and a stranger's is refused with 403 before the runner hears of it. The owner thread marks
each turn of its loop, so :meth:`Backend.health` tells a dead or stuck stack from a quiet one.
"""

from __future__ import annotations

import gc
import itertools
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sip_refuge.errors import SipError
from sip_refuge.post import events as ev
from sip_refuge.post.sip import Account, Emit, Health
from sip_refuge.post.sip import pjsua2_api as api
from sip_refuge.post.sip.guard import Counters, Gate, local_address_for, pbx_addresses
from sip_refuge.post.sip.pjsua2_api import MediaSettings, pj
from sip_refuge.post.sip.pjsua2_audio import BridgeAudio

__all__ = ["Backend", "MediaSettings"]

log = logging.getLogger(__name__)

Command = Callable[[], None]
_STOP = object()  # the owner thread's last command
POLL_MS = 100  # longest wait for packets; commands do not wait for it (doorbell)
TICK = 0.1  # seconds between timer checks (prompts in turn, checks heard, silent media, registration watchdog)
DIAL_HANDOFF = 0.05  # longest wait of dial() for its INVITE to leave (pjsua busy, stopping): then it returns
STALL = 10.0  # the owner thread not turning for this long is a stuck SIP stack (health says so)


@dataclass
class _Record:
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


def _guarded(backend: Backend, what: str, run: Callable[[], None]) -> None:
    """Run a callback body; an exception escaping into pjsip's C code would abort the process."""
    try:
        run()
    except Exception:  # noqa: BLE001 - thread boundary (pjsip's thread): log, count and keep the post alive
        backend._counters.count("errors", "%s: pjsua2 callback %s failed", backend._post, what, exc_info=True)


class _PjCall(pj.Call):  # type: ignore[misc]  # the SWIG binding ships no types
    """A pjsua2 Call whose callbacks report to the backend."""

    def __init__(self, backend: Backend, record: _Record, account: Any, pj_call_id: int = -1) -> None:
        super().__init__(account, pj_call_id)
        self.backend, self.record = backend, record

    def onCallState(self, prm: Any) -> None:  # noqa: N802 - pjsua2's name
        _guarded(self.backend, "onCallState", lambda: self.backend._on_call_state(self.record, self, prm))

    def onCallTsxState(self, prm: Any) -> None:  # noqa: N802
        _guarded(self.backend, "onCallTsxState", lambda: self.backend._on_tsx_state(self.record, prm))

    def onCallMediaState(self, prm: Any) -> None:  # noqa: N802
        _guarded(self.backend, "onCallMediaState", lambda: self.backend._on_media_state(self.record))

    def onDtmfDigit(self, prm: Any) -> None:  # noqa: N802
        _guarded(self.backend, "onDtmfDigit", lambda: self.backend._on_dtmf(self.record, str(prm.digit)))


class _PjAccount(pj.Account):  # type: ignore[misc]
    def __init__(self, backend: Backend) -> None:
        super().__init__()
        self.backend = backend

    def onRegState(self, prm: Any) -> None:  # noqa: N802
        _guarded(self.backend, "onRegState", lambda: self.backend._on_reg_state(
            int(prm.code), str(prm.reason), int(prm.expiration), api.rx_message(prm)))

    def onIncomingCall(self, prm: Any) -> None:  # noqa: N802
        _guarded(self.backend, "onIncomingCall", lambda: self.backend._on_incoming(
            self, int(prm.callId), *api.rx_source(prm)))


class Backend:
    """:class:`~sip_refuge.post.sip.SipBackend` on pjsua2. Every public method only enqueues.

    ``on_dtmf(call_id, digit)``, when set, is called (on the owner thread: keep it short, never call the
    backend's pjsua objects from it) for every RFC 4733 digit received.
    """

    def __init__(self, *, media: MediaSettings | None = None, registration_expiry: int = 60,
                 refresh_every: int = 25, retry_interval: int = 5, media_gap: float = 1.0,
                 bind_address: str = "", pjsua_log_file: str = "", pjsua_log_level: int = 3) -> None:
        self.media = media or MediaSettings()
        self.registration_expiry = registration_expiry
        # Refresh well before expiry: a PBX that lost its contacts (restart on a fresh disk, failover) learns
        # the post again within refresh_every seconds, not within the expiry.
        self.refresh_every = refresh_every
        self.retry_interval = retry_interval
        self.media_gap = media_gap  # no RTP for this long: MediaStalled (a fact; the machine decides what it means)
        self.bind_address = bind_address
        self.pjsua_log_file, self.pjsua_log_level = pjsua_log_file, pjsua_log_level
        self.on_dtmf: Callable[[str, str], None] | None = None
        self._queue: queue.Queue[object] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._account: Account | None = None
        self._emit: Emit = _drop
        self._post = "-"
        self._ep: Any = None
        self._audio: BridgeAudio | None = None
        self._acc: Any = None
        self._transport_id = -1
        self._poll: Callable[[int], None] | None = None
        self._doorbell: socket.socket | None = None
        self._doorbell_to: tuple[str, int] = ("127.0.0.1", 0)
        self._lock = threading.Lock()
        self._calls: dict[str, _Record] = {}
        self._incoming_ids = itertools.count(1)
        self._registered = False
        self._reg_activity = 0.0
        self._counters = Counters(log)
        self._gate: Gate | None = None
        self.stall_after = STALL
        self._beat = 0.0  # the owner thread's last turn
        self._failure = ""  # why the owner thread died, if it did

    # -- the SipBackend interface (any thread) --------------------------------------------------------------
    def start(self, account: Account, emit: Emit) -> None:
        if self._thread is not None:
            raise SipError("pjsua2 backend already started")
        self._account, self._emit, self._post = account, emit, account.post.id
        self._ready.clear()
        self._start_error = None
        self._beat, self._failure = time.monotonic(), ""
        self._thread = threading.Thread(target=self._main, name=f"pjsua2-{self._post}", daemon=True)
        self._thread.start()
        # Library start-up takes milliseconds; waiting for it turns a bad port or transport into an error here.
        if not self._ready.wait(15.0):
            raise SipError(f"{self._post}: pjsua2 did not start within 15 s")
        if self._start_error is not None:
            self._thread.join()
            self._thread = None
            if self._doorbell is not None:
                self._doorbell.close()
                self._doorbell = None
            raise SipError(f"{self._post}: pjsua2 failed to start: {self._start_error}") from self._start_error

    def dial(self, call_id: str, extension: str, host: str, selftest: bool) -> None:
        """Enqueue the call, then wait (at most :data:`DIAL_HANDOFF`) until the owner thread has sent the INVITE.

        The wait is the hand-over of the GIL: pjsua runs Python callbacks and the owner thread needs the GIL
        to dequeue, so while the caller's thread goes on running Python (lights, status, telemetry after a
        press) the INVITE waits for it, for up to the interpreter's switch interval (5 ms). Blocked here,
        the caller leaves the GIL to the owner thread at once; it waits about as long as makeCall takes.
        """
        sent = threading.Event()

        def command() -> None:
            try:
                self._dial(call_id, extension, host, selftest)
            finally:
                sent.set()

        if self._submit(command, call_id) and threading.current_thread() is not self._thread:
            sent.wait(DIAL_HANDOFF)

    def answer(self, call_id: str) -> None:
        self._submit(lambda: self._answer(call_id, 200))

    def reject(self, call_id: str, status: int) -> None:
        self._submit(lambda: self._answer(call_id, status))

    def hangup(self, call_id: str) -> None:
        self._submit(lambda: self._hangup(call_id, "asked by the runner"))

    def send_dtmf(self, call_id: str, digits: str) -> None:
        self._submit(lambda: self._send_dtmf(call_id, digits))

    def play_prompt(self, name: str) -> None:
        self._submit(lambda: self._audio.play_prompt(name) if self._audio is not None else None)

    def stop_prompts(self) -> None:
        self._submit(lambda: self._audio.stop_prompts() if self._audio is not None else None)

    def check_audio(self, check_id: str, path: str, call_id: str | None, seconds: float) -> None:
        if not self._submit(lambda: self._check_audio(check_id, path, call_id, seconds)):
            self._emit(ev.AudioHeard(check_id, 0))

    def stop(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._queue.put(_STOP)
        self._ring()
        thread.join()
        self._thread = None
        self._emit = _drop
        if self._doorbell is not None:
            self._doorbell.close()
            self._doorbell = None

    def _submit(self, command: Command, dial_id: str = "") -> bool:
        """Enqueue ``command`` for the owner thread and wake it; False when the backend is not running."""
        if self._thread is None or not self._thread.is_alive():
            log.warning("%s: pjsua2 backend not running; command dropped", self._post)
            if dial_id:  # the machine waits for a verdict on every dial
                self._emit(ev.CallFailed(dial_id, None, "SIP backend not running"))
            return False
        self._queue.put(command)
        self._ring()
        return True

    def _ring(self) -> None:
        """Wake the owner thread out of pjsip's wait for packets."""
        bell = self._doorbell
        if bell is not None:
            try:
                bell.sendto(b"\r\n\r\n", self._doorbell_to)
            except OSError as exc:  # the owner thread still wakes within its poll interval
                log.debug("%s: doorbell: %s", self._post, exc)

    def probe(self, call_id: str) -> None:
        self._submit(lambda: self._probe(call_id))

    def health(self) -> Health:
        counters = self._counters.snapshot()
        thread = self._thread
        if thread is None:
            return Health(True, "not running", counters)
        if not thread.is_alive():
            return Health(False, f"pjsua2 thread {thread.name} died: {self._failure or 'it ended'}", counters)
        stalled = time.monotonic() - self._beat
        if stalled > self.stall_after:
            return Health(False, f"pjsua2 thread {thread.name} has not turned for {stalled:.0f} s", counters)
        return Health(True, "", counters)

    # -- the owner thread ---------------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - the thread's boundary: health() reports it to the runner
            self._failure = f"{type(exc).__name__}: {exc}"
            log.critical("%s: pjsua2 thread died: %s", self._post, self._failure,
                         exc_info=not isinstance(exc, SystemExit))

    def _run(self) -> None:
        try:
            self._create()
        except Exception as exc:  # noqa: BLE001 - thread boundary: start() reports it
            log.error("%s: pjsua2 start failed: %s", self._post, exc)
            # The traceback's frames hold the Endpoint; pjsua2 allows one, so it must really go now.
            exc.__traceback__ = None
            self._start_error = exc
            self._destroy()
            self._ready.set()
            return
        self._ready.set()
        poll = self._poll
        assert poll is not None
        next_tick = 0.0
        stopping = False
        while not stopping:
            try:
                poll(POLL_MS)  # SIP and RTP events, callbacks included; returns early on the doorbell
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is _STOP:
                        stopping = True
                        break
                    item()  # type: ignore[operator]
                now = self._beat = time.monotonic()
                if now >= next_tick:
                    next_tick = now + TICK
                    self._tick(now)
            except Exception:  # noqa: BLE001 - thread boundary: one bad command must not end the post's SIP
                self._counters.count("errors", "%s: pjsua2 command failed", self._post, exc_info=True)
        self._shutdown()

    def _create(self) -> None:
        account = self._account
        assert account is not None
        pbx, post = account.pbx, account.post
        ep = pj.Endpoint()
        self._ep = ep
        ep.libCreate()
        ep.libInit(api.endpoint_config(self.media, self.pjsua_log_file, self.pjsua_log_level,
                                       sound_card=not (account.sound.mock or account.sound.null)))
        api.codec_priorities(ep, self.media)
        self._audio = BridgeAudio(ep, account.sound, self.media, post.id, account.prompts_dir)
        self._audio.open()
        tls = pbx.tls if pbx.transport == "tls" else None
        # Only the address that routes to the PBX, never 0.0.0.0; only the PBX's addresses are answered.
        address = self.bind_address or local_address_for(pbx.host, api.pbx_port(pbx)[0])
        tcfg = api.transport_config(account.local_port, address, tls)
        self._transport_id = ep.transportCreate(api.TRANSPORTS[pbx.transport], tcfg)
        self._gate = Gate(post.id, pbx_addresses(pbx, log), self._counters)
        self._gate.add_contact(*api.transport_address(ep, self._transport_id))
        bell_id = ep.transportCreate(api.TRANSPORTS["udp"], api.transport_config(0, "127.0.0.1"))
        self._doorbell_to = api.transport_address(ep, bell_id)
        self._doorbell = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._poll = ep.libHandleEvents
        ep.libStart()
        acc_cfg = api.account_config(post, pbx, account.password, self._transport_id,
                                     expiry=self.registration_expiry, refresh_every=self.refresh_every,
                                     retry_interval=self.retry_interval)
        api.bind_media(acc_cfg, address)
        self._acc = _PjAccount(self)
        self._reg_activity = time.monotonic()
        self._acc.create(acc_cfg, True)
        log.info("%s: pjsua2 %s started, registering to %s:%d over %s%s", self._post, ep.libVersion().full,
                 pbx.host, api.pbx_port(pbx)[0], pbx.transport, " with SRTP" if pbx.transport == "tls" else "")

    def _tick(self, now: float) -> None:
        """Timers: self-test steps and deadlines, media timeouts, a registration pjsua gave up on."""
        with self._lock:
            records = list(self._calls.values())
        for rec in records:
            if not rec.finished and rec.answered and rec.media_up:
                self._check_media(rec, now)
        heard = self._audio.tick() if self._audio is not None else None
        if heard is not None:
            log.info("%s: check %s heard %.1f s", self._post, heard[0], len(heard[2]) / 2 / heard[1])
            self._emit(ev.AudioHeard(*heard))
        # pjsua retries timeouts and 5xx by itself but not 401/403/404 (a secret fixed on the PBX later).
        if not self._registered and now - self._reg_activity > max(30.0, 3.0 * self.retry_interval):
            self._reg_activity = now
            log.info("%s: still not registered; registering again", self._post)
            try:
                self._acc.setRegistration(True)
            except Exception as exc:  # noqa: BLE001 - pjsua busy with its own attempt: fine, try later
                log.info("%s: re-register: %s", self._post, exc)

    def _check_media(self, rec: _Record, now: float) -> None:
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
        rec = _Record(call_id, outgoing=True, selftest=selftest, created=time.monotonic())
        rec.call = _PjCall(self, rec, self._acc)
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

    def _end_call(self, rec: _Record) -> None:
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

    def _connect_audio(self, rec: _Record) -> None:
        if rec.finished or self._ep is None or self._audio is None:
            return
        media = api.call_audio(rec.call)
        if media is None or media is rec.media:
            return
        rec.media = media
        if not rec.selftest:  # the echo call carries only the self-test's chirp
            self._audio.connect(media)

    def _forget(self, rec: _Record) -> None:
        with self._lock:
            if self._calls.get(rec.call_id) is rec:
                del self._calls[rec.call_id]
        rec.call = None  # the pjsua2 Call is destroyed here, on the owner thread

    def _record(self, call_id: str) -> _Record | None:
        with self._lock:
            return self._calls.get(call_id)

    def _shutdown(self) -> None:
        """Hang up every call and let pjsua finish them before libDestroy (else pjsua_call.c asserts)."""
        with self._lock:
            records = list(self._calls.values())
        for rec in records:
            self._hangup(rec.call_id, "stopping")
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            with self._lock:
                if not any(not r.finished for r in self._calls.values()):
                    break
            self._drain(0.05)
        self._drain(0.0)
        if self._audio is not None:
            self._audio.close()
        with self._lock:
            records = list(self._calls.values())
            self._calls.clear()
        for rec in records:
            rec.call = None
        self._destroy()
        log.info("%s: pjsua2 stopped", self._post)

    def _drain(self, wait: float) -> None:
        """Run pjsip's events, then the backend's own queued steps; the runner's late commands are dropped."""
        if self._poll is not None:
            self._poll(int(wait * 1000))
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP and getattr(item, "_internal", False):
                item()  # type: ignore[operator]

    def _destroy(self) -> None:
        audio, self._audio = self._audio, None
        if audio is not None:
            audio.close()  # before libDestroy: the card's port leaves the bridge, OUT.wav is finished
        acc, self._acc = self._acc, None
        if acc is not None:
            try:
                acc.shutdown()  # unregisters (libDestroy waits briefly for the answer)
            except Exception as exc:  # noqa: BLE001 - shutting down regardless
                log.info("%s: account shutdown: %s", self._post, exc)
            del acc
        self._poll = None  # holds the Endpoint too
        ep, self._ep = self._ep, None
        if ep is not None:
            try:
                ep.libDestroy()
            except Exception as exc:  # noqa: BLE001
                log.warning("%s: libDestroy: %s", self._post, exc)
            del ep
        # pjsua2's Endpoint is a singleton: the old one must be gone before a later start() makes a new one.
        gc.collect()
        self._registered = False

    # -- callbacks (on the owner thread, inside pjsip's event loop): update records, emit, enqueue ----------------------------------------------
    def _internal(self, command: Command) -> None:
        command._internal = True  # type: ignore[attr-defined]
        self._queue.put(command)

    def _on_reg_state(self, code: int, reason: str, expiration: int, response: str = "") -> None:
        self._reg_activity = time.monotonic()
        account = self._account
        host = account.pbx.host if account else ""
        if code // 100 == 2 and expiration > 0 and self._gate is not None:
            self._gate.learn_registration(header(response, "via"))
        if code // 100 == 2 and expiration > 0:
            if not self._registered:
                log.info("%s: registered to %s (expires in %d s)", self._post, host, expiration)
            self._registered = True
            self._emit(ev.Registered(host))
        elif code // 100 == 2:
            self._registered = False
            log.info("%s: unregistered", self._post)
            self._emit(ev.Unregistered("unregistered"))
        else:
            was, self._registered = self._registered, False
            log.warning("%s: registration to %s failed: %d %s", self._post, host, code, reason)
            if was:
                self._emit(ev.Unregistered(f"{code} {reason}"))
            self._emit(ev.RegistrationFailed(reason, code or None))

    def _on_incoming(self, acc: Any, pj_call_id: int, source: str, message: str) -> None:
        head, _, body = message.partition("\r\n\r\n")
        request_line = head.split("\r\n", 1)[0].split()
        uri = request_line[1] if len(request_line) == 3 else ""
        if self._gate is None or self._gate.refuse_callback(source, uri, body) is not None:
            self._refuse(acc, pj_call_id)  # before the runner (and its auto-answer policy) hears of it
            return
        rec = _Record(f"in-{next(self._incoming_ids)}", outgoing=False, created=time.monotonic())
        rec.call = _PjCall(self, rec, acc, pj_call_id)
        caller = api.remote_uri(rec.call)
        with self._lock:
            self._calls[rec.call_id] = rec
        log.info("%s: incoming call %s from %s", self._post, rec.call_id, caller)
        self._internal(lambda: self._send_ringing(rec))
        self._emit(ev.IncomingCall(rec.call_id, caller))

    def _refuse(self, acc: Any, pj_call_id: int) -> None:
        # Kept as a finished record until pjsua reports it gone: dropping a live pjsua2 Call hangs it up again.
        rec = _Record(f"refused-{next(self._incoming_ids)}", outgoing=False, created=time.monotonic(),
                      finished=True, local_hangup=True)
        rec.call = _PjCall(self, rec, acc, pj_call_id)
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

    def _send_ringing(self, rec: _Record) -> None:
        if not rec.finished and not rec.answered and not rec.local_hangup:
            rec.call.answer(api.call_op(180))

    def _on_call_state(self, rec: _Record, call: Any, prm: Any) -> None:
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

    def _finish(self, rec: _Record, event: ev.Event, *, forget: bool = True) -> None:
        rec.finished = True
        if rec.media is not None and self._audio is not None:
            self._audio.call_gone(rec.media)
        self._emit(event)
        if forget:
            self._internal(lambda: self._forget(rec))

    def _on_tsx_state(self, rec: _Record, prm: Any) -> None:
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

    def _on_media_state(self, rec: _Record) -> None:
        rec.media_up = True
        self._internal(lambda: self._connect_audio(rec))

    def _on_dtmf(self, rec: _Record, digit: str) -> None:
        hook = self.on_dtmf
        if hook is not None:
            hook(rec.call_id, digit)


def header(message: str, name: str) -> str:
    """The first ``name`` header (compact form too) of a SIP message's text, or ""."""
    compact = {"via": "v", "contact": "m"}.get(name)
    for line in message.split("\r\n\r\n", 1)[0].split("\r\n")[1:]:
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in (name, compact):
            return value.strip()
    return ""


def _drop(event: ev.Event) -> None:
    """``emit`` before start and after stop: nobody listens any more."""
