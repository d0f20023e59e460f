"""The store's incident log: incidents (the legal record of the service) and their timelines."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sip_refuge.errors import SidecarError
from sip_refuge.sidecar.events import iso_utc
from sip_refuge.sidecar.records import Incident, TimelineEntry
from sip_refuge.sidecar.store_base import StoreBase

_IN_CHUNK = 500  # ids per IN (...) list; SQLite allows 999 bound variables in older builds
_INCIDENT_FIELDS = ("state", "answered_by", "answered_at", "ended", "outcome", "snapshot", "pbx")


class IncidentTables(StoreBase):
    """``incidents`` and ``timeline``."""

    # -- incidents --------------------------------------------------------------------------------------

    def open_incident(self, incident_id: str, post_id: str, at: datetime, state: str = "queued", *,
                      reference: tuple[str, int] | None = None) -> bool:
        """Create the incident, with its ``reference`` (text, number); False if it exists (AMI re-sync may
        announce a call twice)."""
        text, number = reference if reference is not None else (None, None)
        cur = self._exec("INSERT OR IGNORE INTO incidents (id, post_id, state, created, reference, ref_number)"
                         " VALUES (?, ?, ?, ?, ?, ?)", (incident_id, post_id, state, iso_utc(at), text, number))
        return cur.rowcount == 1

    def last_reference_number(self) -> int:
        """The highest reference number given so far (0 before the first)."""
        return int(self._scalar("SELECT COALESCE(MAX(ref_number), 0) FROM incidents"))

    def close_incident(self, incident_id: str, *, reason: str, note: str | None, by: str | None,
                       at: datetime) -> bool:
        """Record an operator's close-out of an ended incident; False when it is not there, not ended, or
        already closed (an incident is closed once)."""
        cur = self._exec("UPDATE incidents SET closed_at = ?, closed_by = ?, close_reason = ?, close_note = ?"
                         " WHERE id = ? AND state = 'ended' AND closed_at IS NULL",
                         (iso_utc(at), by, reason, note, incident_id))
        return cur.rowcount == 1

    def acknowledge_incident(self, incident_id: str, *, by: str | None, at: datetime) -> bool:
        """Record an operator's acknowledgement of an incident's alarm; False when it is not there or was
        acknowledged already (the first acknowledgement stands)."""
        cur = self._exec("UPDATE incidents SET acknowledged_at = ?, acknowledged_by = ?"
                         " WHERE id = ? AND acknowledged_at IS NULL", (iso_utc(at), by, incident_id))
        return cur.rowcount == 1

    def missed_incidents(self, since: datetime) -> list[Incident]:
        """Calls created since ``since`` that are over and that no desk answered, nobody acknowledged and
        nobody closed: their alarm is still on (:mod:`sip_refuge.sidecar.alarm`). Newest first."""
        return self._incidents("WHERE created >= ? AND state = 'ended' AND answered_by IS NULL"
                               " AND acknowledged_at IS NULL AND closed_at IS NULL", (iso_utc(since),), None)

    def close_counts(self) -> dict[str, int]:
        """``{close reason: count}`` over every closed incident, for /metrics."""
        rows = self._all("SELECT close_reason, COUNT(*) FROM incidents WHERE closed_at IS NOT NULL"
                         " GROUP BY close_reason")
        return {str(r[0]): int(r[1]) for r in rows}

    def update_incident(self, incident_id: str, **fields: str | None) -> None:
        """Set some of state, answered_by, answered_at, ended, outcome, snapshot, pbx."""
        unknown = set(fields) - set(_INCIDENT_FIELDS)
        if unknown:
            raise SidecarError(f"unknown incident fields: {', '.join(sorted(unknown))}")
        if not fields:
            return
        names = sorted(fields)
        sets = ", ".join(f"{name} = ?" for name in names)
        self._exec(f"UPDATE incidents SET {sets} WHERE id = ?", [fields[n] for n in names] + [incident_id])

    def add_timeline(self, incident_id: str, kind: str, at: datetime,
                     detail: dict[str, Any] | None = None) -> None:
        self._exec("INSERT INTO timeline (incident, at, kind, detail) VALUES (?, ?, ?, ?)",
                   (incident_id, iso_utc(at), kind, json.dumps(detail or {}, separators=(",", ":"))))

    def _incidents(self, where: str, args: tuple[object, ...], limit: int | None) -> list[Incident]:
        sql = f"SELECT * FROM incidents {where} ORDER BY created DESC, id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._lock, self._guard():
            rows = self._db.execute(sql, args).fetchall()
            ids = [r["id"] for r in rows]
            lines: dict[str, list[TimelineEntry]] = {i: [] for i in ids}
            # In chunks: one IN list of every id would pass SQLite's limit on bound variables.
            for start in range(0, len(ids), _IN_CHUNK):
                chunk = ids[start:start + _IN_CHUNK]
                marks = ",".join("?" * len(chunk))
                for t in self._db.execute(
                        f"SELECT * FROM timeline WHERE incident IN ({marks}) ORDER BY seq", chunk):
                    lines[t["incident"]].append(TimelineEntry(t["at"], t["kind"], json.loads(t["detail"])))
        return [Incident(r["id"], r["post_id"], r["state"], r["created"], r["answered_by"], r["answered_at"],
                         r["ended"], r["outcome"], r["snapshot"], tuple(lines[r["id"]]), r["reference"],
                         r["closed_at"], r["closed_by"], r["close_reason"], r["close_note"], r["acknowledged_at"],
                         r["acknowledged_by"], r["pbx"]) for r in rows]

    def incident(self, incident_id: str) -> Incident | None:
        found = self._incidents("WHERE id = ?", (incident_id,), None)
        return found[0] if found else None

    def incidents(self, limit: int | None = 100, post_id: str | None = None) -> list[Incident]:
        """Newest first, each with its timeline."""
        if post_id is None:
            return self._incidents("", (), limit)
        return self._incidents("WHERE post_id = ?", (post_id,), limit)

    def outcome_counts(self) -> dict[str, int]:
        """``{outcome: count}`` over every incident; a live one counts by its state (queued, answered)."""
        rows = self._all("SELECT COALESCE(outcome, state), COUNT(*) FROM incidents GROUP BY COALESCE(outcome, state)")
        return {str(r[0]): int(r[1]) for r in rows}

    def answer_waits(self, buckets: Iterable[float]) -> tuple[dict[float, int], float, int]:
        """The histogram of answer waits (seconds from queued to the first ``answered``) over every incident:
        ``({bucket: count of waits <= bucket}, sum of waits, count of waits)``, aggregated in SQL."""
        bounds = list(buckets)
        # SQLite's bare-column rule: with MIN(seq), detail comes from each incident's first answered row.
        first = ("SELECT json_extract(detail, '$.wait_seconds') AS w, json_type(detail, '$.wait_seconds') AS t,"
                 " MIN(seq) FROM timeline WHERE kind = 'answered' GROUP BY incident")
        counts = "".join(", SUM(CASE WHEN w <= ? THEN 1 ELSE 0 END)" for _ in bounds)
        row = self._one(f"SELECT COUNT(w), TOTAL(w){counts} FROM ({first}) WHERE t IN ('integer', 'real')",
                        bounds)
        assert row is not None  # an aggregate always yields one row
        return ({b: int(row[2 + i] or 0) for i, b in enumerate(bounds)}, float(row[1]), int(row[0]))

    def prune_incidents(self, before: str, batch: int = 500) -> int:
        """Delete up to ``batch`` ended incidents created before ``before`` (ISO UTC), with their timelines.
        Only when the site asks for it: incidents are the legal record of the service."""
        with self.transaction():
            ids = json.dumps([r[0] for r in self._all(
                "SELECT id FROM incidents WHERE created < ? AND state = 'ended' ORDER BY created LIMIT ?",
                (before, batch))])
            self._exec("DELETE FROM timeline WHERE incident IN (SELECT value FROM json_each(?))", (ids,))
            return self._exec("DELETE FROM incidents WHERE id IN (SELECT value FROM json_each(?))", (ids,)).rowcount
