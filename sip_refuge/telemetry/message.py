"""The telemetry message: what every report carries, and the fields of each kind (docs/spec.md, section 7)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import ClassVar, TypeVar

from sip_refuge.telemetry.reading import MAX_NAME, Fields, TelemetryError, check_bounds, iso, parse

T = TypeVar("T")


class Kind(StrEnum):
    STATE = "state"  # the post changed state
    CALL = "call"  # a step of a call (dial, queued, answered, ended...)
    SELFTEST = "selftest"  # a self-test finished or was aborted
    FAULT = "fault"  # a device fault was raised or cleared
    REGISTRATION = "registration"  # the post registered with its PBX, or lost it


class SelfTestResult(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    ABORTED = "aborted"  # a press or a call-back came first: neither passed nor failed


SELFTEST_PARTS = ("local", "pbx")


@dataclass(frozen=True)
class StateChange:
    kind: ClassVar[Kind] = Kind.STATE
    previous: str
    reason: str = ""


@dataclass(frozen=True)
class CallReport:
    """``event`` is the post's own step name (dial, queued, answered, incoming, rejected, missed, failed, ended)."""

    kind: ClassVar[Kind] = Kind.CALL
    event: str
    call: str
    host: str | None = None
    target: str | None = None  # dial: queue or selftest
    caller: str | None = None  # incoming, rejected
    reason: str | None = None  # failed, ended
    retry_in: float | None = None  # failed: seconds until the alarm is sent again
    duration: float | None = None  # ended: seconds


@dataclass(frozen=True)
class SelfTestReport:
    kind: ClassVar[Kind] = Kind.SELFTEST
    result: SelfTestResult
    call: str | None = None
    detail: str = ""
    part: str = ""  # a failed test: the part that failed (SELFTEST_PARTS)

    @property
    def passed(self) -> bool | None:
        """Only a finished test passes or fails: an aborted one is neither."""
        return None if self.result is SelfTestResult.ABORTED else self.result is SelfTestResult.PASS


@dataclass(frozen=True)
class FaultChange:
    kind: ClassVar[Kind] = Kind.FAULT
    fault: str
    active: bool
    detail: str = ""


@dataclass(frozen=True)
class RegistrationChange:
    """The registration itself is the message's ``registered``."""

    kind: ClassVar[Kind] = Kind.REGISTRATION
    host: str | None = None
    reason: str | None = None


Detail = StateChange | CallReport | SelfTestReport | FaultChange | RegistrationChange
_DETAILS: dict[Kind, type[Detail]] = {d.kind: d for d in (StateChange, CallReport, SelfTestReport, FaultChange,
                                                           RegistrationChange)}


@dataclass(frozen=True)
class SelfTest:
    """The post's latest finished self-test."""

    at: str  # ISO 8601 UTC
    passed: bool
    detail: str = ""
    part: str = ""  # when it failed: local (speaker or microphone) or pbx (network, PBX or media)


@dataclass(frozen=True)
class Telemetry:
    """One report: what every report carries (the post's whole status), and ``detail``, what happened."""

    post: str
    at: str  # ISO 8601 UTC, the post's clock, when it happened
    state: str
    registered: bool
    faults: tuple[str, ...]
    mock_gpio: bool
    detail: Detail
    last_self_test: SelfTest | None = None
    # The SIP stack's counters since the agent started (refused strangers, malformed messages, handler errors):
    # a post under attack, or with a sick stack, shows it on the dashboard before it fails.
    sip_counters: Mapping[str, int] = field(default_factory=dict)

    @property
    def kind(self) -> Kind:
        return self.detail.kind

    # -- the wire ------------------------------------------------------------------------------------------
    def to_wire(self) -> dict[str, object]:
        body: dict[str, object] = {"kind": str(self.kind), "post": self.post, "at": self.at, "state": self.state,
                                   "registered": self.registered, "faults": list(self.faults),
                                   "mock_gpio": self.mock_gpio}
        body.update((k, str(v) if isinstance(v, StrEnum) else v) for k, v in asdict(self.detail).items()
                    if v is not None)
        if isinstance(self.detail, SelfTestReport) and self.detail.passed is not None:
            body["passed"] = self.detail.passed  # what sidecars of earlier versions read
        if self.last_self_test is not None:
            body["last_self_test"] = asdict(self.last_self_test)
        if self.sip_counters:
            body["sip_counters"] = dict(self.sip_counters)
        return body

    def to_json(self) -> str:
        # UTF-8 rather than \u escapes: the largest message a post can build then stays within MAX_BYTES.
        return json.dumps(self.to_wire(), separators=(",", ":"), ensure_ascii=False, allow_nan=False)

    @classmethod
    def from_json(cls, data: bytes | str) -> Telemetry:
        """Read a telemetry body; raises :class:`TelemetryError` naming what is wrong, never anything else."""
        return _read(Fields(parse(data), "", clip=False))

    @classmethod
    def from_wire(cls, body: Mapping[str, object]) -> Telemetry:
        """A message from a parsed JSON object; refuses it as :meth:`from_json` does."""
        check_bounds(body)
        return _read(Fields(body, "", clip=False))

    @classmethod
    def build(cls, kind: str, detail: Mapping[str, object], *, post: str, at: datetime, state: str,
              registered: bool, faults: Sequence[str], mock_gpio: bool,
              last_self_test: Mapping[str, object] | None = None,
              sip_counters: Mapping[str, int] | None = None) -> Telemetry:
        """The post's side: a message from the state machine's report. Text too long is cut, not refused,
        so a long error message from a SIP stack cannot cost the report."""
        body = {**detail, "kind": kind, "post": post, "at": iso(at), "state": state, "registered": registered,
                "faults": list(faults), "mock_gpio": mock_gpio, "last_self_test": last_self_test,
                "sip_counters": dict(sip_counters or {})}
        return _read(Fields(body, "", clip=True))


