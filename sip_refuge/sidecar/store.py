"""The sidecar's durable store: incidents and timelines, the event outbox, post/camera status, telemetry.

SQLite in WAL mode. One connection guarded by a re-entrant lock: the sidecar writes a handful of rows per
call, far below what one connection serves, and a single writer can never meet ``database is locked``.
WAL still matters: readers in other processes (exports, ``sqlite3`` by hand) never block the sidecar, and a
killed process leaves a file that opens cleanly with every committed transaction in it.

A file that cannot be trusted is refused at start (see ``storefile``). At run time every SQLite error becomes
a :class:`StoreError` and the latest storage failure is kept in ``fault`` for ``/healthz``: a full disk or an
I/O error clears with the next write that commits, a corrupt page stays until the file is recovered.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sip_refuge.errors import SidecarError
from sip_refuge.sidecar import storefile
from sip_refuge.sidecar.events import Event, event_from_json, iso_utc
from sip_refuge.sidecar.migrations import MIGRATIONS
from sip_refuge.sidecar.records import CameraStatus, Delivery, Incident, PostStatus, StoreFault, TimelineEntry
from sip_refuge.sidecar.storefile import CORRUPT, StoreError

__all__ = ["CameraStatus", "Delivery", "Incident", "PostStatus", "Store", "StoreError", "StoreFault",
           "TimelineEntry"]

log = logging.getLogger(__name__)

PENDING = "pending"
DELIVERED = "delivered"

TABLES = {"incidents", "timeline", "events", "deliveries", "post_status", "camera_status", "telemetry", "audit"}
_IN_CHUNK = 500  # ids per IN (...) list; SQLite allows 999 bound variables in older builds
_INCIDENT_FIELDS = ("state", "answered_by", "answered_at", "ended", "outcome", "snapshot", "pbx")


def _opt_bool(value: object) -> bool | None:
    return None if value is None else bool(value)


def _ids(values: Iterable[str]) -> str:
    """A JSON array for ``json_each(?)``: any number of ids in one bound variable."""
    return json.dumps(sorted(values))


class Store:
    """Open (creating and migrating as needed) the database at ``path``; ``":memory:"`` works for tests.

    An existing file must be an SQLite database that passes ``PRAGMA quick_check``, else SidecarError
    says which file and how to recover it. A missing file is created, atomically.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self._lock = threading.RLock()
        self._depth = 0
        self.fault: StoreFault | None = None
        self.errors = 0  # failed operations since start (/metrics)
        if self.path != ":memory:":
            file = Path(self.path)
            file.parent.mkdir(parents=True, exist_ok=True)
            try:
                if not storefile.check_file(file):
                    storefile.create(file, self._build)
            except sqlite3.Error as exc:
                raise SidecarError(f"cannot create the database {self.path}: {exc}") from None
        try:
            # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE) so none is ever left open.
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
            self._db.row_factory = sqlite3.Row
            if self.path != ":memory:":
                storefile.check_integrity(self._db, self.path)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL, not NORMAL: NORMAL in WAL mode survives a killed process but can lose the last commits on
            # power loss. An emergency-call log must keep them, and a few commits per call cost nothing.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate(self._db)
        except (sqlite3.Error, SidecarError) as exc:
            if hasattr(self, "_db"):
                self._db.close()
            if isinstance(exc, SidecarError):
                raise
            if storefile.kind_of(exc) == CORRUPT:
                raise storefile.refuse(self.path, f"is damaged ({exc})") from None
            raise SidecarError(f"cannot open the database {self.path}: {exc}") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- schema -----------------------------------------------------------------------------------------

    def _build(self, db: sqlite3.Connection) -> None:
        self._migrate(db)

    def _migrate(self, db: sqlite3.Connection) -> None:
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version > len(MIGRATIONS):
            raise SidecarError(f"{self.path} has schema version {version}, newer than this sip-refuge "
                               f"({len(MIGRATIONS)}); upgrade sip-refuge or use another database")
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            try:
                # One script, one transaction: the tables and the version bump commit together or not at all.
                db.executescript(f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {number};\nCOMMIT;")
            except sqlite3.Error:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        tables = {str(r[0]) for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if missing := sorted(TABLES - tables):
            # A version number without its tables: a recovery that could not read the schema, or a stranger's file.
            raise storefile.refuse(self.path, f"has schema version {version} but lacks the tables {', '.join(missing)}")

    def schema_version(self) -> int:
        return int(self._scalar("PRAGMA user_version"))

    def journal_mode(self) -> str:
        return str(self._scalar("PRAGMA journal_mode"))

    # -- failures -----------------------------------------------------------------------------------------

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """Turn SQLite's errors into StoreError, remembering a storage failure in ``fault``."""
        try:
            yield
        except sqlite3.Error as exc:
            raise self._failed(exc) from exc

    def _failed(self, exc: sqlite3.Error) -> StoreError:
        kind = storefile.kind_of(exc)
        self.errors += 1
        error = StoreError(f"database {self.path}: {exc}", kind)
        if error.storage and (self.fault is None or (self.fault.kind, self.fault.error) != (kind, str(exc))):
            if self.fault is None or self.fault.kind != CORRUPT:  # corruption is not hidden by a later error
                self.fault = StoreFault(kind, str(exc), iso_utc(datetime.now(UTC)))
            log.error("database %s: %s (%s)", self.path, exc,
                      "the file is damaged; see docs/admin-guide.md, Recovery" if kind == CORRUPT
                      else "writes are kept in memory and stored once it works again")
        return error

    def _committed(self, changes: int) -> None:
        """A write committed: it clears a passing fault only when it changed rows (a write that changed
        nothing needs no space, so it proves nothing about a full disk)."""
        if changes and self.fault is not None and self.fault.kind != CORRUPT:
            log.warning("database %s takes writes again (after: %s)", self.path, self.fault.error)
            self.fault = None

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group writes atomically; nests (only the outermost commits). Callers use it to store an incident
        change together with the event it raises."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            with self._guard():
                self._db.execute("BEGIN IMMEDIATE")
            before = self._db.total_changes
            self._depth = 1
            try:
                yield
                with self._guard():
                    self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            finally:
                self._depth = 0
            self._committed(self._db.total_changes - before)

    def _rollback(self) -> None:
        # SQLite has already rolled back after some failures (a full disk at COMMIT): ROLLBACK would then fail.
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error as exc:
                log.error("database %s: rollback failed: %s", self.path, exc)

    def _exec(self, sql: str, args: Iterable[object] | dict[str, object] = ()) -> sqlite3.Cursor:
        """One write; outside a transaction it commits at once."""
        with self._lock:
            with self._guard():
                cur = self._db.execute(sql, args if isinstance(args, dict) else tuple(args))
            if not self._depth:
                self._committed(cur.rowcount)
            return cur

    # Rows are fetched under the lock: a half-read cursor must not interleave with another thread's
    # transaction on the shared connection.
    def _all(self, sql: str, args: Iterable[object] | dict[str, object] = ()) -> list[sqlite3.Row]:
        with self._lock, self._guard():
            return self._db.execute(sql, args if isinstance(args, dict) else tuple(args)).fetchall()

    def _one(self, sql: str, args: Iterable[object] = ()) -> sqlite3.Row | None:
        with self._lock, self._guard():
            row: sqlite3.Row | None = self._db.execute(sql, tuple(args)).fetchone()
            return row

    def _scalar(self, sql: str, args: Iterable[object] = ()) -> Any:
        """The single value of an aggregate query (which always yields one row)."""
        with self._lock, self._guard():
            return self._db.execute(sql, tuple(args)).fetchone()[0]

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

    # -- audit log ----------------------------------------------------------------------------------------

    def add_audit(self, entry: dict[str, Any]) -> None:
        """One audit entry (``sidecar.access.audit``): at, action, outcome, actor, role, address, target, detail."""
        values: dict[str, object] = {**entry, "detail": json.dumps(entry.get("detail") or {})}
        self._exec("INSERT INTO audit (at, action, outcome, actor, role, address, target, detail)"
                   " VALUES (:at, :action, :outcome, :actor, :role, :address, :target, :detail)", values)

    def audit(self, limit: int = 100, before: int | None = None) -> list[dict[str, Any]]:
        """Newest first; ``before`` a ``seq`` pages back."""
        rows = self._all("SELECT * FROM audit WHERE seq < ? ORDER BY seq DESC LIMIT ?",
                         (before if before is not None else 2**63 - 1, limit))
        return [{**dict(r), "detail": json.loads(r["detail"])} for r in rows]

    # -- post and camera status, telemetry --------------------------------------------------------------

    def save_post_status(self, status: PostStatus) -> None:
        self._exec("INSERT OR REPLACE INTO post_status (post_id, updated, online, state, contact, detail)"
                   " VALUES (?, ?, ?, ?, ?, ?)",
                   (status.post_id, status.updated, status.online, status.state, status.contact,
                    json.dumps(status.detail or {})))

    def post_statuses(self) -> dict[str, PostStatus]:
        return {r["post_id"]: PostStatus(r["post_id"], r["updated"], _opt_bool(r["online"]), r["state"],
                                         r["contact"], json.loads(r["detail"]))
                for r in self._all("SELECT * FROM post_status ORDER BY post_id")}

    def save_camera_status(self, status: CameraStatus) -> None:
        self._exec("INSERT OR REPLACE INTO camera_status (post_id, updated, ok, reason, detail)"
                   " VALUES (?, ?, ?, ?, ?)",
                   (status.post_id, status.updated, status.ok, status.reason, json.dumps(status.detail or {})))

    def camera_statuses(self) -> dict[str, CameraStatus]:
        return {r["post_id"]: CameraStatus(r["post_id"], r["updated"], _opt_bool(r["ok"]), r["reason"],
                                           json.loads(r["detail"]))
                for r in self._all("SELECT * FROM camera_status ORDER BY post_id")}

    def add_telemetry(self, post_id: str, at: datetime, body: dict[str, Any]) -> None:
        self._exec("INSERT INTO telemetry (post_id, received, body) VALUES (?, ?, ?)",
                   (post_id, iso_utc(at), json.dumps(body, separators=(",", ":"))))

    def telemetry(self, post_id: str, limit: int = 20) -> list[tuple[str, dict[str, Any]]]:
        """The latest reports of a post, newest first, as (received, body)."""
        rows = self._all("SELECT received, body FROM telemetry WHERE post_id = ? ORDER BY seq DESC LIMIT ?",
                          (post_id, limit))
        return [(str(r[0]), json.loads(r[1])) for r in rows]

    # -- retention ----------------------------------------------------------------------------------------
    # Each call deletes at most ``batch`` rows in one short transaction, so the hub's writes are never held
    # up for long behind a large prune.

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

    def prune_telemetry(self, before: str, batch: int = 1000) -> int:
        """Delete up to ``batch`` telemetry reports received before ``before`` (ISO UTC)."""
        return self._exec("DELETE FROM telemetry WHERE seq IN (SELECT seq FROM telemetry WHERE received < ?"
                          " ORDER BY received LIMIT ?)", (before, batch)).rowcount

    def trim_telemetry(self, post_id: str, keep_bytes: int) -> int:
        """Keep only the newest reports of ``post_id`` that fit in ``keep_bytes`` (of JSON); the rest go."""
        return self._exec(
            "DELETE FROM telemetry WHERE post_id = :post AND seq <= (SELECT seq FROM (SELECT seq, SUM(length(body))"
            " OVER (ORDER BY seq DESC) AS kept FROM telemetry WHERE post_id = :post) WHERE kept > :keep"
            " ORDER BY seq DESC LIMIT 1)", {"post": post_id, "keep": keep_bytes}).rowcount

    def prune_audit(self, before: str, batch: int = 1000) -> int:
        """Delete up to ``batch`` audit entries made before ``before`` (ISO UTC)."""
        return self._exec("DELETE FROM audit WHERE seq IN (SELECT seq FROM audit WHERE at < ? ORDER BY at LIMIT ?)",
                          (before, batch)).rowcount

    def telemetry_posts(self) -> list[str]:
        return [str(r[0]) for r in self._all("SELECT DISTINCT post_id FROM telemetry")]

    def prune_incidents(self, before: str, batch: int = 500) -> int:
        """Delete up to ``batch`` ended incidents created before ``before`` (ISO UTC), with their timelines.
        Only when the site asks for it: incidents are the legal record of the service."""
        with self.transaction():
            ids = json.dumps([r[0] for r in self._all(
                "SELECT id FROM incidents WHERE created < ? AND state = 'ended' ORDER BY created LIMIT ?",
                (before, batch))])
            self._exec("DELETE FROM timeline WHERE incident IN (SELECT value FROM json_each(?))", (ids,))
            return self._exec("DELETE FROM incidents WHERE id IN (SELECT value FROM json_each(?))", (ids,)).rowcount
