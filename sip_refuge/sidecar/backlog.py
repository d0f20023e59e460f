"""Writes the store could not take (a full disk, an I/O error), kept in memory, in order, until it can.

Every change the hub makes is one :class:`Write`: the store changes and the events they raise, committed in
one transaction. When that fails for a storage reason the write waits here, and every later write queues
behind it, so the database receives them in the order they happened once it works again.

Memory is bounded by ``limit`` bytes (an estimate: the JSON of the events and reports). When it is full, the
oldest telemetry reports go first (the post's status they carry is also kept in the hub's memory), then a
new write that does not fit is lost: counted in ``lost``, and reported loudly by the outbox.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from typing import TYPE_CHECKING

from sip_refuge.sidecar.events import Event, iso_utc

if TYPE_CHECKING:
    from sip_refuge.sidecar.store import Store

CALL = "call"  # incidents, timelines and events: the record of the service, kept to the last
TELEMETRY = "telemetry"  # a post's report without an event: given up first when memory runs short
LIMIT = 32 * 1024 * 1024  # bytes; tens of thousands of events, far more than any outage needs
OVERHEAD = 512  # bytes counted per write beside its JSON: the closure, the rows' keys


@dataclass(frozen=True)
class Write:
    changes: Callable[[Store], None] | None
    events: tuple[Event, ...]
    kind: str  # CALL or TELEMETRY
    at: float  # the outbox clock when it was made: its deliveries are due from then
    size: int  # estimated bytes


@dataclass(frozen=True)
class BacklogStatus:
    writes: int
    events: int
    bytes: int
    limit: int
    since: str | None  # ISO UTC of the oldest write held
    lost: dict[str, int] = field(default_factory=dict)  # writes lost since start, by kind
    last_lost_at: str | None = None


class Backlog:
    def __init__(self, limit: int = LIMIT) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._writes: deque[Write] = deque()
        self._bytes = 0
        self._since: str | None = None
        self._lost: Counter[str] = Counter()
        self._last_lost_at: str | None = None

    def __len__(self) -> int:
        with self._lock:
            return len(self._writes)

    def push(self, write: Write) -> list[Write]:
        """Hold ``write``; returns the writes lost to make room (older telemetry, or ``write`` itself)."""
        lost: list[Write] = []
        with self._lock:
            while self._bytes + write.size > self.limit:
                oldest = next((w for w in self._writes if w.kind == TELEMETRY), None)
                if oldest is None or write.size > self.limit:
                    lost.append(write)
                    break
                self._writes.remove(oldest)
                self._bytes -= oldest.size
                lost.append(oldest)
            else:
                if not self._writes:
                    self._since = iso_utc(datetime.now(UTC))
                self._writes.append(write)
                self._bytes += write.size
            for gone in lost:
                self._lost[gone.kind] += 1
            if lost:
                self._last_lost_at = iso_utc(datetime.now(UTC))
        return lost

    def head(self, count: int) -> list[Write]:
        """The oldest ``count`` writes held."""
        with self._lock:
            return list(islice(self._writes, count))

    def pop(self, writes: list[Write]) -> None:
        """Forget ``writes`` (now stored, or impossible to store): the oldest held, in order. Any of them
        already gone (lost to make room meanwhile) is skipped."""
        with self._lock:
            gone = {id(w) for w in writes}
            while self._writes and id(self._writes[0]) in gone:
                self._bytes -= self._writes.popleft().size
            if not self._writes:
                self._since = None

    def events(self) -> list[Event]:
        """The events held, oldest first (for delivery from memory)."""
        with self._lock:
            return [e for w in self._writes for e in w.events]

    def status(self) -> BacklogStatus:
        with self._lock:
            return BacklogStatus(len(self._writes), sum(len(w.events) for w in self._writes), self._bytes,
                                 self.limit, self._since, dict(self._lost), self._last_lost_at)
