"""The post's telemetry outbox against a real HTTP receiver on loopback."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sip_refuge.post.telemetry import TelemetryOutbox
from sip_refuge.telemetry import Telemetry
from tests.support.telemetry import message, report


class Receiver:
    """A sidecar stand-in: records telemetry bodies and the Authorization header."""

    def __init__(self, port: int = 0, *, status: int = 202, answer: bytes = b"") -> None:
        self.bodies: list[dict[str, Any]] = []
        self.auth: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length", "0"))
                outer.bodies.append(json.loads(self.rfile.read(length)))
                outer.auth.append(self.headers.get("Authorization", ""))
                self.send_response(status)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def test_reports_arrive_in_order_with_the_token(receiver: Receiver, tmp_path: Path) -> None:
    box = TelemetryOutbox("p1", f"http://127.0.0.1:{receiver.port}/api/v1/posts/p1/telemetry", "tok123",
                          tmp_path / "spool.jsonl")
    box.start()
    try:
        for i in range(5):
            box.put(message("p1", reason=str(i)))
        wait_for(lambda: len(receiver.bodies) == 5)
    finally:
        box.stop()
    assert [b["reason"] for b in receiver.bodies] == ["0", "1", "2", "3", "4"]
    assert Telemetry.from_wire(receiver.bodies[0]) == message("p1", reason="0")
    assert set(receiver.auth) == {"Bearer tok123"}
    assert box.pending() == 0


def test_put_never_blocks_while_sidecar_is_down_and_spool_survives_restart(tmp_path: Path) -> None:
    port = free_port()
    spool = tmp_path / "spool.jsonl"
    box = TelemetryOutbox("p1", f"http://127.0.0.1:{port}/t", "tok", spool, timeout=0.5)
    box.start()
    for i in range(3):
        box.put(message("p1", reason=str(i)))  # nothing listens: these must queue, not raise or wait
    box.stop()
    assert box.pending() == 3 and len(spool.read_text().splitlines()) == 3
    receiver = Receiver(port)
    try:
        again = TelemetryOutbox("p1", f"http://127.0.0.1:{port}/t", "tok", spool)
        again.start()
        wait_for(lambda: len(receiver.bodies) == 3)
        again.stop()
    finally:
        receiver.close()
    assert [b["reason"] for b in receiver.bodies] == ["0", "1", "2"]
    assert spool.read_text() == ""


def test_outbox_is_bounded(tmp_path: Path) -> None:
    box = TelemetryOutbox("p1", None, None, None)
    for i in range(1005):
        box.put(message("p1", reason=str(i)))
    assert box.pending() == 1000 and box.dropped == 5


def test_a_spool_of_the_previous_version_is_sent_in_todays_form_and_damage_is_skipped(
        receiver: Receiver, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool = tmp_path / "spool.jsonl"
    old = {**report("p1", "selftest"), "at": "2026-11-26T21:04:05.123456+00:00",
           "last_self_test": {"at": 1795727045.5, "passed": True, "detail": "echo heard"}}
    spool.write_bytes(json.dumps(old).encode() + b"\n{damaged\n" + json.dumps(report("p1", faults=5)).encode()
                      + b"\n\xff\xfe\n" + json.dumps(report("p1")).encode() + b"\n")
    with caplog.at_level(logging.WARNING):
        box = TelemetryOutbox("p1", f"http://127.0.0.1:{receiver.port}/t", "tok", spool)
    assert box.pending() == 2
    assert [m.split(f"{spool}:")[1].split(":")[0] for m in caplog.messages] == ["2", "3", "4"]  # the damaged lines
    box.start()
    try:
        wait_for(lambda: len(receiver.bodies) == 2)
    finally:
        box.stop()
    assert receiver.bodies[0]["last_self_test"]["at"] == "2026-11-26T21:04:05.500Z"
    assert receiver.bodies[0]["at"] == "2026-11-26T21:04:05.123Z"


def test_a_report_the_sidecar_refuses_is_dropped_with_its_reason(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    refusing = Receiver(status=422, answer=b'{"error": "Unprocessable Entity", "detail": "faults: 5 is not..."}')
    box = TelemetryOutbox("p1", f"http://127.0.0.1:{refusing.port}/t", "tok", tmp_path / "spool.jsonl")
    try:
        with caplog.at_level(logging.ERROR):
            box.start()
            box.put(message("p1"))
            box.put(message("p1", reason="second"))
            wait_for(lambda: len(refusing.bodies) == 2)  # the first refusal does not hold up the next report
            wait_for(lambda: box.pending() == 0)
    finally:
        box.stop()
        refusing.close()
    assert "sidecar refused telemetry (422" in caplog.text and "faults: 5 is not" in caplog.text
