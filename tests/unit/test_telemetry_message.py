"""The telemetry message shared by post and sidecar: its JSON round trip, and every body it must refuse (issue 8,
findings 10 and 14; issue 11)."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sip_refuge.telemetry as telemetry
from sip_refuge.post.commands import Report
from sip_refuge.post.events import (
    ButtonPressed,
    CallAnswered,
    CallEnded,
    CallFailed,
    CallProgress,
    IncomingCall,
    Registered,
    SelfTestRequested,
    TamperChanged,
    Unregistered,
)
from sip_refuge.telemetry import (
    CallReport,
    FaultChange,
    Kind,
    RegistrationChange,
    SelfTest,
    SelfTestReport,
    StateChange,
    Telemetry,
    TelemetryError,
    reading,
    shown_status,
)
from tests.support.telemetry import AT, report
from tests.unit.test_machine import Harness, checks, chirp, connect

# -- the round trip --------------------------------------------------------------------------------------------

names = st.from_regex(r"[a-z][a-z0-9_]{0,20}", fullmatch=True)
texts = st.text(st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp", "Cf")), max_size=60)
seconds = st.floats(0, 86400, allow_nan=False)
times = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)).map(
    lambda t: t.replace(microsecond=t.microsecond // 1000 * 1000, tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
    + "Z")
details = st.one_of(
    st.builds(StateChange, previous=names, reason=texts),
    st.builds(CallReport, event=names, call=names, host=st.none() | st.just("127.0.0.1"),
              target=st.none() | st.sampled_from(["queue", "selftest"]), caller=st.none() | texts,
              reason=st.none() | texts, retry_in=st.none() | seconds, duration=st.none() | seconds),
    st.builds(SelfTestReport, result=st.sampled_from(telemetry.SelfTestResult), call=st.none() | names,
              detail=texts),
    st.builds(FaultChange, fault=names, active=st.booleans(), detail=texts),
    st.builds(RegistrationChange, host=st.none() | st.just("pbx.example.org"), reason=st.none() | texts),
)


@st.composite
def messages(draw: st.DrawFn) -> Telemetry:
    detail = draw(details)
    last = draw(st.builds(SelfTest, at=times, passed=st.booleans(), detail=texts))
    finished = isinstance(detail, SelfTestReport) and detail.passed is not None
    return Telemetry(post=draw(names), at=draw(times), state=draw(names), registered=draw(st.booleans()),
                     faults=tuple(draw(st.lists(names, max_size=5))), mock_gpio=draw(st.booleans()), detail=detail,
                     last_self_test=last if finished else draw(st.none() | st.just(last)))


@settings(max_examples=300)
@given(messages())
def test_every_message_survives_its_json_round_trip(message: Telemetry) -> None:
    text = message.to_json()
    assert Telemetry.from_json(text) == message
    assert Telemetry.from_json(text.encode()).to_json() == text
    assert json.loads(text)["kind"] == str(message.kind)


def test_a_report_from_a_post_of_the_previous_version_still_reads() -> None:
    # Exactly what PostRunner._report sent before the message was typed: the machine's own "post", an offset time,
    # `passed` beside `result`, and last_self_test.at in seconds since 1970.
    old = {"post": "sutton-market", "result": "pass", "detail": "echo heard", "call": "sutton-market-4",
           "kind": "selftest", "at": "2026-11-26T21:04:05.123456+00:00", "state": "idle", "registered": True,
           "faults": [], "mock_gpio": True, "passed": True,
           "last_self_test": {"at": 1795727045.5, "passed": True, "detail": "echo heard"}}
    message = Telemetry.from_json(json.dumps(old))
    assert message.kind is Kind.SELFTEST and message.post == "sutton-market" and message.mock_gpio is True
    assert message.at == "2026-11-26T21:04:05.123Z"
    assert message.last_self_test == SelfTest("2026-11-26T21:04:05.500Z", True, "echo heard")
    assert message.detail == SelfTestReport(telemetry.SelfTestResult.PASS, "sutton-market-4", "echo heard")
    wire = message.to_wire()
    assert {k: wire[k] for k in ("kind", "post", "result", "passed", "call", "state", "registered", "faults")} == {
        k: old[k] for k in ("kind", "post", "result", "passed", "call", "state", "registered", "faults")}


def test_every_report_the_machine_makes_builds_a_message_the_sidecar_accepts() -> None:
    """Each Report kind and call event of the post's machine, built as the runner builds it."""
    h = Harness(registered=False)
    h.send(Registered("pbx-a"), 1.0)
    h.send(CallEnded(connect(h, 10.0), "far end hung up"), 20.0)
    failing = h.dial(h.press(100.0)).call_id
    h.send(CallFailed(failing, 503, "Service Unavailable"), 100.5)  # the alarm waits to be sent again
    retry = h.dial(h.tick(200.0)).call_id
    h.send(CallProgress(retry, 180), 200.5)
    h.send(CallAnswered(retry), 201.0)
    h.send(CallEnded(retry, "far end hung up"), 210.0)
    h.send(IncomingCall("in-1", "sip:desk-1@pbx-a"), 220.0)
    h.send(CallEnded("in-1", "far end hung up"), 230.0)
    h.send(TamperChanged(True), 300.0)
    h.send(TamperChanged(False), 301.0)
    for at, heard in ((10_000.0, (chirp(), chirp(gain=0.3))), (20_000.0, (chirp(), b""))):
        checks(h, h.send(SelfTestRequested(), at), call=heard[0], local=heard[1], now=at)
    h.dial(h.send(SelfTestRequested(), 30_000.0))
    h.send(ButtonPressed(), 30_001.0)  # aborts the self-test
    h.send(Unregistered("network down"), 30_100.0)
    built = []
    for command in h.out:
        if isinstance(command, Report):
            last = h.m.status(0.0).get("last_self_test") if command.kind == "selftest" else None
            message = Telemetry.build(command.kind, command.detail, post="sutton-market", at=datetime.now(UTC),
                                      state=str(h.m.state), registered=h.m.registered, faults=h.m.faults(),
                                      mock_gpio=True, last_self_test=last if isinstance(last, dict) else None)
            assert Telemetry.from_json(message.to_json()) == message
            built.append(message)
    assert {m.kind for m in built} == set(Kind)
    events = {m.detail.event for m in built if isinstance(m.detail, CallReport)}
    assert {"dial", "failed", "queued", "answered", "ended", "incoming"} <= events, events
    results = [m.detail for m in built if isinstance(m.detail, SelfTestReport)]
    assert [r.result for r in results] == ["pass", "fail", "aborted"]
    assert results[1].part == "local" and results[1].detail.startswith("local: the microphone did not hear")
    assert results[0].part == "" and results[2].part == ""


