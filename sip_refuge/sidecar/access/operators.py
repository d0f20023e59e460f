"""The operators who may log in: the site's users file, read again whenever it changes.

``sip-refuge users add/remove`` rewrites the file while the sidecar runs; the next login (or request) sees
the change without a restart, and the sessions of a removed user, or of one given a new password or role,
end. A file that turns bad meanwhile (a hand edit) is refused with an error in the log, and the users read
before stay in force: a typo must not lock the whole control room out.

Password checks are slow on purpose (scrypt, :mod:`sip_refuge.config.passwords`) and take 32 MiB each, so at
most ``KDF_AT_ONCE`` run at a time; an unknown name is checked against a stand-in hash, so a reply's timing
never tells a guesser which names exist.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sip_refuge.config.passwords import hash_password, verify
from sip_refuge.config.users import User, read_users
from sip_refuge.errors import RefugeError, SidecarError

log = logging.getLogger(__name__)

KDF_AT_ONCE = 2
KDF_WAIT = 5.0  # seconds a login waits for its turn (a thread held meanwhile) before it is answered 503
RESTAT = 1.0  # seconds between looks at the file's modification time


class Operators:
    def __init__(self, path: Path | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.path, self.clock = path, clock
        self._lock = threading.Lock()
        self._kdf = threading.BoundedSemaphore(KDF_AT_ONCE)
        self._users: dict[str, User] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._looked = float("-inf")
        self._stand_in = ""
        if path is not None:
            self._users = read_users(path)  # at start a bad file is an error: `config check` says the same
            self._stamp = self._stat()
            self._stand_in = hash_password("no such user: this hash only costs a guesser the same time")

    @property
    def configured(self) -> bool:
        return self.path is not None

    def _stat(self) -> tuple[int, int, int] | None:
        assert self.path is not None
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def current(self) -> dict[str, User]:
        """The users now; the file is looked at again at most once every :data:`RESTAT` seconds."""
        if self.path is None:
            return {}
        with self._lock:
            now = self.clock()
            if now - self._looked >= RESTAT:
                self._looked = now
                stamp = self._stat()
                if stamp != self._stamp:
                    self._stamp = stamp
                    self._reload()
            return self._users

    def _reload(self) -> None:
        assert self.path is not None
        try:
            users = read_users(self.path)
        except RefugeError as exc:
            log.error("users file %s not loaded, the %d users read before stay in force: %s", self.path,
                      len(self._users), exc)
            return
        log.info("users file %s read again: %d users", self.path, len(users))
        self._users = users

    def check(self, name: str, password: str) -> User | None:
        """The user if ``password`` is theirs; SidecarError when too many checks already run (answer 503)."""
        user = self.current().get(name)
        if not self._kdf.acquire(timeout=KDF_WAIT):
            raise SidecarError("too many logins at once: try again in a moment")
        try:
            matched = verify(password, user.hash if user is not None else self._stand_in)
        finally:
            self._kdf.release()
        return user if matched and user is not None else None
