"""One CCTV target's share of the outbox: which events go next, how many at once, and what came of them.

A :class:`TargetWorker` has one dispatching thread (``run``) and ``concurrency`` sender threads. The dispatcher
alone reads and writes the store and its own bookkeeping (``_sent``, ``_retry``, ``_flying``); senders only
call ``Target.deliver`` and hand the outcome back. So the store's single connection sees the worker from one
thread, as before, and SQLite never waits on the network.

- Only stream heads are sent (``Store.due``), and never a stream that already has an event in flight: order
  within a stream is kept however many events of other streams go at once.
- ``call.queued`` goes first when more heads are due than there are free senders: it puts the camera on screen.
- At most ``concurrency`` deliveries are in flight per target; with 1 the worker sends one event at a time.

``step(now)`` without ``run`` sends inline, one at a time, for tests and tools.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from sip_refuge.config.model import TARGET_CONCURRENCY
from sip_refuge.sidecar.backlog import Backlog
from sip_refuge.sidecar.events import CALL_QUEUED, Event, iso_utc
from sip_refuge.sidecar.store import Store, StoreError
from sip_refuge.sidecar.targets import Target, TargetError

log = logging.getLogger(__name__)

IDLE_RECHECK = 30.0  # seconds; also picks up rows another process (a CLI tool) added to the database
DEFAULT_CONCURRENCY = TARGET_CONCURRENCY  # deliveries in flight per target (``cctv[].concurrency``)


@dataclass(frozen=True)
class Backoff:
    """Delay before retry number ``attempts``: exponential, capped, with "equal jitter".

    Half the delay is fixed and half random, so retries never come immediately yet many sidecars (or many
    streams) that failed together do not retry in lock-step.
    """

    base: float = 1.0
    cap: float = 60.0

    def delay(self, attempts: int, rng: random.Random) -> float:
        ceiling = min(self.cap, self.base * 2.0 ** max(0, attempts - 1))
        return ceiling / 2 + rng.uniform(0.0, ceiling / 2)


@dataclass(frozen=True)
class TargetStatus:
    """What /healthz and /metrics show for one target."""

    name: str
    pending: int = 0
    delivered: int = 0  # since this process started
    failed: int = 0  # failed attempts since this process started
    last_success: str | None = None
    last_error: str | None = None  # masked
    last_error_at: str | None = None
    consecutive_failures: int = 0
    in_flight: int = 0

    @property
    def healthy(self) -> bool:
        return self.consecutive_failures == 0


@dataclass(frozen=True)
class Job:
    """One attempt at one event: ``seq`` is its stored delivery, None for an event held in memory."""

    event: Event
    attempts: int  # failed attempts before this one
    seq: int | None


@dataclass(frozen=True)
class Outcome:
    job: Job
    error: str | None  # None: delivered
    at: datetime


def _first(event: Event) -> int:
    """Sort key: ``call.queued`` before the rest (a stable sort keeps the age order within each)."""
    return 0 if event.type == CALL_QUEUED else 1


class TargetWorker:
    """Delivers one target's pending events; ``run`` is its dispatching thread's body."""

    def __init__(self, store: Store, target: Target, *, reveal: Callable[[Event], Event], backoff: Backoff,
                 mask: Callable[[str], str], clock: Callable[[], float], rng: random.Random,
                 backlog: Backlog | None = None, concurrency: int = DEFAULT_CONCURRENCY) -> None:
        self.store = store
        self.target = target
        self.name = target.name
        self.concurrency = max(1, concurrency)
        self._reveal = reveal
        self._backoff = backoff
        self._mask = mask
        self._clock = clock
        self._rng = rng
        self._backlog = backlog if backlog is not None else Backlog()
        self.wake = threading.Event()
        self._lock = threading.Lock()
        self._status = TargetStatus(self.name, last_success=store.last_delivered(self.name))
        # Only the dispatching thread touches these three.
        self._sent: dict[str, str] = {}  # event id -> ISO time delivered, not yet recorded in the store
        self._retry: dict[str, tuple[int, float]] = {}  # held event id -> (failed attempts, next attempt)
        self._flying: dict[str, str] = {}  # stream -> id of its event on the wire
        # Between the dispatcher and the senders; None in ``_jobs`` tells a sender to end.
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
        self._senders: list[threading.Thread] = []

    def status(self) -> TargetStatus:
        with self._lock:
            status = self._status
        sent = set(self._sent.copy())  # copy(): atomic while the worker's thread changes it
        held = sum(1 for e in self._backlog.events() if e.id not in sent)
        try:
            stored = self.store.pending_count(self.name, sent)
        except StoreError:
            stored = 0  # /healthz reports the store's fault itself
        return replace(status, pending=stored + held, in_flight=len(self._flying.copy()))

    # -- choosing -----------------------------------------------------------------------------------------

    def step(self, now: float, should_stop: Callable[[], bool] = lambda: False) -> float | None:
        """Record what came back, then start every delivery due at ``now`` that a sender is free for, from the
        store then from memory; return when the next one is due (None: nothing pending but what is in flight)."""
        try:
            self._collect(now)
            self._record_sent()
            while not should_stop():
                free = self.concurrency - len(self._flying)
                due = self.store.due(self.name, now, limit=free, sent=self._sent, busy=self._flying) if free else []
                if not due:
                    break
                for delivery in due:
                    if should_stop():
                        break
                    self._launch(Job(delivery.event, delivery.attempts, delivery.seq), now)
                # Inline, each success may have made the next event of its stream the head, due at once: go
                # round again. Failures are rescheduled after ``now``, and with senders the slots fill, so this ends.
            stored: float | None = self.store.next_attempt(self.name, self._sent, busy=self._flying)
        except StoreError as exc:
            if not exc.storage:
                raise
            stored = now + self._backoff.cap / 4  # the store logs and reports its fault; try it again later
        held = self._step_held(now, should_stop)
        return min((t for t in (stored, held) if t is not None), default=None)

    def _step_held(self, now: float, should_stop: Callable[[], bool]) -> float | None:
        """Start the events held in memory, each behind anything of its stream still pending or in flight."""
        events = self._backlog.events()
        if not events:
            self._retry.clear()
            return None
        held = {e.id for e in events}
        for event_id in [i for i in self._retry if i not in held]:
            del self._retry[event_id]
        try:
            blocked = self.store.pending_streams(self.name, self._sent)
        except StoreError:
            blocked = set()  # the store cannot even be read: what it holds cannot be sent anyway
        next_due: float | None = None
        progress = True
        while progress:  # inline, a success makes the next event of its stream the head: go round again
            progress = False
            heads, busy = [], blocked | set(self._flying)
            for event in events:
                if event.id not in self._sent and event.stream not in busy:
                    busy.add(event.stream)  # later events of this stream wait for this one
                    heads.append(event)
            for event in sorted(heads, key=_first):
                if should_stop() or len(self._flying) >= self.concurrency:
                    return next_due
                attempts, at = self._retry.get(event.id, (0, now))
                if at > now:
                    next_due = at if next_due is None else min(next_due, at)
                    continue
                retry_at = self._launch(Job(event, attempts, None), now)
                if retry_at is not None:
                    next_due = retry_at if next_due is None else min(next_due, retry_at)
                progress = progress or event.id in self._sent
        return next_due

    # -- sending ------------------------------------------------------------------------------------------

    def _launch(self, job: Job, now: float) -> float | None:
        """Hand ``job`` to a sender, or (no senders running) send it now; inline, the held event's next
        attempt when it failed."""
        self._flying[job.event.stream] = job.event.id
        if self._senders:
            self._jobs.put(job)
            return None
        return self._finish(Outcome(job, self._send(job.event), datetime.now(UTC)), now)

    def _send(self, event: Event) -> str | None:
        """Deliver ``event``; None on success, else the (masked) error."""
        outgoing = self._reveal(event) if self.target.reveal_credentials else event
        try:
            self.target.deliver(outgoing)
        except TargetError as exc:
            return self._mask(str(exc))
        except Exception as exc:  # noqa: BLE001 - a target bug must not kill its worker; retry like a failure
            log.exception("%s: target raised unexpectedly on %s for post %s", self.name, event.id, event.post_id)
            return self._mask(f"{type(exc).__name__}: {exc}")
        return None

    def _sender(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._done.put(Outcome(job, self._send(job.event), datetime.now(UTC)))
            self.wake.set()

    # -- outcomes (the dispatching thread) ----------------------------------------------------------------

    def _collect(self, now: float) -> None:
        while True:
            try:
                outcome = self._done.get_nowait()
            except queue.Empty:
                return
            self._finish(outcome, now)

    def _finish(self, outcome: Outcome, now: float) -> float | None:
        """Record one outcome; for a held event that failed, when to try it again."""
        job, event = outcome.job, outcome.job.event
        self._flying.pop(event.stream, None)
        if outcome.error is not None:
            retry_at = self._failed(event, job.attempts + 1, now, outcome.error, job.seq)
            if job.seq is None:
                self._retry[event.id] = (job.attempts + 1, retry_at)
                return retry_at
            return None
        if job.seq is None:
            self._sent[event.id] = iso_utc(outcome.at)
            self._retry.pop(event.id, None)
            self._succeeded(event, job.attempts + 1, outcome.at, " from memory (the store cannot write)")
            return None
        try:
            self.store.mark_delivered(job.seq, self.name, outcome.at)
        except StoreError:
            self._sent[event.id] = iso_utc(outcome.at)  # delivered: never again; recorded once the store can
        self._succeeded(event, job.attempts + 1, outcome.at, "")
        return None

    def _succeeded(self, event: Event, attempt: int, at: datetime, where: str) -> None:
        with self._lock:
            self._status = replace(self._status, delivered=self._status.delivered + 1,
                                   last_success=iso_utc(at), consecutive_failures=0)
        log.info("%s: delivered %s %s for post %s (attempt %d)%s", self.name, event.type, event.id,
                 event.post_id, attempt, where)

    def _failed(self, event: Event, attempts: int, now: float, error: str, seq: int | None = None) -> float:
        delay = self._backoff.delay(attempts, self._rng)
        with self._lock:
            self._status = replace(self._status, failed=self._status.failed + 1, last_error=error,
                                   last_error_at=iso_utc(datetime.now(UTC)),
                                   consecutive_failures=self._status.consecutive_failures + 1)
        log.warning("%s: %s %s for post %s failed (attempt %d), retrying in %.2f s: %s", self.name,
                    event.type, event.id, event.post_id, attempts, delay, error)
        if seq is not None:
            # If the store cannot record this either, the StoreError ends the pass and run() waits a while;
            # the delivery is still pending and due, so it is tried again then.
            self.store.mark_failed(seq, self.name, error, now + delay)
        return now + delay

    def _record_sent(self) -> None:
        """Record in the store the deliveries made while it could not write."""
        if not self._sent:
            return
        held = {e.id for e in self._backlog.events()}
        for event_id, at in list(self._sent.items()):
            try:
                recorded = self.store.mark_sent(event_id, self.name, at)
            except StoreError:
                return  # still failing: try again on the next pass
            if recorded or event_id not in held:
                del self._sent[event_id]  # recorded, or never to be stored (lost from a full backlog)

    # -- the threads --------------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Dispatch until ``stop`` is set, with ``concurrency`` senders; joins them before returning."""
        self._senders = [threading.Thread(target=self._sender, name=f"outbox-{self.name}-{n}", daemon=True)
                         for n in range(self.concurrency)]
        for sender in self._senders:
            sender.start()
        try:
            self._dispatch(stop)
        finally:
            for _ in self._senders:
                self._jobs.put(None)
            for sender in self._senders:
                sender.join()  # a sender inside a network call returns within the target's timeout
            self._senders = []
            try:
                self._collect(self._clock())  # record what went out meanwhile, so a restart need not resend it
            except Exception:  # noqa: BLE001 - thread boundary: a restart resends what is not recorded
                log.exception("%s: could not record the last deliveries", self.name)
            self._flying.clear()

    def _dispatch(self, stop: threading.Event) -> None:
        while not stop.is_set():
            # Clear before looking, so an event published (or a delivery finished) meanwhile wakes the next
            # wait at once.
            self.wake.clear()
            try:
                next_due = self.step(self._clock(), stop.is_set)
            except Exception:  # noqa: BLE001 - thread boundary: log (a database hiccup) and keep delivering
                log.exception("%s: outbox worker failed; retrying", self.name)
                next_due = self._clock() + self._backoff.cap / 4
            wait = IDLE_RECHECK if next_due is None else max(0.0, next_due - self._clock())
            self.wake.wait(min(wait, IDLE_RECHECK))