def test_the_post_cuts_long_text_rather_than_lose_the_report() -> None:
    message = Telemetry.build("registration", {"reason": "x" * 5000}, post="p1", at=datetime.now(UTC), state="fault",
                              registered=False, faults=["unregistered"], mock_gpio=False)
    assert isinstance(message.detail, RegistrationChange) and message.detail.reason is not None
    assert len(message.detail.reason) == telemetry.MAX_TEXT and message.detail.reason.endswith("…")
    assert Telemetry.from_json(message.to_json()) == message


def test_the_largest_message_a_post_can_build_is_within_the_sidecars_limits() -> None:
    longest = "\N{SMILING FACE WITH SMILING EYES}" * 5000  # 4 bytes each in UTF-8, 12 as JSON \u escapes
    for kind, detail in (("selftest", {"result": "fail", "detail": longest, "call": longest}),
                         ("call", {"event": "failed", "call": longest, "caller": longest, "reason": longest,
                                   "host": "h" * 255, "target": "t" * 64, "retry_in": 1e9, "duration": 1e9})):
        message = Telemetry.build(kind, detail, post="p" * 64, at=datetime.now(UTC), state="s" * 64,
                                  registered=True, faults=[f"{i:02d}" + "f" * 62 for i in range(64)], mock_gpio=True,
                                  last_self_test={"at": AT, "passed": False, "detail": longest})
        assert Telemetry.from_json(message.to_json()) == message


