"""The durable outbox: every event is committed to the store first, then delivered to every CCTV target.

- One worker per target, each with its own thread: a slow or dead target only ever delays itself.
- Per target, events of one stream (an incident, or one post's state changes) go strictly in order: only
  the oldest pending delivery of a stream is attempted (see ``Store.due``). Other streams go on meanwhile.
- Failures are retried with exponential backoff and jitter, capped; the event id stays the same, so
  delivery is at-least-once and receivers de-duplicate by id.
- All delivery state is in the database, so a restarted sidecar resumes exactly where the old one stopped.

When the store cannot write (a full disk), a change and its events wait in the :class:`Backlog` in memory,
and workers deliver those events from memory meanwhile, still in stream order behind anything pending in the
database: a person pressing for help during a disk-full must still reach the control room's screens. A
delivery made from memory (or one the store could not record) is kept in the worker's ``_sent``; once the
backlog is stored, the worker records it as delivered instead of sending it again. ``flush()`` stores the
backlog, oldest first, once the store takes writes again; the hub calls it every second.

The runner owns the threads: ``Outbox.run(stop)`` blocks until ``stop`` is set; ``start()``/``stop()`` wrap
it for callers without a runner. ``step(now)`` does one synchronous pass, for tests and tools.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from sip_refuge.config.secrets import mask_url
from sip_refuge.errors import SidecarError
from sip_refuge.sidecar.backlog import CALL, OVERHEAD, Backlog, Write
from sip_refuge.sidecar.events import Event, iso_utc, unrevealed
from sip_refuge.sidecar.store import Delivery, Store, StoreError
from sip_refuge.sidecar.targets import Target, TargetError

log = logging.getLogger(__name__)

IDLE_RECHECK = 30.0  # seconds; also picks up rows another process (a CLI tool) added to the database


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

    @property
    def healthy(self) -> bool:
        return self.consecutive_failures == 0


class TargetWorker:
    """Delivers one target's pending events; ``run`` is its thread's body."""

    def __init__(self, store: Store, target: Target, *, reveal: Callable[[Event], Event], backoff: Backoff,
                 mask: Callable[[str], str], clock: Callable[[], float], rng: random.Random,
                 backlog: Backlog | None = None) -> None:
        self.store = store
        self.target = target
        self.name = target.name
        self._reveal = reveal
        self._backoff = backoff
        self._mask = mask
        self._clock = clock
        self._rng = rng
        self._backlog = backlog if backlog is not None else Backlog()
        self.wake = threading.Event()
        self._lock = threading.Lock()
        self._status = TargetStatus(self.name, last_success=store.last_delivered(self.name))
        # Only the worker's own thread touches these two.
        self._sent: dict[str, str] = {}  # event id -> ISO time delivered, not yet recorded in the store
        self._retry: dict[str, tuple[int, float]] = {}  # held event id -> (failed attempts, next attempt)

    def status(self) -> TargetStatus:
        with self._lock:
            status = self._status
        sent = set(self._sent.copy())  # copy(): atomic while the worker's thread changes it
        held = sum(1 for e in self._backlog.events() if e.id not in sent)
        try:
            stored = self.store.pending_count(self.name, sent)
        except StoreError:
            stored = 0  # /healthz reports the store's fault itself
        return replace(status, pending=stored + held)

    def step(self, now: float, should_stop: Callable[[], bool] = lambda: False) -> float | None:
        """Attempt every delivery due at ``now``, from the store then from memory; return when the next one
        is due (None: nothing pending)."""
        try:
            self._record_sent()
            while not should_stop():
                due = self.store.due(self.name, now, sent=self._sent)
                if not due:
                    break
                for delivery in due:
                    if should_stop():
                        break
                    self._attempt(delivery, now)
                # Each success may have made the next event of its stream the head, due at once: go round
                # again. Failures are rescheduled after ``now``, so this ends.
            stored: float | None = self.store.next_attempt(self.name, self._sent)
        except StoreError as exc:
            if not exc.storage:
                raise
            stored = now + self._backoff.cap / 4  # the store logs and reports its fault; try it again later
        held = self._step_held(now, should_stop)
        return min((t for t in (stored, held) if t is not None), default=None)

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

    def _attempt(self, delivery: Delivery, now: float) -> None:
        event = delivery.event
        error = self._send(event)
        if error is not None:
            self._failed(event, delivery.attempts + 1, now, error, delivery.seq)
            return
        at = datetime.now(UTC)
        try:
            self.store.mark_delivered(delivery.seq, self.name, at)
        except StoreError:
            self._sent[event.id] = iso_utc(at)  # delivered: never again; recorded once the store can
        self._succeeded(event, delivery.attempts + 1, at, "")

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
            # If the store cannot record this either, the StoreError ends the pass and run() waits a while.
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

    def _step_held(self, now: float, should_stop: Callable[[], bool]) -> float | None:
        """Deliver the events held in memory, each behind anything of its stream still pending."""
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
        for event in events:
            if should_stop():
                break
            if event.id in self._sent or event.stream in blocked:
                continue
            blocked.add(event.stream)  # later events of this stream wait for this one
            attempts, at = self._retry.get(event.id, (0, now))
            if at > now:
                next_due = at if next_due is None else min(next_due, at)
                continue
            error = self._send(event)
            if error is None:
                when = datetime.now(UTC)
                self._sent[event.id] = iso_utc(when)
                self._retry.pop(event.id, None)
                blocked.discard(event.stream)
                self._succeeded(event, attempts + 1, when, " from memory (the store cannot write)")
            else:
                retry_at = self._failed(event, attempts + 1, now, error)
                self._retry[event.id] = (attempts + 1, retry_at)
                next_due = retry_at if next_due is None else min(next_due, retry_at)
        return next_due

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            # Clear before looking, so an event published while we deliver wakes the next wait at once.
            self.wake.clear()
            try:
                next_due = self.step(self._clock(), stop.is_set)
            except Exception:  # noqa: BLE001 - thread boundary: log (a database hiccup) and keep delivering
                log.exception("%s: outbox worker failed; retrying", self.name)
                next_due = self._clock() + self._backoff.cap / 4
            wait = IDLE_RECHECK if next_due is None else max(0.0, next_due - self._clock())
            self.wake.wait(min(wait, IDLE_RECHECK))


STORED, DUPLICATE, HELD, LOST = "stored", "duplicate", "held", "lost"
FLUSH_RETRY = 1.0  # seconds between attempts at storing the backlog while the store fails
FLUSH_BATCH = 500  # held writes stored per transaction


class Outbox:
    """Stores events and delivers them to ``targets`` (names must be unique)."""

    def __init__(self, store: Store, targets: Sequence[Target], *, reveal: Callable[[Event], Event] = unrevealed,
                 backoff: Backoff | None = None, mask: Callable[[str], str] = mask_url,
                 clock: Callable[[], float] = time.time, rng: random.Random | None = None,
                 backlog: Backlog | None = None) -> None:
        names = [t.name for t in targets]
        if len(set(names)) != len(names):
            raise SidecarError(f"cctv target names must be unique: {', '.join(names)}")
        self.store = store
        self.backlog = backlog if backlog is not None else Backlog()
        self._clock = clock
        self._write_lock = threading.RLock()  # keeps writes in order between record() and flush()
        self._next_flush = 0.0
        rng = rng or random.Random()
        self.workers = {t.name: TargetWorker(store, t, reveal=reveal, backoff=backoff or Backoff(), mask=mask,
                                             clock=clock, rng=random.Random(rng.random()), backlog=self.backlog)
                        for t in targets}
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def record(self, changes: Callable[[Store], None] | None, events: Sequence[Event], *, kind: str = CALL,
               size: int = 0) -> str:
        """Commit ``changes`` and ``events`` (a pending delivery per target each) in one transaction, then
        wake the workers. While the store cannot write, hold them in memory instead (after any held before).

        Returns STORED, DUPLICATE (every event was already stored), HELD or LOST (memory is full). A
        StoreError that is not a storage failure (a bug in ``changes``) is raised: nothing is kept.
        """
        write = Write(changes, tuple(events), kind, self._clock(),
                      size + OVERHEAD + sum(len(e.to_json()) for e in events))
        with self._write_lock:
            self.flush()
            if not len(self.backlog):
                try:
                    added = self._store(write)
                except StoreError as exc:
                    if not exc.storage:
                        raise
                else:
                    self._wake()
                    return STORED if added or not events else DUPLICATE
            lost = self.backlog.push(write)
        for gone in lost:
            self._report_lost(gone)
        self._wake()  # workers deliver held events from memory
        return LOST if write in lost else HELD

    def publish(self, event: Event) -> bool:
        """Commit ``event`` with a pending delivery per target, then wake the workers.

        Returns False when this event id was already stored (nothing new to send).
        """
        return self.record(None, [event]) != DUPLICATE

    def flush(self, force: bool = False) -> int:
        """Store the oldest held writes (up to FLUSH_BATCH, in one transaction: one disk sync for all); returns
        how many were stored. While the store keeps failing this tries at most every FLUSH_RETRY s (``force``
        tries now). The hub calls it every second, so a long backlog drains without holding the hub up."""
        with self._write_lock:
            if not len(self.backlog) or (not force and self._clock() < self._next_flush):
                return 0
            batch = self.backlog.head(FLUSH_BATCH)
            try:
                with self.store.transaction():
                    for write in batch:
                        self._store(write)
            except StoreError as exc:
                batch = [] if exc.storage else self._store_each(batch)
            if not batch:  # the store still fails
                self._next_flush = self._clock() + FLUSH_RETRY
                return 0
            self.backlog.pop(batch)
            self._wake()
            if not len(self.backlog):
                log.warning("database %s: the writes held in memory are stored", self.store.path)
            return len(batch)

    def _store_each(self, batch: list[Write]) -> list[Write]:
        """A batch failed, not for the store's sake: store its writes one at a time. One that cannot be stored
        at all (a fault in sip-refuge) is dropped, loudly, rather than block every write behind it. Returns
        the writes dealt with, up to the first the store itself refuses."""
        done: list[Write] = []
        for write in batch:
            try:
                self._store(write)
            except StoreError as exc:
                if exc.storage:
                    break
                log.error("a held %s write cannot be stored and is dropped (%s): %s", write.kind,
                          ", ".join(f"{e.type} {e.id}" for e in write.events) or "no events", exc)
            done.append(write)
        return done

    def _store(self, write: Write) -> bool:
        with self.store.transaction():
            if write.changes is not None:
                write.changes(self.store)
            added = [self.store.add_event(e, list(self.workers), write.at) for e in write.events]
        return any(added)

    def _report_lost(self, write: Write) -> None:
        status = self.backlog.status()
        for event in write.events:
            log.error("memory for held writes is full (%d writes, %d bytes): %s %s for post %s is LOST, neither "
                      "stored nor sent to CCTV targets; free space for the database %s", status.writes,
                      status.bytes, event.type, event.id, event.post_id, self.store.path)
        if not write.events:
            log.error("memory for held writes is full (%d writes, %d bytes): a %s write is lost (%d so far); "
                      "free space for the database %s", status.writes, status.bytes, write.kind,
                      status.lost.get(write.kind, 0), self.store.path)

    def _wake(self) -> None:
        for worker in self.workers.values():
            worker.wake.set()

    def step(self, now: float) -> float | None:
        """One synchronous pass over every target; when the next delivery is due (None: nothing pending)."""
        due = [w.step(now) for w in self.workers.values()]
        pending = [d for d in due if d is not None]
        return min(pending) if pending else None

    def status(self) -> list[TargetStatus]:
        return [w.status() for w in self.workers.values()]

    def run(self, stop: threading.Event) -> None:
        """Deliver until ``stop`` is set: one thread per target, joined before returning."""
        threads = [threading.Thread(target=w.run, args=(stop,), name=f"outbox-{name}", daemon=True)
                   for name, w in self.workers.items()]
        for thread in threads:
            thread.start()
        stop.wait()
        for worker in self.workers.values():
            worker.wake.set()
        for thread in threads:
            # A worker inside a network call returns within the target's timeout.
            thread.join()

    def start(self) -> None:
        """Run in a background thread (for callers without a runner); ``stop()`` ends it."""
        if self._thread is not None:
            raise SidecarError("the outbox is already running")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.run, args=(self._stop,), name="outbox", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._stop is None or self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._stop = self._thread = None

    def close(self) -> None:
        self.stop()
        for worker in self.workers.values():
            worker.target.close()
