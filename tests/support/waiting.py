"""Waiting for a condition with a deadline: the one polling helper of the tests and benches."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05) -> T:
    """The first truthy value of ``probe()``; AssertionError naming ``what`` (and the last value) at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s (last: {value!r})")
        time.sleep(interval)
