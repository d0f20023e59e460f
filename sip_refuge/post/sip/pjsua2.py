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

The backend is in three parts: this module (the interface, the owner thread, start and stop),
:mod:`~sip_refuge.post.sip.pjsua2_calls` (the calls and their callbacks) and
:mod:`~sip_refuge.post.sip.pjsua2_register` (the registrations with each PBX of the pair, and their watch).

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
from typing import Any

from sip_refuge.errors import SipError
from sip_refuge.post import events as ev
from sip_refuge.post.sip import Account, Emit, Health
from sip_refuge.post.sip import pjsua2_api as api
from sip_refuge.post.sip.guard import Counters, Gate, local_address_for, pbx_addresses
from sip_refuge.post.sip.pjsua2_api import MediaSettings, pj
from sip_refuge.post.sip.pjsua2_audio import BridgeAudio
from sip_refuge.post.sip.pjsua2_calls import CallHandling, CallRecord, Command, guarded
from sip_refuge.post.sip.pjsua2_register import MIN_REFRESH, REGISTER_TIMEOUT, Registrations

__all__ = ["MIN_REFRESH", "REGISTER_TIMEOUT", "Backend", "MediaSettings"]

log = logging.getLogger(__name__)

_STOP = object()  # the owner thread's last command
POLL_MS = 100  # longest wait for packets; commands do not wait for it (doorbell)
TICK = 0.1  # seconds between timer checks (prompts in turn, checks heard, silent media, registration watchdog)
DIAL_HANDOFF = 0.05  # longest wait of dial() for its INVITE to leave (pjsua busy, stopping): then it returns
STALL = 10.0  # the owner thread not turning for this long is a stuck SIP stack (health says so)


class _PjAccount(pj.Account):  # type: ignore[misc]
    """The post's registration with one PBX of the pair (``host``); calls to that PBX go out on it."""

    def __init__(self, backend: Backend, host: str) -> None:
        super().__init__()
        self.backend, self.host = backend, host

    def onRegState(self, prm: Any) -> None:  # noqa: N802
        guarded(self.backend, "onRegState", lambda: self.backend._on_reg_state(
            int(prm.code), str(prm.reason), int(prm.expiration), api.rx_message(prm), self.host))

    def onIncomingCall(self, prm: Any) -> None:  # noqa: N802
        guarded(self.backend, "onIncomingCall", lambda: self.backend._on_incoming(
            self, int(prm.callId), *api.rx_source(prm)))


class Backend(Registrations, CallHandling):
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
        self._accounts: dict[str, Any] = {}  # PBX host -> its _PjAccount: pbx.host, and pbx.secondary_host
        self._transport_id = -1
        self._poll: Callable[[int], None] | None = None
        self._doorbell: socket.socket | None = None
        self._doorbell_to: tuple[str, int] = ("127.0.0.1", 0)
        self._lock = threading.Lock()
        self._calls: dict[str, CallRecord] = {}
        self._incoming_ids = itertools.count(1)
        self._registered: dict[str, bool] = {}  # by PBX host
        self._reg_activity: dict[str, float] = {}
        self._reg_due: dict[str, float] = {}  # by PBX host: when pjsua's next refresh REGISTER goes out
        self._before_expiry = MIN_REFRESH
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
        refresh = pbx.register_interval or self.refresh_every
        # One registration per PBX of the pair, on the one transport: both know the post, so the first INVITE
        # after one of them died goes to the other without waiting for a registration first.
        expiry = max(self.registration_expiry, 2 * refresh)
        self._before_expiry = max(MIN_REFRESH, expiry - refresh)  # what account_config makes delayBeforeRefreshSec
        for role in pbx.roles:
            host = pbx.host_of(role)
            acc_cfg = api.account_config(post, pbx, account.password, self._transport_id, host=host,
                                         expiry=expiry, refresh_every=refresh,
                                         retry_interval=self.retry_interval)
            api.bind_media(acc_cfg, address)
            acc = self._accounts[host] = _PjAccount(self, host)
            self._registered[host] = False
            self._reg_activity[host] = time.monotonic()
            acc.create(acc_cfg, True)
        log.info("%s: pjsua2 %s started, registering to %s (port %d) over %s%s", self._post, ep.libVersion().full,
                 " and ".join(self._accounts), api.pbx_port(pbx)[0], pbx.transport,
                 " with SRTP" if pbx.transport == "tls" else "")

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
        for host, acc in self._accounts.items():
            self._watch_registration(host, acc, now)

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
        accounts, self._accounts = list(self._accounts.values()), {}
        for acc in accounts:
            try:
                acc.shutdown()  # unregisters (libDestroy waits briefly for the answer)
            except Exception as exc:  # noqa: BLE001 - shutting down regardless
                log.info("%s: account shutdown: %s", self._post, exc)
        del accounts
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
        self._registered.clear()
        self._reg_due.clear()


def _drop(event: ev.Event) -> None:
    """``emit`` before start and after stop: nobody listens any more."""
