"""Reading telemetry JSON from an untrusted sender: bounds on any JSON, then typed reads of its fields.

Everything here refuses with a :class:`TelemetryError` naming the field, never with another exception: no
value of any shape, size or depth gets past :func:`parse` and :class:`Fields` into the sidecar.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import TypeVar

from sip_refuge.errors import RefugeError

MAX_BYTES = 16 * 1024  # a report is a few hundred bytes; the HTTP body limit (64 KiB) is for every route
MAX_DEPTH = 8  # objects and lists inside each other; a report uses 2
MAX_KEYS = 64  # per object
MAX_ITEMS = 64  # per list
MAX_TEXT = 1000  # characters in any text (a reason, a self-test's detail)
MAX_NAME = 64  # characters in a name (a state, a fault, a call event) and in any key
MAX_INT = 2**53  # larger integers lose precision in the pages' JavaScript
MAX_SECONDS = 10.0**9  # durations and delays
MAX_COUNT = MAX_INT  # a counter (SIP messages refused since start...)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_HOST = re.compile(r"[A-Za-z0-9.:\[\]_-]{1,255}")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")

E = TypeVar("E", bound=StrEnum)


class TelemetryError(RefugeError):
    """A telemetry body the sidecar refuses: ``field`` names where (``body`` for the whole of it) and ``status``
    is the HTTP answer (400 not JSON, 413 too big, 422 a field is wrong)."""

    def __init__(self, field: str, problem: str, status: int = 422) -> None:
        self.field, self.problem, self.status = field, problem, status
        super().__init__(f"{field}: {problem}")


def parse(data: bytes | str) -> dict[str, object]:
    """One JSON object within every bound, or a :class:`TelemetryError`."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if len(raw) > MAX_BYTES:
        raise TelemetryError("body", f"{len(raw)} bytes, more than {MAX_BYTES}", 413)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise TelemetryError("body", "not UTF-8", 400) from None
    _check_depth(text)
    try:
        value = json.loads(text, parse_constant=_Constant, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise TelemetryError("body", f"the key {exc.key!r} appears twice", 400) from None
    except ValueError as exc:  # JSONDecodeError, or an integer of more digits than Python converts
        raise TelemetryError("body", f"not JSON ({exc})", 400) from None
    if not isinstance(value, dict):
        raise TelemetryError("body", "must be a JSON object", 400)
    check_bounds(value)
    return value


class Fields:
    """Typed reads of one JSON object's fields, each refusal naming the field (``prefix`` + key)."""

    def __init__(self, body: Mapping[str, object], prefix: str, *, clip: bool) -> None:
        self.body, self.prefix, self.clip = body, prefix, clip

    def _get(self, key: str, required: bool, what: str) -> object:
        value = self.body.get(key)
        if value is None and required:
            raise TelemetryError(self.prefix + key, f"required ({what})")
        return value

    def _wrong(self, key: str, value: object, what: str) -> TelemetryError:
        return TelemetryError(self.prefix + key, f"{_show(value)} is not {what}")

    def name(self, key: str) -> str:
        name = self.maybe_name(key, required=True)
        assert name is not None
        return name

    def maybe_name(self, key: str, *, required: bool = False) -> str | None:
        value = self._get(key, required, "a name")
        if value is None:
            return None
        if not isinstance(value, str) or len(value) > MAX_NAME or not _NAME.fullmatch(value):
            raise self._wrong(key, value, f"a name (letters, digits, '_', '.', '-'; at most {MAX_NAME})")
        return value

    def names(self, key: str) -> tuple[str, ...]:
        value = self._get(key, True, "a list of names")
        if not isinstance(value, list):
            raise self._wrong(key, value, "a list of names")
        if len(value) > MAX_ITEMS:
            raise TelemetryError(self.prefix + key, f"{len(value)} items, more than {MAX_ITEMS}")
        items = Fields({f"[{i}]": v for i, v in enumerate(value)}, self.prefix + key, clip=self.clip)
        return tuple(items.name(f"[{i}]") for i in range(len(value)))

    def text(self, key: str, *, required: bool = False, limit: int = MAX_TEXT) -> str | None:
        value = self._get(key, required, "text")
        if value is None:
            return None
        if not isinstance(value, str):
            raise self._wrong(key, value, "text")
        if len(value) > limit:
            if not self.clip:
                raise TelemetryError(self.prefix + key, f"{len(value)} characters, more than {limit}")
            value = value[:limit - 1] + "…"
        return _CONTROL.sub(" ", value)  # shown on pages and in CCTV events, where a line break would split it

    def host(self, key: str) -> str | None:
        value = self._get(key, False, "a host")
        if value is None:
            return None
        if not isinstance(value, str) or not _HOST.fullmatch(value):
            raise self._wrong(key, value, "a host name or address")
        return value

    def flag(self, key: str) -> bool:
        flag = self.maybe_flag(key, required=True)
        assert flag is not None
        return flag

    def maybe_flag(self, key: str, *, required: bool = False) -> bool | None:
        value = self._get(key, required, "true or false")
        if value is None:
            return None
        if not isinstance(value, bool):
            raise self._wrong(key, value, "true or false")
        return value

    def seconds(self, key: str) -> float | None:
        value = self._get(key, False, "seconds")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= MAX_SECONDS:
            raise self._wrong(key, value, f"a number of seconds from 0 to {MAX_SECONDS:g}")
        return float(value)

    def choice(self, key: str, enum: type[E]) -> E:
        value = self._get(key, True, "one of " + " | ".join(enum))
        if isinstance(value, str) and value in {member.value for member in enum}:
            return enum(value)
        raise self._wrong(key, value, "one of " + " | ".join(enum))

    def time(self, key: str) -> str:
        """ISO 8601 with a time zone, or (as posts of earlier versions send ``last_self_test.at``) seconds since
        1970; either way ISO 8601 UTC with milliseconds, as the sidecar's own times."""
        value = self._get(key, True, "a time")
        try:
            if isinstance(value, int | float) and not isinstance(value, bool):
                return iso(datetime.fromtimestamp(value, UTC))
            if isinstance(value, str) and len(value) <= MAX_NAME:
                when = datetime.fromisoformat(value)
                if when.tzinfo is not None:
                    return iso(when)
        except (ValueError, OverflowError, OSError):
            pass
        raise self._wrong(key, value, "a time (ISO 8601 with a time zone)")

    def counters(self, key: str) -> dict[str, int]:
        """An object of named whole-number counters (at most MAX_ITEMS of them), or {} when absent."""
        found = self.object(key)
        if found is None:
            return {}
        if len(found.body) > MAX_ITEMS:
            raise TelemetryError(self.prefix + key, f"{len(found.body)} counters, more than {MAX_ITEMS}")
        out: dict[str, int] = {}
        for name, value in found.body.items():
            if not _NAME.fullmatch(name) or len(name) > MAX_NAME:
                raise TelemetryError(f"{self.prefix}{key}.{name[:MAX_NAME]}", "is not a counter name")
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
                raise found._wrong(name, value, f"a whole number from 0 to {MAX_COUNT}")
            out[name] = value
        return out

    def object(self, key: str) -> Fields | None:
        value = self._get(key, False, "an object")
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self._wrong(key, value, "an object")
        return Fields(value, f"{self.prefix}{key}.", clip=self.clip)


def iso(when: datetime) -> str:
    when = when.astimezone(UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def _show(value: object) -> str:
    """A value for an error message, short: the message goes back to the sender and into logs."""
    if isinstance(value, dict | list):
        return f"a JSON {'object' if isinstance(value, dict) else 'list'}"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# -- bounds on any JSON, known fields or not -----------------------------------------------------------------

class _Constant:
    """What ``NaN``, ``Infinity`` and ``-Infinity`` parse to, so the bounds check can name their field."""

    def __init__(self, name: str) -> None:
        self.name = name


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    found: dict[str, object] = {}
    for key, value in pairs:
        if key in found:
            raise _DuplicateKey(key)
        found[key] = value
    return found


def _check_depth(text: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH before parsing: the parser would recurse once per level."""
    depth = 0
    for bracket in _BRACKET.finditer(_STRING.sub("", text)):
        depth += 1 if bracket.group() in "[{" else -1
        if depth > MAX_DEPTH:
            raise TelemetryError("body", f"nested more than {MAX_DEPTH} deep", 400)


def check_bounds(value: object, path: str = "", depth: int = 1) -> None:
    """``depth`` counts the objects and lists ``value`` is in, itself included when it is one."""
    where = path or "body"
    if isinstance(value, list | Mapping) and depth > MAX_DEPTH:
        raise TelemetryError(where, f"nested more than {MAX_DEPTH} deep", 400)
    if isinstance(value, _Constant):
        raise TelemetryError(where, f"{value.name} is not allowed: numbers must be finite")
    if isinstance(value, float) and not math.isfinite(value):
        raise TelemetryError(where, "numbers must be finite")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
        raise TelemetryError(where, f"the number is larger than {MAX_INT}")
    if isinstance(value, str):
        _check_string(value, where, MAX_TEXT)
    if isinstance(value, list):
        if len(value) > MAX_ITEMS:
            raise TelemetryError(where, f"{len(value)} items, more than {MAX_ITEMS}")
        for i, item in enumerate(value):
            check_bounds(item, f"{path}[{i}]", depth + 1)
    if isinstance(value, Mapping):
        if len(value) > MAX_KEYS:
            raise TelemetryError(where, f"{len(value)} keys, more than {MAX_KEYS}")
        for key, item in value.items():
            _check_string(key, f"{where}: a key", MAX_NAME)
            check_bounds(item, f"{path}.{key}" if path else key, depth + 1)


def _check_string(value: str, where: str, limit: int) -> None:
    if len(value) > limit:
        raise TelemetryError(where, f"{len(value)} characters, more than {limit}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (\ud800): no page or file could hold it
        raise TelemetryError(where, "not valid Unicode text") from None
