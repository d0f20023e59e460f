"""The durable outbox: every event is committed to the store first, then delivered to every CCTV target.

- One worker per target (:mod:`sip_refuge.sidecar.dispatch`), each with its own threads: a slow or dead
  target only ever delays itself.
- Per target, events of one stream (an incident, or one post's state changes) go strictly in order: only
  the oldest pending delivery of a stream is attempted (see ``Store.due``), and only once the stream has
  nothing on the wire. The heads of different streams go at once, up to the target's ``concurrency``
  (``call.queued`` first), so a burst of calls does not queue behind one HTTP round trip after another.
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
from collections.abc import Callable, Mapping, Sequence

from sip_refuge.config.secrets import mask_url
from sip_refuge.errors import SidecarError
from sip_refuge.sidecar.backlog import CALL, OVERHEAD, Backlog, Write
from sip_refuge.sidecar.dispatch import DEFAULT_CONCURRENCY, IDLE_RECHECK, Backoff, TargetStatus, TargetWorker
from sip_refuge.sidecar.events import Event, unrevealed
from sip_refuge.sidecar.store import Store, StoreError
from sip_refuge.sidecar.targets import Target

__all__ = ["DEFAULT_CONCURRENCY", "DUPLICATE", "HELD", "IDLE_RECHECK", "LOST", "STORED", "Backoff", "Outbox",
           "TargetStatus", "TargetWorker"]

log = logging.getLogger(__name__)

STORED, DUPLICATE, HELD, LOST = "stored", "duplicate", "held", "lost"
FLUSH_RETRY = 1.0  # seconds between attempts at storing the backlog while the store fails
FLUSH_BATCH = 500  # held writes stored per transaction


class Outbox:
    """Stores events and delivers them to ``targets`` (names must be unique)."""

    def __init__(self, store: Store, targets: Sequence[Target], *, reveal: Callable[[Event], Event] = unrevealed,
                 backoff: Backoff | None = None, mask: Callable[[str], str] = mask_url,
                 clock: Callable[[], float] = time.time, rng: random.Random | None = None,
                 backlog: Backlog | None = None, concurrency: int | Mapping[str, int] = DEFAULT_CONCURRENCY) -> None:
        """``concurrency``: deliveries in flight per target, one number for all or by target name."""
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
                                             clock=clock, rng=random.Random(rng.random()), backlog=self.backlog,
                                             concurrency=concurrency if isinstance(concurrency, int)
                                             else concurrency.get(t.name, DEFAULT_CONCURRENCY))
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
        """Deliver until ``stop`` is set: one dispatching thread per target (each with its senders), joined
        before returning."""
        threads = [threading.Thread(target=w.run, args=(stop,), name=f"outbox-{name}", daemon=True)
                   for name, w in self.workers.items()]
        for thread in threads:
            thread.start()
        stop.wait()
        for worker in self.workers.values():
            worker.wake.set()
        for thread in threads:
            thread.join()  # each joins its senders, which return within the target's timeout

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
