"""The sidecar's HTTP server (sidecar/web/server.py) on loopback, with raw sockets from other loopback addresses.

The app is a small real Flask app whose routes make the server's cases happen: a request that holds its
thread until the test lets it go, a body echo, and a stream that ticks. Clients at 127.0.0.2 and up are
strangers; 127.0.0.1 is the sidecar's own host (monitoring). Every limit is small so each case is quick.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import threading
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path

import pytest
from flask import Flask, Response, jsonify, request

from sip_refuge.config import HttpLimits, load_site
from sip_refuge.config.secrets import init_secrets
from sip_refuge.sidecar.core import Hub
from sip_refuge.sidecar.outbox import Outbox
from sip_refuge.sidecar.store import Store
from sip_refuge.sidecar.web import create_app
from sip_refuge.sidecar.web import server as server_module
from sip_refuge.sidecar.web import stream as stream_module
from sip_refuge.sidecar.web.admission import Admission
from sip_refuge.sidecar.web.server import HttpServer
from sip_refuge.sidecar.web.stream import Stream
from tests.support.http_load import Streams, closed_by_server, connect, head, read_answer
from tests.support.telemetry import message
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "site.example.yaml"

MAX_BODY = 1024
LIMITS = HttpLimits(connections=40, reserve=8, per_client=10, workers=4, streams=12, live_views=2,
                    header_timeout=1, idle_timeout=1)


class Ticks(Stream):
    """A stream of ``tick`` lines, one every 50 ms, until the server stops it."""

    kind = "events"

    def __iter__(self) -> Iterator[bytes]:
        raise AssertionError("the server must run the stream in its loop, not iterate it in a thread")

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        while True:
            yield b"tick\n"
            await asyncio.sleep(0.05)

    def close(self) -> None:
        pass


class App:
    """The Flask app, and a gate that /hold requests wait on (each holds a request thread meanwhile)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.calls = 0
        self.holding = 0
        self.flask = Flask(__name__)
        self.flask.add_url_rule("/hold", view_func=self.hold)
        self.flask.add_url_rule("/healthz", "healthz", view_func=lambda: jsonify(status="ok"))
        self.flask.add_url_rule("/echo", view_func=self.echo, methods=["POST"])
        self.flask.add_url_rule("/ticks", "ticks", view_func=lambda: Response(Ticks(), direct_passthrough=True))

    def hold(self) -> str:
        self.holding += 1
        self.gate.wait(30)
        return "released"

    def echo(self) -> Response:
        self.calls += 1
        return jsonify(length=len(request.get_data()), path=request.path)


@pytest.fixture()
def app() -> Iterator[App]:
    the_app = App()
    yield the_app
    the_app.gate.set()


@pytest.fixture()
def server(app: App) -> Iterator[HttpServer]:
    admission = Admission(LIMITS, trusted=["127.0.0.1/32"])
    http = HttpServer(app.flask.wsgi_app, admission, host="127.0.0.1", port=0, max_body=MAX_BODY).start()
    yield http
    app.gate.set()
    http.stop()