def test_unknown_fields_are_read_within_bounds_then_dropped() -> None:
    message = Telemetry.from_json(json.dumps(report("p1", extra={"from": "a newer post", "n": [1, 2.5, None]})))
    assert "extra" not in message.to_wire()


# -- what the sidecar refuses ----------------------------------------------------------------------------------

def refused(body: str | bytes) -> TelemetryError:
    with pytest.raises(TelemetryError) as caught:
        Telemetry.from_json(body)
    return caught.value


def refused_with(status: int, field: str, body: str | bytes) -> str:
    error = refused(body)
    assert (error.status, error.field) == (status, field), str(error)
    return str(error)


def with_(**fields: Any) -> str:
    return json.dumps(report("p1", **fields))


@pytest.mark.parametrize(("fields", "field"), [
    ({"faults": 5}, "faults"),  # issue 8, finding 10: a 500 on / before
    ({"faults": "abc"}, "faults"),  # ... and an exception in dashboard.js
    ({"faults": ["tamper", 3]}, "faults[1]"),
    ({"faults": [None]}, "faults[0]"),
    ({"faults": ["a b"]}, "faults[0]"),
    ({"registered": "yes"}, "registered"),
    ({"registered": 1}, "registered"),
    ({"mock_gpio": None}, "mock_gpio"),
    ({"state": ""}, "state"),
    ({"state": "<script>"}, "state"),
    ({"state": "x" * 65}, "state"),
    ({"post": None}, "post"),
    ({"at": "yesterday"}, "at"),
    ({"at": "2026-11-26T21:04:05"}, "at"),  # no time zone: which time would it be?
    ({"at": 1e300}, "at"),
    ({"last_self_test": "passed"}, "last_self_test"),
    ({"last_self_test": {"at": AT, "passed": "yes"}}, "last_self_test.passed"),
    ({"reason": 5}, "reason"),
    ({"reason": "x" * 1001}, "reason"),
])
def test_a_wrong_field_is_named(fields: dict[str, Any], field: str) -> None:
    refused_with(422, field, with_(**fields))


@pytest.mark.parametrize("kind", ["bogus", "heartbeat", "", 5, None])
def test_an_unknown_kind_is_refused(kind: object) -> None:
    assert "one of state | call | selftest | fault | registration" in refused_with(422, "kind", with_(kind=kind))


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_refused_where_they_stand(constant: str) -> None:
    body = json.dumps(report("p1", "call", duration=1.5)).replace("1.5", constant)
    assert f"{constant} is not allowed" in refused_with(422, "duration", body)
    body = json.dumps(report("p1", extra={"deep": [0.5]})).replace("0.5", constant)
    refused_with(422, "extra.deep[0]", body)


def test_numbers_too_large_for_a_float_or_a_page_are_refused() -> None:
    refused_with(422, "duration", json.dumps(report("p1", "call", duration=1.5)).replace("1.5", "1e999"))
    refused_with(422, "duration", with_(kind="call", event="ended", call="c", duration=-1))
    refused_with(422, "extra", with_(extra=10**30))
    refused_with(400, "body", with_(extra=0).replace('"extra": 0', '"extra": ' + "9" * 5000))  # Python's own limit


def test_30000_deep_nesting_is_refused_without_recursion(monkeypatch: pytest.MonkeyPatch) -> None:
    for deep in ("[" * 30_000 + "]" * 30_000, '{"a":' * 30_000 + "1" + "}" * 30_000):
        refused_with(413, "body", deep)  # the size limit comes first
        monkeypatch.setattr(reading, "MAX_BYTES", 10**6)
        assert "nested more than 8 deep" in refused_with(400, "body", deep)
        monkeypatch.undo()