def _read(f: Fields) -> Telemetry:
    kind = f.choice("kind", Kind)
    post, at, state = f.name("post"), f.time("at"), f.name("state")
    registered, faults, mock_gpio = f.flag("registered"), f.names("faults"), f.flag("mock_gpio")
    last = f.object("last_self_test")
    last_self_test = None if last is None else SelfTest(at=last.time("at"), passed=last.flag("passed"),
                                                        detail=last.text("detail") or "", part=_part(last))
    return Telemetry(post=post, at=at, state=state, registered=registered, faults=faults, mock_gpio=mock_gpio,
                     detail=_read_detail(_DETAILS[kind], f), last_self_test=last_self_test,
                     sip_counters=f.counters("sip_counters"))


def shown_status(state: object, detail: object) -> dict[str, object]:
    """A post's last reported status, as the sidecar keeps it, in the form pages and the JSON API show: ``state``,
    ``registered``, ``faults``, ``mock_gpio``, ``last_self_test``, ``sip_counters``. A status stored by an
    earlier version (which kept whatever a post sent) may not read as a message would: such a field shows as
    unknown."""
    f = Fields({**(detail if isinstance(detail, Mapping) else {}), "state": state}, "", clip=False)

    def last_self_test() -> dict[str, object] | None:
        last = f.object("last_self_test")
        return None if last is None else asdict(SelfTest(last.time("at"), last.flag("passed"),
                                                         last.text("detail") or "", _part(last)))

    return {"state": _or_unknown(lambda: f.maybe_name("state"), None),
            "registered": _or_unknown(lambda: f.maybe_flag("registered"), None),
            "faults": list(_or_unknown(lambda: f.names("faults"), tuple[str, ...]())),
            "mock_gpio": _or_unknown(lambda: f.maybe_flag("mock_gpio"), None) is True,
            "last_self_test": _or_unknown(last_self_test, None),
            "sip_counters": _or_unknown(lambda: f.counters("sip_counters"), dict[str, int]())}


def _part(f: Fields) -> str:
    part = f.text("part") or ""
    if part and part not in SELFTEST_PARTS:
        raise TelemetryError("part", f"{part!r} is not one of {', '.join(SELFTEST_PARTS)}")
    return part


def _or_unknown(read: Callable[[], T], unknown: T) -> T:
    try:
        return read()
    except TelemetryError:
        return unknown


def _read_detail(kind: type[Detail], f: Fields) -> Detail:
    if kind is StateChange:
        return StateChange(previous=f.name("previous"), reason=f.text("reason") or "")
    if kind is CallReport:
        return CallReport(event=f.name("event"), call=f.text("call", required=True, limit=MAX_NAME * 4) or "",
                          host=f.host("host"), target=f.maybe_name("target"),
                          caller=f.text("caller", limit=MAX_NAME * 4), reason=f.text("reason"),
                          retry_in=f.seconds("retry_in"), duration=f.seconds("duration"))
    if kind is SelfTestReport:
        report = SelfTestReport(result=f.choice("result", SelfTestResult),
                                call=f.text("call", limit=MAX_NAME * 4), detail=f.text("detail") or "",
                                part=_part(f))
        passed = f.maybe_flag("passed")
        if passed is not None and passed != report.passed:
            raise TelemetryError("passed", f"{passed} does not agree with result {str(report.result)!r}")
        if report.passed is not None and f.body.get("last_self_test") is None:
            raise TelemetryError("last_self_test", f"required when result is {str(report.result)!r}")
        return report
    if kind is FaultChange:
        return FaultChange(fault=f.name("fault"), active=f.flag("active"), detail=f.text("detail") or "")
    return RegistrationChange(host=f.host("host"), reason=f.text("reason"))