def ask(server: HttpServer, method: str, path: str, *, source: str = "127.0.0.1", body: bytes = b"",
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    with connect(server.port, source) as sock:
        sock.sendall(head(method, path, headers={"Content-Length": str(len(body)), **(headers or {})}) + body)
        answer = read_answer(sock)
    assert answer is not None, f"{method} {path}: closed without an answer"
    return answer.status, answer.headers, answer.body


def test_requests_keep_alive_and_whole_bodies_reach_the_app(server: HttpServer, app: App) -> None:
    """Kept-alive requests, a chunked body and an Expect: 100-continue body all reach the app whole."""
    with connect(server.port, "127.0.0.2") as sock:
        sock.sendall(head("POST", "/echo", headers={"Content-Length": "5"}) + b"hello")
        first = read_answer(sock)
        sock.sendall(head("POST", "/echo?x=1", headers={"Transfer-Encoding": "chunked"}) + b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
        second = read_answer(sock)
        sock.sendall(head("POST", "/echo", headers={"Content-Length": "3", "Expect": "100-continue"}))
        assert sock.recv(100).startswith(b"HTTP/1.1 100 ")
        sock.sendall(b"xyz")
        third = read_answer(sock)
    assert first and second and third
    assert [a.status for a in (first, second, third)] == [200, 200, 200]
    assert [a.body for a in (first, second, third)] == [b'{"length":5,"path":"/echo"}\n',
                                                       b'{"length":5,"path":"/echo"}\n',
                                                       b'{"length":3,"path":"/echo"}\n']
    assert first.headers["server"] == "sip-refuge"


def test_a_body_over_the_limit_is_refused_before_the_app_sees_it(server: HttpServer, app: App) -> None:
    """413 by Content-Length without reading the body, and 413 when a chunked body passes the limit."""
    with connect(server.port, "127.0.0.2") as sock:
        sock.sendall(head("POST", "/echo", headers={"Content-Length": str(10**12)}))
        by_length = read_answer(sock)
    with connect(server.port, "127.0.0.2") as sock:
        sock.sendall(head("POST", "/echo", headers={"Transfer-Encoding": "chunked"}))
        sent = 0
        try:
            while sent < 10 * 1024 * 1024:  # "endless"; the server must answer long before this
                sock.sendall(b"100\r\n" + b"x" * 256 + b"\r\n")
                sent += 256
        except (BrokenPipeError, ConnectionResetError):
            pass
        by_stream = read_answer(sock)
    assert by_length is not None and by_length.status == 413 and b"1000000000000 bytes" in by_length.body
    assert by_stream is not None and by_stream.status == 413 and b"went on past it" in by_stream.body
    assert app.calls == 0
    assert server.admission.status()["rejected"] == {"body_too_large": 2}


def test_oversized_or_broken_request_heads_are_refused(server: HttpServer) -> None:
    """A head over 16 KiB gets 431, a malformed one 400; the server keeps serving."""
    status, _, _ = ask(server, "GET", "/healthz", source="127.0.0.2", headers={"X-Big": "a" * 20000})
    assert status == 431
    with connect(server.port, "127.0.0.2") as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n")
        broken = read_answer(sock)
    assert broken is not None and broken.status == 400
    assert ask(server, "GET", "/healthz")[0] == 200
    assert server.admission.status()["rejected"] == {"bad_request": 1, "headers_too_large": 1}


def test_slow_and_idle_connections_are_closed_at_their_deadlines(server: HttpServer) -> None:
    """A head still incomplete after header_timeout gets 408 and is closed; a kept-alive one after idle_timeout."""
    slow = connect(server.port, "127.0.0.2")
    slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the rest
    idle = connect(server.port, "127.0.0.2")
    idle.sendall(head("GET", "/healthz"))
    assert (answer := read_answer(idle)) is not None and answer.status == 200
    silent = connect(server.port, "127.0.0.3")  # connects and says nothing at all
    left = [closed_by_server(s, timeout=15) for s in (slow, idle, silent)]
    for sock in (slow, idle, silent):
        sock.close()
    assert left[0] is not None and left[0].startswith(b"HTTP/1.1 408 ")
    assert left[1] == b""  # the idle one is closed without a word
    assert left[2] is not None and left[2].startswith(b"HTTP/1.1 408 ")
    assert server.admission.status()["timeouts"] == {"header": 2, "idle": 1}


def test_connections_are_capped_per_client_and_in_all_with_a_reserve_for_loopback(server: HttpServer) -> None:
    """Beyond per_client, or past connections minus the reserve for strangers, a connection gets 503 + Retry-After."""
    held = [connect(server.port, "127.0.0.2") for _ in range(LIMITS.per_client)]
    with connect(server.port, "127.0.0.2") as sock:
        over = read_answer(sock)
    held += [connect(server.port, f"127.0.0.{n}") for n in (3, 4) for _ in range(LIMITS.per_client)]
    wait_for(lambda: server.admission.status()["connections"]["open"] == 30, 10, "30 connections open")
    held += [connect(server.port, "127.0.0.5") for _ in range(2)]  # 32 = connections - reserve
    with connect(server.port, "127.0.0.6") as sock:
        full = read_answer(sock)
    try:
        assert over is not None and over.status == 503 and over.headers["retry-after"] == "5"
        assert b"too many connections from 127.0.0.2" in over.body
        assert full is not None and full.status == 503 and b"too many connections (at most 40)" in full.body
        status, _, _ = ask(server, "GET", "/healthz")  # loopback uses the reserve
        assert status == 200
        assert server.admission.status()["refused"] == {"connections": 1, "per_client": 1}
    finally:
        for sock in held:
            sock.close()


def test_request_threads_keep_a_reserve_for_health_checks_from_loopback(
        server: HttpServer, app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    """With every general request thread busy, a stranger waits and gets 503, while loopback's /healthz answers."""
    monkeypatch.setattr(server_module, "QUEUE_WAIT", 1.0)
    general = LIMITS.workers - server.admission.worker_reserve
    holders = [connect(server.port, "127.0.0.2") for _ in range(general)]
    for sock in holders:
        sock.sendall(head("GET", "/hold"))
    wait_for(lambda: app.holding == general, 10, f"{general} requests holding their threads")
    assert ask(server, "GET", "/healthz")[0] == 200
    status, headers, body = ask(server, "GET", "/healthz", source="127.0.0.3")
    assert status == 503 and headers["retry-after"] == "5" and b"request threads are busy" in body
    app.gate.set()
    answers = [read_answer(sock) for sock in holders]
    assert all(a is not None and a.status == 200 and a.body == b"released" for a in answers)
    for sock in holders:
        sock.close()
    assert server.admission.status()["refused"] == {"workers": 1}


def test_streams_hold_no_request_thread_and_are_capped(server: HttpServer, app: App) -> None:
    """Twelve streams run with four request threads, all still free for requests; the thirteenth gets 503."""
    with Streams(server.port) as streams:
        streams.open("/ticks", LIMITS.streams, ["127.0.0.2", "127.0.0.3"])
        streams.wait("ticks on every stream", lambda s: s.status == 200 and s.bytes_total > 300, 15)
        assert server.admission.status()["workers"]["busy"] == 0
        for _ in range(LIMITS.workers + 2):
            assert ask(server, "POST", "/echo", source="127.0.0.4", body=b"x")[0] == 200
        status, headers, body = ask(server, "GET", "/ticks", source="127.0.0.4")
        assert status == 503 and headers["retry-after"] == "5" and b"too many open streams" in body
        # A client that goes away frees its stream at once, without waiting for the next write to fail.
        streams.streams[0].sock.shutdown(socket.SHUT_RDWR)
        wait_for(lambda: server.admission.status()["streams"]["events"] == LIMITS.streams - 1, 10, "stream freed")


def test_stop_ends_streams_and_joins_the_request_threads(app: App) -> None:
    """stop() ends open streams with the end of their body and leaves no request thread behind."""
    http = HttpServer(app.flask.wsgi_app, Admission(LIMITS), host="127.0.0.1", port=0, max_body=MAX_BODY).start()
    with Streams(http.port) as streams:
        streams.open("/ticks", 3, ["127.0.0.2"])
        streams.wait("ticks", lambda s: s.bytes_total > 200, 15)
        http.stop()
        ended = streams.wait("every stream ended by the server", lambda s: s.ended, 15)
    assert all(s.status == 200 for s in ended)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("http-")]


def test_the_event_stream_runs_in_the_loop_with_keepalives_and_ends_when_the_hub_closes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sidecar app's /api/v1/events: each event once, a keep-alive comment when idle, a clean end on stop."""
    monkeypatch.setattr(stream_module, "KEEPALIVE", 0.3)
    path = tmp_path / "site.yaml"
    shutil.copy(EXAMPLE, path)
    init_secrets(load_site(path, check_secrets=False))
    site = load_site(path)
    store = Store(tmp_path / "sidecar.sqlite3")
    hub = Hub(site, store, Outbox(store, []), base_url="http://127.0.0.1")
    token = "t0ken-for-the-server-tests-0123456789"
    app = create_app(hub, token=token)
    http = HttpServer(app, Admission(LIMITS), host="127.0.0.1", port=0, max_body=MAX_BODY).start()
    try:
        with Streams(http.port, {"Authorization": f"Bearer {token}"}) as streams:  # streams need a login or it
            streams.open("/api/v1/events", 3, ["127.0.0.2"])
            streams.wait("three subscribers", lambda s: s.status == 200, 10)
            wait_for(lambda: len(hub.fanout) == 3, 10, "three subscribers of the fan-out")
            for state in ("idle", "ringing"):
                hub.recorder.on_telemetry("idlewells", message("idlewells", state=state))
            streams.wait("both events on each stream", lambda s: s.seen == ["post.status", "post.status"], 10)
            streams.wait("keep-alive comments", lambda s: s.comments >= 2, 10)
            assert all(s.seen == ["post.status", "post.status"] for s in streams.snapshot())
            hub.fanout.close()  # what the runner does first when the sidecar stops
            streams.wait("every stream ended", lambda s: s.ended, 10)
        assert len(hub.fanout) == 0
    finally:
        http.stop()
        store.close()
