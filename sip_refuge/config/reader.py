"""Typed access to one mapping of the site file that records every mistake instead of stopping.

Validation must report all mistakes at once, so readers never raise: they note a :class:`Problem`
and hand back a harmless placeholder, and the loader raises one :class:`ConfigError` at the end.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sip_refuge.config.files import control_character
from sip_refuge.config.source import Source, join
from sip_refuge.errors import Problem

# The ids of posts, desks, cameras, targets and close reasons: they name things in URLs, metrics and Asterisk's config.
ID = r"[a-z0-9][a-z0-9-]{0,39}"
ID_HINT = "must be lowercase letters, digits and '-' (at most 40, not starting with '-')"
_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d)?\s*$")
_UNITS = {None: 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"^\s*(\d+)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "KB": 1 << 10, "KIB": 1 << 10, "MB": 1 << 20, "MIB": 1 << 20, "GB": 1 << 30,
               "GIB": 1 << 30}


class Reader:
    """The keys of one mapping at ``path``; call :meth:`done` to report keys nobody asked for."""

    def __init__(self, src: Source, path: str, value: Any, problems: list[Problem]) -> None:
        self.src, self.path, self.problems = src, path, problems
        self.known: set[str] = set()
        if value is None:
            value = {}
        if not isinstance(value, dict):
            self.fail("", f"must be a mapping of keys, not {_kind(value)}")
            value = {}
        self.value: dict[str, Any] = value

    # -- reporting ---------------------------------------------------------------------------
    def at(self, key: str | int) -> str:
        return join(self.path, key) if key != "" else self.path

    def fail(self, key: str | int, message: str) -> None:
        self.problems.append(self.src.problem(self.at(key), message))

    def done(self) -> None:
        for key in self.value:
            if key not in self.known:
                close = difflib.get_close_matches(key, sorted(self.known), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(self.known))}"
                self.fail(key, f"unknown key{hint}")

    # -- getters -----------------------------------------------------------------------------
    def raw(self, key: str, required: bool) -> Any:
        self.known.add(key)
        if key not in self.value or self.value[key] is None:
            if required:
                self.fail(key, "is required")
            return None
        return self.value[key]

    def has(self, key: str) -> bool:
        self.known.add(key)
        return self.value.get(key) is not None

    def clean(self, key: str | int, value: str, *, multiline: bool = False) -> bool:
        """Whether ``value`` is free of control characters; a newline in a value that reaches a
        generated file would start a line of the attacker's choosing there."""
        bad = control_character(value, "\n\r\t" if multiline else "")
        if bad:
            self.fail(key, f"holds a control character ({bad}); it must be one line of plain text")
        return bad is None

    def text(self, key: str, default: str | None = None, *, required: bool = False,
             pattern: str | None = None, hint: str = "", multiline: bool = False) -> str | None:
        value = self.raw(key, required)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            self.fail(key, f"must be text, not {_kind(value)}")
            return default
        value = str(value)
        if not self.clean(key, value, multiline=multiline):
            return default
        if pattern and not re.fullmatch(pattern, value):
            self.fail(key, f"{value!r} {hint or f'must match {pattern}'}")
            return default
        return value

    def digits(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        value = self.raw(key, required)
        if value is None:
            return default
        if isinstance(value, int) and not isinstance(value, bool):
            # An unquoted 0123 would have lost its leading zero: say so rather than guess.
            self.fail(key, f"write extensions in quotes (\"{value}\") so YAML keeps them as digits")
            return default
        if not isinstance(value, str) or not re.fullmatch(r"[0-9]{1,15}", value):
            self.fail(key, f"{value!r} must be 1 to 15 digits, nothing else")
            return default
        return value

    def integer(self, key: str, default: int | None = None, *, required: bool = False,
                low: int | None = None, high: int | None = None) -> int | None:
        value = self.raw(key, required)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"must be a whole number, not {_kind(value)} {value!r}")
            return default
        if (low is not None and value < low) or (high is not None and value > high):
            self.fail(key, f"{value} is out of range {low}..{high}")
            return default
        return value

    def number(self, key: str, *, low: float, high: float) -> float | None:
        value = self.raw(key, False)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(key, f"must be a number, not {_kind(value)} {value!r}")
            return None
        if not low <= value <= high:
            self.fail(key, f"{value} is out of range {low}..{high}")
            return None
        return float(value)

    def duration(self, key: str, default: int | None = None, *, required: bool = False,
                 low: int = 1, high: int = 366 * 86400) -> int | None:
        """Seconds, from ``30``, ``30s``, ``15m``, ``24h`` or ``3d``."""
        value = self.raw(key, required)
        if value is None:
            return default
        match = _DURATION.match(str(value)) if not isinstance(value, bool) else None
        if not match:
            self.fail(key, f"{value!r} is not a duration (examples: 30, 30s, 15m, 24h, 3d)")
            return default
        seconds = int(match.group(1)) * _UNITS[match.group(2)]
        if not low <= seconds <= high:
            self.fail(key, f"{value!r} is out of range ({low} s to {high} s)")
            return default
        return seconds

    def size(self, key: str, default: int, *, low: int, high: int) -> int:
        """Bytes, from ``65536``, ``512KB``, ``16MB`` or ``1GB`` (K, M, G are powers of 1024)."""
        value = self.raw(key, False)
        if value is None:
            return default
        match = _SIZE.match(str(value)) if not isinstance(value, bool) else None
        if not match:
            self.fail(key, f"{value!r} is not a size (examples: 65536, 512KB, 16MB, 1GB)")
            return default
        size = int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").upper()]
        if not low <= size <= high:
            self.fail(key, f"{value!r} is out of range ({low} to {high} bytes)")
            return default
        return size

    def choice(self, key: str, choices: tuple[str, ...], default: str | None = None, *,
               required: bool = False) -> str | None:
        value = self.text(key, None, required=required)
        if value is None:
            return default
        if value not in choices:
            self.fail(key, f"{value!r} must be one of: {', '.join(choices)}")
            return default
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw(key, False)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(key, f"must be true or false, not {value!r}")
            return default
        return value

    def path_value(self, key: str, default: str | None = None, *, required: bool = False) -> Path | None:
        value = self.text(key, default, required=required)
        if value is None:
            return None
        # The folder is resolved, the last part is not: a secret file that is a link must stay a link,
        # so that reading it can refuse it instead of reading whatever it points at.
        if Path(value).is_absolute():
            return Path(value)
        path = Path(self.src.file).resolve().parent / value
        return path.resolve() if path.name in ("", "..") else path.parent.resolve() / path.name

    def child(self, key: str, *, required: bool = False) -> Reader:
        return Reader(self.src, self.at(key), self.raw(key, required), self.problems)

    def items(self, key: str, *, required: bool = False) -> Iterator[tuple[int, Any]]:
        value = self.raw(key, required)
        if value is None:
            return iter(())
        if not isinstance(value, list):
            self.fail(key, f"must be a list, not {_kind(value)}")
            return iter(())
        return iter(enumerate(value))

    def strings(self, key: str) -> tuple[str, ...]:
        out: list[str] = []
        for i, item in self.items(key):
            if not isinstance(item, str):
                self.fail(join(key, i), f"must be text, not {_kind(item)}")
            elif self.clean(join(key, i), item):
                out.append(item)
        return tuple(out)


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", bool: "true/false", int: "a number",
            float: "a number", str: "text", type(None): "nothing"}.get(type(value), type(value).__name__)
