"""The durable outbox: every event is committed to the store first, then delivered to every CCTV target.

- One worker per target, each with its own thread: a slow or dead target only ever delays itself.
- Per target, events of one stream (an incident, or one post's state changes) go strictly in order: only
  the oldest pending delivery of a stream is attempted (see ``Store.due``). Other streams go on meanwhile.
- Failures are retried with exponential backoff and jitter, capped; the event id stays the same, so
  delivery is at-least-once and receivers de-duplicate by id.
- All delivery state is in the database, so a restarted sidecar resumes exactly where the old one stopped.

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
from sip_refuge.sidecar.events import Event, iso_utc, unrevealed
from sip_refuge.sidecar.store import Delivery, Store
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
                 mask: Callable[[str], str], clock: Callable[[], float], rng: random.Random) -> None:
        self.store = store
        self.target = target
        self.name = target.name
        self._reveal = reveal
        self._backoff = backoff
        self._mask = mask
        self._clock = clock
        self._rng = rng
        self.wake = threading.Event()
        self._lock = threading.Lock()
        self._status = TargetStatus(self.name, last_success=store.last_delivered(self.name))

    def status(self) -> TargetStatus:
        with self._lock:
            status = self._status
        return replace(status, pending=self.store.pending_count(self.name))

    def step(self, now: float, should_stop: Callable[[], bool] = lambda: False) -> float | None:
        """Attempt every delivery due at ``now``; return when the next one is due (None: nothing pending)."""
        while not should_stop():
            due = self.store.due(self.name, now)
            if not due:
                break
            for delivery in due:
                if should_stop():
                    break
                self._attempt(delivery, now)
            # Each success may have made the next event of its stream the head, due at once: go round again.
            # Failures are rescheduled after ``now``, so this ends.
        return self.store.next_attempt(self.name)

    def _attempt(self, delivery: Delivery, now: float) -> None:
        event = delivery.event
        outgoing = self._reveal(event) if self.target.reveal_credentials else event
        try:
            self.target.deliver(outgoing)
        except TargetError as exc:
            self._failed(delivery, now, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - a target bug must not kill its worker; retry like a failure
            log.exception("%s: target raised unexpectedly on %s for post %s", self.name, event.id, event.post_id)
            self._failed(delivery, now, f"{type(exc).__name__}: {exc}")
            return
        at = datetime.now(UTC)
        self.store.mark_delivered(delivery.seq, self.name, at)
        with self._lock:
            self._status = replace(self._status, delivered=self._status.delivered + 1,
                                   last_success=iso_utc(at), consecutive_failures=0)
        log.info("%s: delivered %s %s for post %s (attempt %d)", self.name, event.type, event.id,
                 event.post_id, delivery.attempts + 1)

    def _failed(self, delivery: Delivery, now: float, error: str) -> None:
        error = self._mask(error)
        attempts = delivery.attempts + 1
        delay = self._backoff.delay(attempts, self._rng)
        self.store.mark_failed(delivery.seq, self.name, error, now + delay)
        with self._lock:
            self._status = replace(self._status, failed=self._status.failed + 1, last_error=error,
                                   last_error_at=iso_utc(datetime.now(UTC)),
                                   consecutive_failures=self._status.consecutive_failures + 1)
        log.warning("%s: %s %s for post %s failed (attempt %d), retrying in %.2f s: %s", self.name,
                    delivery.event.type, delivery.event.id, delivery.event.post_id, attempts, delay, error)

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


class Outbox:
    """Stores events and delivers them to ``targets`` (names must be unique)."""

    def __init__(self, store: Store, targets: Sequence[Target], *, reveal: Callable[[Event], Event] = unrevealed,
                 backoff: Backoff | None = None, mask: Callable[[str], str] = mask_url,
                 clock: Callable[[], float] = time.time, rng: random.Random | None = None) -> None:
        names = [t.name for t in targets]
        if len(set(names)) != len(names):
            raise SidecarError(f"cctv target names must be unique: {', '.join(names)}")
        self.store = store
        self._clock = clock
        rng = rng or random.Random()
        self.workers = {t.name: TargetWorker(store, t, reveal=reveal, backoff=backoff or Backoff(), mask=mask,
                                             clock=clock, rng=random.Random(rng.random())) for t in targets}
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def publish(self, event: Event) -> bool:
        """Commit ``event`` with a pending delivery per target, then wake the workers.

        Returns False when this event id was already stored (nothing new to send). Inside a caller's
        ``store.transaction()`` the workers see the event once that transaction commits.
        """
        added = self.store.add_event(event, list(self.workers), self._clock())
        if added:
            for worker in self.workers.values():
                worker.wake.set()
        return added

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
