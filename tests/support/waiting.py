"""Waiting for a condition with a deadline: the one polling helper of the tests and benches."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(TimeoutError, AssertionError):
    """A condition not met by its deadline: a test failure (AssertionError), and a TimeoutError for benches."""


def wait_for(probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05) -> T:
    """The first truthy value of ``probe()``; :class:`WaitTimeout` naming ``what`` (and the last value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise WaitTimeout(f"no {what} within {timeout} s (last: {value!r})")
        time.sleep(interval)
