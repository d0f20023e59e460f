"""The store's event outbox: events for the CCTV targets and one delivery record per target.

Each target takes one incident's (or post's) events in order, a few incidents at once (``cctv[].concurrency``):
a delivery is due when it is the oldest pending one of its stream and its stream is not busy.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from datetime import datetime

from sip_refuge.sidecar.events import Event, event_from_json, iso_utc
from sip_refuge.sidecar.records import Delivery
from sip_refuge.sidecar.store_base import StoreBase

PENDING = "pending"
DELIVERED = "delivered"


def _ids(values: Iterable[str]) -> str:
    """A JSON array for ``json_each(?)``: any number of ids in one bound variable."""
    return json.dumps(sorted(values))


class EventTables(StoreBase):
    """``events`` and ``deliveries``."""

    # -- events and deliveries --------------------------------------------------------------------------

    def add_event(self, event: Event, targets: Iterable[str], now: float) -> bool:
        """Commit ``event`` and one pending delivery per target, due at ``now``. False if already stored."""
        with self.transaction():
            cur = self._exec(
                "INSERT OR IGNORE INTO events (id, type, timestamp, incident, post_id, stream, body)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (event.id, event.type, event.timestamp, event.incident, event.post_id, event.stream,
                 event.to_json()))
            if cur.rowcount == 0:
                return False
            seq = cur.lastrowid
            with self._guard():
                self._db.executemany(
                    "INSERT INTO deliveries (event_seq, event_id, target, stream, status, next_attempt_at)"
                    " VALUES (?, ?, ?, ?, 'pending', ?)",
                    [(seq, event.id, target, event.stream, now) for target in targets])
            return True

    def _event(self, row: sqlite3.Row) -> Event:
        return event_from_json(row["id"], row["incident"], row["post_id"], row["body"])

    def event(self, event_id: str) -> Event | None:
        row = self._one("SELECT * FROM events WHERE id = ?", (event_id,))
        return None if row is None else self._event(row)

    def events_since(self, seq: int = 0, limit: int = 100) -> list[tuple[int, Event]]:
        """Events after ``seq`` in creation order, for the SSE feed (which resumes by Last-Event-ID)."""
        rows = self._all("SELECT * FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit))
        return [(int(r["seq"]), self._event(r)) for r in rows]

    # The head of a stream is its oldest pending delivery; only heads may be attempted, which keeps each
    # incident's events in order at each target while other incidents (and other targets) go on. ``:sent``
    # lists events a worker delivered but could not yet record (the store was failing): they count as done.
    _PENDING = "status = 'pending' AND event_id NOT IN (SELECT value FROM json_each(:sent))"
    # ``:busy`` lists streams with an event on the wire: their next event waits for that one's outcome.
    _HEADS = f"""
        SELECT d.event_seq, d.attempts, d.next_attempt_at, e.id, e.type, e.incident, e.post_id, e.body
        FROM deliveries d JOIN events e ON e.seq = d.event_seq
        WHERE d.target = :target AND d.{_PENDING} AND d.stream NOT IN (SELECT value FROM json_each(:busy))
          AND d.event_seq = (SELECT MIN(d2.event_seq) FROM deliveries d2
                             WHERE d2.target = d.target AND d2.{_PENDING} AND d2.stream = d.stream)
    """

    def due(self, target: str, now: float, limit: int = 50, sent: Iterable[str] = (),
            busy: Iterable[str] = ()) -> list[Delivery]:
        """Stream heads for ``target`` whose next attempt is due at ``now``, but those of ``busy`` streams:
        ``call.queued`` first (it puts the caller's camera on screen), then oldest first."""
        rows = self._all(self._HEADS + " AND d.next_attempt_at <= :now"
                         " ORDER BY e.type = 'call.queued' DESC, d.event_seq LIMIT :limit",
                         {"target": target, "now": now, "limit": limit, "sent": _ids(sent), "busy": _ids(busy)})
        return [Delivery(int(r["event_seq"]), target, int(r["attempts"]), float(r["next_attempt_at"]),
                         self._event(r)) for r in rows]

    def next_attempt(self, target: str, sent: Iterable[str] = (), busy: Iterable[str] = ()) -> float | None:
        """When the earliest stream head of ``target`` (but those of ``busy`` streams) is due; None when
        nothing is pending."""
        value = self._all(f"SELECT MIN(next_attempt_at) FROM ({self._HEADS})",
                          {"target": target, "sent": _ids(sent), "busy": _ids(busy)})[0][0]
        return None if value is None else float(value)

    def pending_streams(self, target: str, sent: Iterable[str] = ()) -> set[str]:
        """Streams with a delivery to ``target`` still pending: events held in memory wait behind them."""
        rows = self._all(f"SELECT DISTINCT stream FROM deliveries WHERE target = :target AND {self._PENDING}",
                         {"target": target, "sent": _ids(sent)})
        return {str(r[0]) for r in rows}

    def mark_delivered(self, seq: int, target: str, at: datetime) -> None:
        self._exec("UPDATE deliveries SET status = 'delivered', attempts = attempts + 1, delivered_at = ?,"
                   " last_error = NULL WHERE event_seq = ? AND target = ?", (iso_utc(at), seq, target))

    def mark_sent(self, event_id: str, target: str, at: str) -> bool:
        """Record a delivery made while the store could not write; False when the event is not stored (yet)."""
        cur = self._exec("UPDATE deliveries SET status = 'delivered', attempts = attempts + 1, delivered_at = ?,"
                         " last_error = NULL WHERE event_seq = (SELECT seq FROM events WHERE id = ?)"
                         " AND target = ? AND status = 'pending'", (at, event_id, target))
        return cur.rowcount == 1

    def mark_failed(self, seq: int, target: str, error: str, next_attempt_at: float) -> None:
        self._exec("UPDATE deliveries SET attempts = attempts + 1, last_error = ?, next_attempt_at = ?"
                   " WHERE event_seq = ? AND target = ?", (error, next_attempt_at, seq, target))

    def pending_count(self, target: str, sent: Iterable[str] = ()) -> int:
        return int(self._all(f"SELECT COUNT(*) FROM deliveries WHERE target = :target AND {self._PENDING}",
                             {"target": target, "sent": _ids(sent)})[0][0])

    def delivery_counts(self) -> dict[str, dict[str, int]]:
        """``{target: {status: count}}`` over the whole database, for /metrics."""
        out: dict[str, dict[str, int]] = {}
        for row in self._all("SELECT target, status, COUNT(*) FROM deliveries GROUP BY target, status"):
            out.setdefault(row[0], {})[row[1]] = int(row[2])
        return out

    def last_delivered(self, target: str) -> str | None:
        value = self._scalar("SELECT MAX(delivered_at) FROM deliveries WHERE target = ?", (target,))
        return None if value is None else str(value)

    def prune_events(self, before: str, batch: int = 1000) -> tuple[int, int]:
        """Delete up to ``batch`` events stamped before ``before`` (ISO UTC) with their deliveries. Returns
        (events deleted, of their deliveries how many were still pending)."""
        with self.transaction():
            seqs = json.dumps([r[0] for r in self._all(
                "SELECT seq FROM events WHERE timestamp < ? ORDER BY timestamp, seq LIMIT ?", (before, batch))])
            pending = int(self._scalar("SELECT COUNT(*) FROM deliveries WHERE status = 'pending' AND event_seq IN"
                                       " (SELECT value FROM json_each(?))", (seqs,)))
            self._exec("DELETE FROM deliveries WHERE event_seq IN (SELECT value FROM json_each(?))", (seqs,))
            return self._exec("DELETE FROM events WHERE seq IN (SELECT value FROM json_each(?))",
                              (seqs,)).rowcount, pending
