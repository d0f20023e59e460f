"""Telemetry reports as a post agent of this version sends them, for tests that play a post."""

from __future__ import annotations

from typing import Any

from sip_refuge.telemetry import Telemetry

AT = "2026-11-26T21:04:05.123Z"


def report(post: str, kind: str = "state", /, **fields: Any) -> dict[str, Any]:
    """The JSON object of one report from ``post``: every field a post sends, the kind's own ones, then ``fields``
    (a value of None removes that field)."""
    own: dict[str, dict[str, Any]] = {
        "state": {"previous": "starting", "reason": "registered"},
        "call": {"event": "dial", "call": f"{post}-1", "target": "queue", "host": "127.0.0.1"},
        "selftest": {"result": "pass", "passed": True, "detail": "echo heard", "call": f"{post}-2",
                     "last_self_test": {"at": AT, "passed": True, "detail": "echo heard"}},
        "fault": {"fault": "tamper", "active": True, "detail": ""},
        "registration": {"host": "127.0.0.1"},
    }
    body = {"kind": kind, "post": post, "at": AT, "state": "idle", "registered": True, "faults": [],
            "mock_gpio": False, **own.get(kind, {}), **fields}
    return {k: v for k, v in body.items() if v is not None}


def message(post: str, kind: str = "state", /, **fields: Any) -> Telemetry:
    """The same report as the sidecar's API hands it to the hub."""
    return Telemetry.from_wire(report(post, kind, **fields))
