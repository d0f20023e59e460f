"""Retention: the database forgets old events, deliveries and telemetry, so it cannot fill the disk by itself.

``sidecar.retention`` in the site file sets the ages (events and their deliveries 400 days, telemetry 30
days, the audit log 400 days) and how many bytes of telemetry each post keeps (16 MB: a post that floods the
API only replaces its own history). Incidents and their timelines are the legal record of the service and are kept for ever
unless ``retention.incidents`` says otherwise; a live incident is never pruned.

:class:`Pruner` runs in the runner's "retention" thread: once at start, then every ``PRUNE_EVERY`` seconds.
Deletes go in small batches, each its own short transaction, so calls are never held up behind a prune.
The hub trims a post's telemetry in between, as it grows (``TelemetryBudget``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sip_refuge.config.model import Retention
from sip_refuge.sidecar.events import iso_utc
from sip_refuge.sidecar.store import Store, StoreError

log = logging.getLogger(__name__)

PRUNE_EVERY = 3600.0  # seconds between prunes
BATCH = 1000  # rows per delete transaction
TRIM_STEP = 8  # a post's telemetry is trimmed each time it has grown by 1/TRIM_STEP of its budget


@dataclass
class PruneStatus:
    last_run: str | None = None
    last_error: str | None = None
    pruned: Counter[str] = field(default_factory=Counter)  # rows deleted since start, by table


def prune(store: Store, policy: Retention, now: datetime) -> Counter[str]:
    """Delete what ``policy`` no longer keeps at ``now``; returns the rows deleted by table."""
    deleted: Counter[str] = Counter()

    def before(seconds: int) -> str:
        return iso_utc(now - timedelta(seconds=seconds))

    lost_pending = 0
    while True:
        events, pending = store.prune_events(before(policy.events), BATCH)
        deleted["events"] += events
        lost_pending += pending
        if events < BATCH:
            break
    if lost_pending:
        log.warning("retention: %d deliveries older than %d days were still pending and are dropped with their "
                    "events", lost_pending, policy.events // 86400)
    while (n := store.prune_telemetry(before(policy.telemetry), BATCH)) > 0:
        deleted["telemetry"] += n
    for post_id in store.telemetry_posts():
        deleted["telemetry"] += store.trim_telemetry(post_id, policy.telemetry_per_post)
    while (n := store.prune_audit(before(policy.audit), BATCH)) > 0:
        deleted["audit"] += n
    if policy.incidents is not None:
        while (n := store.prune_incidents(before(policy.incidents), BATCH)) > 0:
            deleted["incidents"] += n
    deleted = +deleted  # only the tables something was deleted from
    if deleted:
        log.info("retention: deleted %s", ", ".join(f"{n} {table}" for table, n in sorted(deleted.items())))
    return deleted


class Pruner:
    """Prunes ``store`` by ``policy`` at start and every ``every`` seconds; ``run(stop)`` is a thread body."""

    def __init__(self, store: Store, policy: Retention, *, every: float = PRUNE_EVERY,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.store, self.policy, self.every, self.clock = store, policy, every, clock
        self._lock = threading.Lock()
        self._status = PruneStatus()

    def status(self) -> PruneStatus:
        with self._lock:
            return PruneStatus(self._status.last_run, self._status.last_error, Counter(self._status.pruned))

    def prune_once(self) -> None:
        now = self.clock()
        try:
            deleted = prune(self.store, self.policy, now)
        except StoreError as exc:
            # A full disk can fail a delete too (WAL space): the next run tries again; /healthz shows the store.
            log.warning("retention: prune failed, next attempt in %.0f s: %s", self.every, exc)
            with self._lock:
                self._status.last_error = str(exc)
            return
        with self._lock:
            self._status.last_run, self._status.last_error = iso_utc(now), None
            self._status.pruned.update(deleted)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                self.prune_once()
            except Exception:  # noqa: BLE001 - thread boundary: pruning must never stop the sidecar
                log.exception("retention: prune failed")
            stop.wait(max(0.0, self.every - (time.monotonic() - started)))


class TelemetryBudget:
    """Trims a post's stored telemetry to its byte budget as it grows, between the hourly prunes: a post that
    floods the API with reports (a stolen token) cannot grow the database beyond its budget for long."""

    def __init__(self, keep_bytes: int) -> None:
        self.keep_bytes = keep_bytes
        self._grown: dict[str, int] = {}

    def added(self, store: Store, post_id: str, size: int) -> None:
        grown = self._grown.get(post_id, 0) + size
        if grown < self.keep_bytes // TRIM_STEP:
            self._grown[post_id] = grown
            return
        self._grown[post_id] = 0
        try:
            store.trim_telemetry(post_id, self.keep_bytes)
        except StoreError as exc:
            log.warning("post %s: telemetry could not be trimmed: %s", post_id, exc)
