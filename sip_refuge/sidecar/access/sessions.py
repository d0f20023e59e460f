"""Operators' login sessions, kept in the sidecar's memory.

A session is a random 256-bit value in an HttpOnly cookie; the sidecar keeps only its SHA-256, so even a
memory dump does not hand out a working cookie. Server-side, not a signed cookie: logout, a removed user
and a new password must end a session at once, and a stolen cookie must stop working with them. A restart
of the sidecar logs everyone out (its pages then send the operator to the login page).

Each session has a CSRF token that every state-changing request made with it must carry, and ends after
``idle`` seconds without a request (an open page's event stream or live view counts as one: a console left
open between calls stays logged in) or ``lifetime`` seconds after login, whichever comes first.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_SESSIONS = 10_000  # beyond this the oldest goes: a login flood cannot fill the memory


def _key(cookie: str) -> str:
    return hashlib.sha256(cookie.encode("utf-8", "replace")).hexdigest()


@dataclass
class Session:
    user: str
    role: str
    credential: str  # the user's password hash at login: a new password or role ends the session
    address: str
    created: float  # clock time
    seen: float
    started_at: str  # wall time, ISO, for the audit log and /api/v1/session
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))


class Sessions:
    def __init__(self, idle: float, lifetime: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.idle, self.lifetime, self.clock = idle, lifetime, clock
        self._lock = threading.Lock()
        self._by_key: OrderedDict[str, Session] = OrderedDict()

    def open(self, user: str, role: str, credential: str, address: str, started_at: str) -> tuple[str, Session]:
        """A new session; returns the cookie value (given out once, never stored) and the session."""
        cookie = secrets.token_urlsafe(32)
        now = self.clock()
        session = Session(user, role, credential, address, now, now, started_at)
        with self._lock:
            self._by_key[_key(cookie)] = session
            while len(self._by_key) > MAX_SESSIONS:
                self._by_key.popitem(last=False)
        return cookie, session

    def get(self, cookie: str, *, touch: bool = True) -> Session | None:
        """The live session of ``cookie``, or None (unknown, logged out, idle or past its lifetime)."""
        if not cookie:
            return None
        key, now = _key(cookie), self.clock()
        with self._lock:
            session = self._by_key.get(key)
            if session is None:
                return None
            if now - session.seen > self.idle or now - session.created > self.lifetime:
                del self._by_key[key]
                return None
            if touch:
                session.seen = now
            return session

    def expires_in(self, session: Session) -> float:
        """Seconds until the session ends if nothing more happens."""
        now = self.clock()
        return max(0.0, min(session.seen + self.idle, session.created + self.lifetime) - now)

    def close(self, cookie: str) -> Session | None:
        with self._lock:
            return self._by_key.pop(_key(cookie), None)

    def end(self, keep: Callable[[Session], bool]) -> list[Session]:
        """End every session ``keep`` refuses (a user removed, or given a new password); returns them."""
        with self._lock:
            gone = [k for k, s in self._by_key.items() if not keep(s)]
            return [self._by_key.pop(k) for k in gone]

    def count(self) -> int:
        with self._lock:
            return len(self._by_key)
