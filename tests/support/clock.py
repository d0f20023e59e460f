"""A clock a test moves by hand, for the parts that take ``clock: Callable[[], float]`` (sessions, login
throttle, HTTP admission, the runner, the outbox)."""

from __future__ import annotations


class Clock:
    """Reads ``now`` until the test sets another: time passes only when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
