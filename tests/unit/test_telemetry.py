"""The post's telemetry outbox against a real HTTP receiver on loopback."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sip_refuge.post.telemetry import TelemetryOutbox


class Receiver:
    """A sidecar stand-in: records telemetry bodies and the Authorization header."""

    def __init__(self, port: int = 0) -> None:
        self.bodies: list[dict[str, object]] = []
        self.auth: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length", "0"))
                outer.bodies.append(json.loads(self.rfile.read(length)))
                outer.auth.append(self.headers.get("Authorization", ""))
                self.send_response(202)
                self.end_headers()

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
            box.put({"kind": "state", "seq": i})
        wait_for(lambda: len(receiver.bodies) == 5)
    finally:
        box.stop()
    assert [b["seq"] for b in receiver.bodies] == [0, 1, 2, 3, 4]
    assert set(receiver.auth) == {"Bearer tok123"}
    assert box.pending() == 0


def test_put_never_blocks_while_sidecar_is_down_and_spool_survives_restart(tmp_path: Path) -> None:
    port = free_port()
    spool = tmp_path / "spool.jsonl"
    box = TelemetryOutbox("p1", f"http://127.0.0.1:{port}/t", "tok", spool, timeout=0.5)
    box.start()
    for i in range(3):
        box.put({"seq": i})  # nothing listens: these must queue, not raise or wait
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
    assert [b["seq"] for b in receiver.bodies] == [0, 1, 2]
    assert spool.read_text() == ""


def test_outbox_is_bounded(tmp_path: Path) -> None:
    box = TelemetryOutbox("p1", None, None, None)
    for i in range(1005):
        box.put({"seq": i})
    assert box.pending() == 1000 and box.dropped == 5
