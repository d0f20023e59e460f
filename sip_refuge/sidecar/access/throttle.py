"""Slowing password guessers: failed logins counted per client address and per user name.

After ``free`` failures (within ``window`` seconds of each other) each further attempt must wait, twice as
long after every failure: 1 s, 2 s, 4 s ... up to ``longest``. An attempt made too early is refused without
checking the password at all (HTTP 429 with Retry-After), so guessing costs the guesser time, not the
sidecar's CPU. A success clears the counts.

Per address: 5 free, then up to 15 minutes. Per user (guessers spread over many addresses): 10 free, then at
most 60 s, so a guesser can never lock an operator out of the console for long; and an address from which the
user has logged in before (remembered for ``known_for``) is not held back by the user's count at all: the
operator at their own desk gets in while someone elsewhere hammers at their name.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

MAX_TRACKED = 10_000  # addresses and names each; the oldest are forgotten first (an IPv6 spray must not fill memory)


@dataclass
class _Count:
    failures: int = 0
    last: float = 0.0
    next_at: float = 0.0
    told: bool = False  # a refusal of this wait was reported (one audit entry per wait, not one per attempt)


@dataclass(frozen=True)
class Rule:
    free: int
    longest: float


BY_ADDRESS = Rule(free=5, longest=15 * 60)
BY_USER = Rule(free=10, longest=60)


class _Counts:
    def __init__(self, rule: Rule, window: float) -> None:
        self.rule, self.window = rule, window
        self.items: OrderedDict[str, _Count] = OrderedDict()

    def wait(self, key: str, now: float) -> tuple[float, bool]:
        """Seconds to wait, and whether this is the first refusal of this wait."""
        count = self.items.get(key)
        if count is None or count.next_at <= now:
            return 0.0, False
        first, count.told = not count.told, True
        return count.next_at - now, first

    def fail(self, key: str, now: float) -> int:
        count = self.items.pop(key, None) or _Count()
        if now - count.last > self.window:
            count.failures = 0
        count.failures += 1
        count.last = now
        over = count.failures - self.rule.free
        if over > 0:
            count.next_at = now + min(2.0 ** (over - 1), self.rule.longest)
            count.told = False
        self.items[key] = count  # most recent last
        while len(self.items) > MAX_TRACKED:
            self.items.popitem(last=False)
        return count.failures

    def clear(self, key: str) -> None:
        self.items.pop(key, None)


class LoginThrottle:
    def __init__(self, clock: Callable[[], float] = time.monotonic, *, window: float = 15 * 60,
                 known_for: float = 30 * 86400) -> None:
        self.clock, self.known_for = clock, known_for
        self._lock = threading.Lock()
        self._addresses = _Counts(BY_ADDRESS, window)
        self._users = _Counts(BY_USER, window)
        self._known: OrderedDict[tuple[str, str], float] = OrderedDict()  # (user, address) -> until

    def wait(self, address: str, user: str) -> tuple[float, bool]:
        """Seconds before this address may try this user again (0: try now), and whether this is the first
        refusal since the last failure (worth an audit entry; the ones after it are not)."""
        now = self.clock()
        with self._lock:
            by_address, first = self._addresses.wait(address, now)
            if self._known.get((user, address), 0.0) > now:
                return by_address, first
            by_user, first_user = self._users.wait(user, now)
            return max(by_address, by_user), first or first_user

    def failed(self, address: str, user: str) -> tuple[int, int]:
        """Count a failure; returns the failures so far (address, user)."""
        now = self.clock()
        with self._lock:
            return self._addresses.fail(address, now), self._users.fail(user, now)

    def succeeded(self, address: str, user: str) -> None:
        now = self.clock()
        with self._lock:
            self._addresses.clear(address)
            self._users.clear(user)
            self._known.pop((user, address), None)
            self._known[(user, address)] = now + self.known_for
            while len(self._known) > MAX_TRACKED:
                self._known.popitem(last=False)
