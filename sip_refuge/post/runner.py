"""The post agent's runner: the only owner of threads. It feeds the machine and carries out its commands.

Panel and SIP callbacks only ``emit`` (enqueue) events. One loop takes them in order, with the
machine's own deadlines as the wait, and executes the commands. A failing command is logged and
turned into the event that tells the machine (a dial that raised is a failed call): a post never
stops on an error it can recover from.

Every turn it also asks the SIP backend whether its threads still turn (:meth:`SipBackend.health`). A dead
or stuck stack is one it cannot recover from in-process (pjsua may only be touched from its own thread), so
the machine shows the fault (``sip_stack``: state fault, red) and the loop stops calling ``on_turn``, the
systemd watchdog ping: systemd then restarts the agent.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sip_refuge.config.model import Post, Site
from sip_refuge.post.commands import (
    Answer,
    CheckAudio,
    Command,
    Dial,
    Hangup,
    PlayPrompt,
    ProbeCall,
    Reject,
    Report,
    Ring,
    SetLights,
    StopPrompts,
)
from sip_refuge.post.events import (
    AudioHeard,
    ButtonPressed,
    CallFailed,
    Event,
    RegistrationFailed,
    SelfTestRequested,
    SipStackFailed,
    SipStackRecovered,
    Tick,
)
from sip_refuge.post.machine import PostMachine, Settings
from sip_refuge.post.panel import MockPanel, Panel
from sip_refuge.post.sip import Account, Health, SipBackend
from sip_refuge.post.telemetry import TelemetryOutbox
from sip_refuge.telemetry import Telemetry

log = logging.getLogger(__name__)

MAX_WAIT = 1.0  # seconds; the loop wakes at least this often so a stop request is seen promptly
BACKEND_RETRY_CAP = 30.0  # seconds between attempts to start a SIP stack that would not start
SIP_COUNTERS = ("refused", "malformed", "errors", "rtp_refused", "rtp_malformed")  # always in status/telemetry


class PostRunner:
    def __init__(self, site: Site, post: Post, *, backend: SipBackend, account: Account,
                 panel: Callable[[Callable[[Event], None]], Panel], telemetry: TelemetryOutbox,
                 settings: Settings | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.site, self.post, self.backend, self.account = site, post, backend, account
        self.telemetry, self.clock = telemetry, clock
        self.events: queue.Queue[Event] = queue.Queue()
        self.machine = PostMachine(site, post, now=clock(), settings=settings)
        self.panel = panel(self.emit)
        self.stop_event = threading.Event()
        self.on_turn: Callable[[], None] = lambda: None  # the systemd watchdog ping; only while the SIP stack turns
        self._backend_failures = 0
        self._backend_retry_at: float | None = None
        self._backend_started = False
        self._backend_down = False
        self._sip_counters: dict[str, int] = dict.fromkeys(SIP_COUNTERS, 0)
        self._status_lock = threading.Lock()
        self._status: dict[str, Any] = {}
        self._publish_status()

    # -- inputs from any thread ------------------------------------------------------------------
    def emit(self, event: Event) -> None:
        self.events.put(event)

    @property
    def mock(self) -> bool:
        return isinstance(self.panel, MockPanel)

    def status(self) -> dict[str, Any]:
        with self._status_lock:
            return dict(self._status)

    def control(self, request: dict[str, Any]) -> dict[str, Any]:
        """The control socket's requests (runs on the control thread: only enqueues or reads)."""
        cmd = request.get("cmd")
        if cmd == "status":
            return {"ok": True, **self.status()}
        if cmd == "selftest":
            self.emit(SelfTestRequested())
            return {"ok": True}
        if cmd in ("press", "hold", "release"):
            if not isinstance(self.panel, MockPanel):
                return {"ok": False, "error": "this agent drives real GPIO: press its button"}
            getattr(self.panel, cmd)()  # drives the mock pin, so the press goes through gpiozero like a real one
            return {"ok": True}
        return {"ok": False, "error": f"unknown command {cmd!r} (press, hold, release, status, selftest)"}

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> None:
        self.telemetry.start()
        self.panel.sync()
        self._start_backend()
        try:
            while not self.stop_event.is_set():
                if self._backend_retry_at is not None and self.clock() >= self._backend_retry_at:
                    self._start_backend()
                deadline = self.machine.next_deadline()
                if self._backend_retry_at is not None:
                    deadline = min(deadline or self._backend_retry_at, self._backend_retry_at)
                wait = MAX_WAIT if deadline is None else min(MAX_WAIT, max(0.0, deadline - self.clock()))
                try:
                    event: Event = self.events.get(timeout=wait)
                except queue.Empty:
                    event = Tick()
                self.step(event)
                if self._watch_backend():
                    self.on_turn()
        finally:
            self._shutdown()

    def _start_backend(self) -> None:
        """Start the SIP stack; when it cannot start (port taken, network not up yet at boot) keep trying
        with backoff, with the post showing the fault meanwhile: a post never gives up."""
        try:
            self.backend.start(self.account, self.emit)
        except Exception as exc:  # noqa: BLE001 - thread boundary: keep the panel alive, say why, retry
            self._backend_failures += 1
            delay = min(BACKEND_RETRY_CAP, 2.0 ** min(self._backend_failures, 5))
            self._backend_retry_at = self.clock() + delay
            log.exception("post %s: SIP backend failed to start (attempt %d); retrying in %.0f s",
                          self.post.id, self._backend_failures, delay)
            self.emit(RegistrationFailed(reason=f"backend failed to start: {exc}"))
            try:
                self.backend.stop()  # free whatever half-started, so the next attempt starts clean
            except Exception:  # noqa: BLE001 - best effort
                log.debug("post %s: stopping the half-started backend failed", self.post.id, exc_info=True)
            return
        if self._backend_failures:
            log.info("post %s: SIP backend started after %d failed attempts", self.post.id, self._backend_failures)
        self._backend_failures, self._backend_retry_at = 0, None
        self._backend_started = True

    def _watch_backend(self) -> bool:
        """Tell the machine when the SIP stack dies or stalls, and when it turns again; False while it is down
        (the loop then stops feeding the watchdog, so systemd restarts the agent)."""
        if not self._backend_started:
            return True
        try:
            health = self.backend.health()
        except Exception as exc:  # noqa: BLE001 - a backend that cannot even say how it is, is not well
            health = Health(False, f"health check failed: {exc}")
        if any(self._sip_counters.get(k) != v for k, v in health.counters.items()):
            self._sip_counters.update(health.counters)
            self._publish_status()
        if not health.alive and not self._backend_down:
            self._backend_down = True
            log.critical("post %s: SIP stack failed (%s); no more watchdog pings, systemd restarts the agent",
                         self.post.id, health.detail)
            self.step(SipStackFailed(health.detail))
        elif health.alive and self._backend_down:
            self._backend_down = False
            log.warning("post %s: SIP stack turns again; watchdog pings resume", self.post.id)
            self.step(SipStackRecovered())
        return not self._backend_down
    def step(self, event: Event) -> None:
        try:
            commands = self.machine.handle(event, self.clock())
        except Exception:  # noqa: BLE001 - thread boundary: a machine bug must not silence the post
            log.exception("post %s: state machine failed on %s", self.post.id, event)
            return
        # Reports last: the state `sip-refuge status` shows must not wait for telemetry bookkeeping.
        for command in commands:
            if not isinstance(command, Report):
                self.execute(command)
        self._publish_status()
        for command in commands:
            if isinstance(command, Report):
                self.execute(command)

    def execute(self, command: Command) -> None:
        try:
            self._execute(command)
        except Exception as exc:  # noqa: BLE001 - thread boundary: report it to the machine, keep running
            log.exception("post %s: %s failed", self.post.id, type(command).__name__)
            call_id = getattr(command, "call_id", None)
            if isinstance(command, Dial) and call_id:
                self.emit(CallFailed(call_id, None, f"backend error: {exc}"))
            if isinstance(command, CheckAudio):  # the machine waits for what was heard: nothing was
                self.emit(AudioHeard(command.check_id, 0))

    def _execute(self, command: Command) -> None:
        match command:
            case SetLights():
                self.panel.apply(command)
            case PlayPrompt(name=name):
                self.backend.play_prompt(name)
            case StopPrompts():
                self.backend.stop_prompts()
            case CheckAudio(check_id=check_id, path=path, call_id=cid, seconds=seconds):
                self.backend.check_audio(check_id, path, cid, seconds)
            case Dial(call_id=cid, target=target, extension=ext, host=host):
                self.backend.dial(cid, ext, host, target == "selftest")
            case Answer(call_id=cid):
                self.backend.answer(cid)
            case Ring():
                self.backend.play_prompt("callback")
            case Reject(call_id=cid, status=status):
                self.backend.reject(cid, status)
            case Hangup(call_id=cid):
                self.backend.hangup(cid)
            case ProbeCall(call_id=cid):
                self.backend.probe(cid)
            case Report():
                self.telemetry.put(self._report(command))

    def _report(self, report: Report) -> Telemetry:
        wall = datetime.now(UTC).timestamp() - (self.clock() - report.at)
        last = self.machine.status(self._wall_offset()).get("last_self_test") if report.kind == "selftest" else None
        return Telemetry.build(report.kind, report.detail, post=self.post.id, at=datetime.fromtimestamp(wall, UTC),
                               state=str(self.machine.state), registered=self.machine.registered,
                               faults=self.machine.faults(), mock_gpio=self.mock,
                               last_self_test=last if isinstance(last, dict) else None,
                               sip_counters=self._sip_counters)

    def _wall_offset(self) -> float:
        return time.time() - self.clock()

    def _publish_status(self) -> None:
        status: dict[str, Any] = dict(self.machine.status(self._wall_offset()))
        status.update(mock_gpio=self.mock, sip_backend=self.post.sip_backend, sound=self.account.sound.describe(),
                      lights=self.panel.shown(),
                      sip_counters=dict(self._sip_counters),
                      telemetry_pending=self.telemetry.pending(), telemetry_dropped=self.telemetry.dropped,
                      telemetry_error=self.telemetry.last_error)
        with self._status_lock:
            self._status = status

    def press(self) -> None:
        """For tests that hold a runner in-process: the same path as a real press."""
        self.emit(ButtonPressed())

    def _shutdown(self) -> None:
        for step in (self.backend.stop, self.panel.close, self.telemetry.stop):
            try:
                step()
            except Exception:  # noqa: BLE001 - best effort: stop every part even if one fails
                log.exception("post %s: error while stopping", self.post.id)