def test_depth_is_counted_outside_strings_only() -> None:
    refused_with(400, "body", with_(extra=[[[[[[[[1]]]]]]]]))  # 9 levels with the report itself
    Telemetry.from_json(with_(extra=[[[[[[["[[[[[[[[[[{{{{{{{{"]]]]]]]))  # 8 levels, brackets in text


@pytest.mark.parametrize(("fields", "field", "problem"), [
    ({"extra": "x" * 1001}, "extra", "1001 characters, more than 1000"),
    ({"extra": list(range(65))}, "extra", "65 items, more than 64"),
    ({"faults": ["f"] * 65}, "faults", "65 items, more than 64"),
    ({"extra": {f"k{i}": i for i in range(65)}}, "extra", "65 keys, more than 64"),
    ({"k" * 65: 1}, "body: a key", "65 characters, more than 64"),
])
def test_long_text_long_lists_and_many_keys_are_refused(fields: dict[str, Any], field: str, problem: str) -> None:
    assert refused_with(422, field, with_(**fields)) == f"{field}: {problem}"


def test_the_whole_body_is_bounded_and_must_be_one_json_object_in_utf8() -> None:
    padding = {f"x{i}": "y" * 900 for i in range(20)}
    refused_with(413, "body", with_(**padding))
    refused_with(400, "body", "[1, 2]")
    refused_with(400, "body", "{not json")
    refused_with(400, "body", b'{"kind": "state", "x": "\xff"}')
    refused_with(400, "body", '{"kind": "state", "kind": "call"}')
    refused_with(422, "extra", with_(extra="\ud800"))  # a lone surrogate: no page could hold it
    refused_with(422, "post", with_(post=None))


def test_a_selftest_report_must_agree_with_itself() -> None:
    refused_with(422, "passed", json.dumps(report("p1", "selftest", passed=False)))
    refused_with(422, "last_self_test", json.dumps(report("p1", "selftest", last_self_test=None)))
    refused_with(422, "result", json.dumps(report("p1", "selftest", result="maybe")))
    aborted = Telemetry.from_json(json.dumps(report("p1", "selftest", result="aborted", passed=None,
                                                    last_self_test=None)))
    assert isinstance(aborted.detail, SelfTestReport) and aborted.detail.passed is None
    assert "passed" not in aborted.to_wire()


@settings(max_examples=300)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
                    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
                    max_leaves=30))
def test_any_json_is_read_or_refused_with_a_telemetry_error(value: object) -> None:
    body = json.dumps(value if not isinstance(value, dict) else {**report("p1"), **value})
    try:
        message = Telemetry.from_json(body)
    except TelemetryError as error:
        assert error.status in (400, 413, 422) and error.field
    else:
        assert Telemetry.from_json(message.to_json()) == message


# -- what the pages show of a stored status ---------------------------------------------------------------------

def test_a_status_stored_by_an_earlier_version_shows_only_what_reads() -> None:
    """Earlier sidecars stored whatever a post sent: it shows as unknown, never as a broken value."""
    hostile = {"faults": 5, "registered": math.nan, "mock_gpio": "yes",
               "last_self_test": {"at": math.inf, "passed": True}, "sip_counters": {"refused": -1}}
    assert shown_status("<b>", hostile) == {"state": None, "registered": None, "faults": [], "mock_gpio": False,
                                            "last_self_test": None, "sip_counters": {}}
    assert shown_status("idle", {"faults": "abc", "last_self_test": "junk"})["faults"] == []
    assert shown_status(None, None)["last_self_test"] is None
    good = {"faults": ["tamper"], "registered": True, "mock_gpio": True, "sip_counters": {"refused": 3},
            "last_self_test": {"at": 1795727045.5, "passed": False, "detail": "no echo"}}
    assert shown_status("fault", good) == {
        "state": "fault", "registered": True, "faults": ["tamper"], "mock_gpio": True, "sip_counters": {"refused": 3},
        "last_self_test": {"at": "2026-11-26T21:04:05.500Z", "passed": False, "detail": "no echo", "part": ""}}
