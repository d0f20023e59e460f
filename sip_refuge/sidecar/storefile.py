"""The database file itself: refuse one that cannot be trusted, create a new one atomically, name SQLite errors.

A store that cannot be trusted never runs half-broken. An empty file, a file that is not SQLite, or one that
fails ``PRAGMA quick_check`` is refused at start, naming the file and the way to recover it; only a missing
file starts a fresh store. At run time every SQLite error is sorted into a kind, so the sidecar can tell a
full disk (keep events in memory and wait) from a corrupt file (say so, and recover by hand).
"""

from __future__ import annotations

import os
import shlex
import sqlite3
from collections.abc import Callable
from pathlib import Path

from sip_refuge.errors import SidecarError

SQLITE_HEADER = b"SQLite format 3\x00"

# Kinds of failure. FULL, IO and BUSY pass (space returns, a disk recovers, a lock is let go): the writes that
# met them are kept and tried again. CORRUPT does not pass by itself. OTHER is a fault in sip-refuge itself.
FULL, IO, BUSY, CORRUPT, OTHER = "full", "io", "busy", "corrupt", "other"
STORAGE = (FULL, IO, BUSY, CORRUPT)
_KINDS = {13: FULL, 10: IO, 8: IO, 14: IO, 15: IO, 22: IO, 5: BUSY, 6: BUSY, 11: CORRUPT, 26: CORRUPT}



def recovery(path: str) -> str:
    """How to rescue what a damaged file still holds, as commands to paste. ``.dump`` works with every sqlite3
    (Debian 12's has no ``.recover``); it writes ROLLBACK at the end when it met damage, which the sed turns
    into COMMIT to keep every row it could read. The schema version is not part of a dump."""
    from sip_refuge.sidecar.migrations import MIGRATIONS  # the number this sip-refuge writes

    q, old = shlex.quote(path), shlex.quote(path + ".corrupt")
    steps = [f"mv {q} {old}",
             f"if [ -e {shlex.quote(path + '-wal')} ]; then mv {shlex.quote(path + '-wal')} "
             f"{shlex.quote(path + '.corrupt-wal')}; fi",
             f"rm -f {shlex.quote(path + '-shm')}",
             f"sqlite3 {old} .dump | sed 's/^ROLLBACK; -- due to errors$/COMMIT;/' | sqlite3 {q}",
             f"sqlite3 {q} 'PRAGMA user_version = {len(MIGRATIONS)}'"]
    return ("To recover: stop the sidecar, move the file aside, copy what it still holds into a new file (rows "
            "on damaged pages are lost), then start the sidecar again:\n"
            + "".join(f"    {step}\n" for step in steps)
            + f"Keep {path}.corrupt: it is evidence. docs/admin-guide.md, \"Recovery of a damaged database\", "
            "explains each step.")


class StoreError(SidecarError):
    """A database operation failed; ``kind`` says whether it may pass (``storage``) or is a bug."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind

    @property
    def storage(self) -> bool:
        """The store itself failed (disk full, I/O, corrupt), not the statement."""
        return self.kind in STORAGE


def kind_of(exc: sqlite3.Error) -> str:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return _KINDS.get(code & 0xFF, OTHER)  # the low byte is the primary result code
    text = str(exc).lower()
    if "full" in text:
        return FULL
    if "malformed" in text or "not a database" in text:
        return CORRUPT
    return IO if "i/o" in text else OTHER


def refuse(path: str, problem: str) -> SidecarError:
    return SidecarError(f"the database {path} {problem}; the sidecar will not start on it.\n" + recovery(path))


def check_file(path: Path) -> bool:
    """Refuse a database file that is empty or not SQLite. True when the file exists, False when it is missing
    (a fresh store is then created)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        return False
    except IsADirectoryError:
        raise SidecarError(f"the database {path} is a directory; sidecar.database must name a file") from None
    except OSError as exc:
        raise SidecarError(f"cannot read the database {path}: {exc.strerror}") from None
    if not head:
        # Never silently replaced: an empty file where the incident log should be means something went wrong
        # (a failed copy, a full disk during a restore), and a fresh store would hide the lost history.
        raise SidecarError(f"the database {path} is an empty file (0 bytes), not an incident log; the sidecar "
                           "will not start on it. If it should hold incidents, restore it from a backup. If this "
                           "is a new installation, delete the empty file and the sidecar creates a fresh store.")
    if head != SQLITE_HEADER:
        raise refuse(str(path), "is not an SQLite database (its first bytes are not the SQLite header)")
    return True


def check_integrity(db: sqlite3.Connection, path: str) -> None:
    """``PRAGMA quick_check`` (pages, records and indexes, without comparing indexes to tables: seconds, not
    minutes, on a large log). Refuses the file when anything is wrong."""
    try:
        found = [str(r[0]) for r in db.execute("PRAGMA quick_check(5)").fetchall()]
    except sqlite3.DatabaseError as exc:
        raise refuse(path, f"is damaged: PRAGMA quick_check failed ({exc})") from None
    if found != ["ok"]:
        raise refuse(path, "is damaged: PRAGMA quick_check found " + "; ".join(found))


def create(path: Path, build: Callable[[sqlite3.Connection], None]) -> None:
    """Create the database at ``path`` from nothing, atomically: ``build`` fills a temporary file in the same
    folder, which is renamed into place only once complete. A crash in between leaves no empty or half-made
    file at ``path`` (which would then be refused)."""
    tmp = path.with_name(f".{path.name}.new-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        db = sqlite3.connect(tmp, isolation_level=None)
        try:
            build(db)
        finally:
            db.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # the rename itself must survive a power cut
        finally:
            os.close(folder)
    finally:
        tmp.unlink(missing_ok=True)
