"""The store's connection: opening and checking the file, the schema's migrations, transactions, and every
SQLite error turned into a :class:`StoreError` (the latest kept in ``fault`` for ``/healthz``).

SQLite in WAL mode. One connection guarded by a re-entrant lock: the sidecar writes a handful of rows per
call, far below what one connection serves, and a single writer can never meet ``database is locked``.
WAL still matters: readers in other processes (exports, ``sqlite3`` by hand) never block the sidecar, and a
killed process leaves a file that opens cleanly with every committed transaction in it.

A file that cannot be trusted is refused at start (see ``storefile``). At run time a full disk or an I/O error
clears with the next write that commits, a corrupt page stays until the file is recovered.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

from sip_refuge.errors import SidecarError
from sip_refuge.sidecar import storefile
from sip_refuge.sidecar.events import iso_utc
from sip_refuge.sidecar.migrations import MIGRATIONS
from sip_refuge.sidecar.records import StoreFault
from sip_refuge.sidecar.storefile import CORRUPT, StoreError

log = logging.getLogger("sip_refuge.sidecar.store")  # the store speaks with one name, whichever part

TABLES = {"incidents", "timeline", "events", "deliveries", "post_status", "camera_status", "telemetry", "audit"}


class StoreBase:
    """The connection to the database at ``path`` (see :class:`~sip_refuge.sidecar.store.Store`)."""

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

    def __enter__(self) -> Self:
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
