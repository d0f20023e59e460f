"""The real ``sip-refuge sidecar SITE`` under attack and under load, from the attacker's side.

The sidecar listens on 127.0.0.1; its posts report from 127.0.0.1 (``pbx.networks.posts``), and so does the
monitoring. Attackers connect from 127.0.0.2 and up, with no token. Every post camera is a mount of the real
RTSP test camera. Asterisk is not started: AMI stays unconnected, so /healthz answers 503 "degraded" for
that reason throughout; these tests read its ``http`` section. Deadlines are short (3 s for headers, 5 s
idle) so the attacks end quickly; the caps are the defaults but for 20 live views.
"""

from __future__ import annotations

import secrets
import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from sip_refuge.config import Site
from sip_refuge.config.secrets import telemetry_token
from tests.support.http_load import Streams, closed_by_server, connect, head, process_status, read_answer
from tests.support.rtsp_camera import TestCamera
from tests.support.sidecar import Sidecar
from tests.support.sites import sidecar_site
from tests.support.telemetry import report
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

LIMITS = {"header_timeout": "3s", "idle_timeout": "5s", "live_views": 20}
PER_CLIENT = 32  # the default
ATTACKERS = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
MiB = 1024 * 1024


@dataclass
class Setup:
    site: Site
    sidecar: Sidecar
    folder: Path

    @property
    def port(self) -> int:
        assert self.site.sidecar is not None
        return self.site.sidecar.port

    @property
    def pid(self) -> int:
        assert self.sidecar.pid is not None
        return self.sidecar.pid

    def http(self) -> dict[str, Any]:
        report: dict[str, Any] = self.sidecar.health()["http"]
        return report

    def telemetry(self, post_id: str = "idlewells", **body: Any) -> requests.Response:
        """A post's report, with its own token, from 127.0.0.1 (the posts' network here)."""
        token = telemetry_token(post_id, self.site.post(post_id).secret.read())
        return self.sidecar.session.post(f"{self.sidecar.url}/api/v1/posts/{post_id}/telemetry", timeout=15,
                                         json=report(post_id, **body),
                                         headers={"Authorization": f"Bearer {token}"})


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    folder = tmp_path_factory.mktemp("sidecar-http")
    password = "cam-" + secrets.token_hex(8)
    with TestCamera(["sutton-market", "idlewells", "kirkby-bus-station"], user="viewer", password=password) as cam:
        site = sidecar_site(folder, camera=cam, camera_password=password, limits=LIMITS)
        (folder / "tmp").mkdir()
        assert site.sidecar is not None
        # TMPDIR: anything the sidecar spooled to a temporary file would show up here.
        with Sidecar(site.path, f"http://127.0.0.1:{site.sidecar.port}", env={"TMPDIR": str(folder / "tmp")},
                     log_file=folder / "sidecar.log") as sidecar:
            yield Setup(site, sidecar, folder)


def test_idle_connections_beyond_the_per_client_cap_get_503_while_posts_report(setup: Setup) -> None:
    """A stranger's idle connections past its cap get 503 + Retry-After; telemetry, /healthz and / still answer."""
    before = setup.http()
    held = [connect(setup.port, "127.0.0.2") for _ in range(PER_CLIENT)]
    wait_for(lambda: setup.http()["connections"]["busiest_client"] == PER_CLIENT, 15, f"{PER_CLIENT} held")
    extra = [connect(setup.port, "127.0.0.2") for _ in range(68)]  # the old server fell at about 98 idle
    answers = [read_answer(sock) for sock in extra]
    for sock in extra:
        sock.close()
    assert all(a is not None and a.status == 503 and a.headers["retry-after"] == "5" for a in answers)
    assert answers[0] is not None and b"too many connections from 127.0.0.2" in answers[0].body
    # The stranger holds its 32 meanwhile: posts, monitoring and pages are served.
    assert setup.telemetry().status_code == 202
    health = setup.sidecar.health()
    assert health["http"]["refused"]["per_client"] - before["refused"].get("per_client", 0) == 68
    assert any(p.startswith("http: ") and "refused at a cap" in p for p in health["problems"])
    page = setup.sidecar.get("/")
    assert page.status_code == 200 and "Sutton Market" in page.text
    # The held ones never sent a request: each is closed at the header deadline, with a 408.
    left = [closed_by_server(sock, timeout=60) for sock in held]
    for sock in held:
        sock.close()
    assert all(data is not None and data.startswith(b"HTTP/1.1 408 ") for data in left)
    metrics = setup.sidecar.metrics()
    assert 'refuge_http_refused_total{cap="per_client"}' in metrics
    assert setup.http()["timeouts"]["header"] - before["timeouts"].get("header", 0) >= PER_CLIENT


def test_a_hundred_slowloris_connections_are_cut_at_the_header_deadline(setup: Setup) -> None:
    """100 connections that trickle headers forever are each closed with 408; posts and health answer meanwhile."""
    before = setup.http()["timeouts"].get("header", 0)
    slow = [connect(setup.port, ATTACKERS[i % len(ATTACKERS)]) for i in range(100)]
    for sock in slow:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: sidecar\r\n")
    closed: dict[socket.socket, bytes] = {}
    served: list[int] = []
    deadline = time.monotonic() + 90  # a bound for the loop, not a check: the loop ends when all are closed
    while len(closed) < len(slow) and time.monotonic() < deadline:
        for sock in slow:
            if sock in closed:
                continue
            try:
                sock.sendall(b"X-Slow: 1\r\n")  # one more header line: the head is never complete
            except OSError:
                closed.setdefault(sock, b"")
        readable, _, _ = select.select([s for s in slow if s not in closed], [], [], 0.5)
        for sock in readable:
            try:
                closed[sock] = sock.recv(65536)  # the 408, or b"" for a close
            except ConnectionResetError:
                closed[sock] = b""
        if not served:  # while all 100 are trickling: a post and the monitoring are served
            served = [setup.telemetry().status_code, setup.sidecar.get("/healthz").status_code]
    for sock in slow:
        sock.close()
    assert served == [202, 503]  # 503: AMI is not connected here; the health report itself is served
    assert len(closed) == 100, f"{100 - len(closed)} slow connections still open"
    assert all(data.startswith(b"HTTP/1.1 408 ") for data in closed.values())
    assert setup.http()["timeouts"]["header"] - before >= 100


def _rss_sampler(pid: int, stop: threading.Event, peak: list[int]) -> None:
    while not stop.wait(0.05):
        peak[0] = max(peak[0], process_status(pid)["rss_kib"])


def _push_chunked(port: int, source: str, results: list[tuple[int, bytes]]) -> None:
    """An endless chunked body without a token: send until the server answers or closes."""
    sock = connect(port, source)
    sock.sendall(head("POST", "/api/v1/posts/idlewells/telemetry", headers={"Transfer-Encoding": "chunked"}))
    chunk, sent = b"10000\r\n" + b"x" * 0x10000 + b"\r\n", 0
    sock.settimeout(0.2)
    answer = b""
    try:
        while sent < 1000 * MiB and not answer:
            try:
                sock.sendall(chunk)
                sent += 0x10000
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                pass
            try:
                answer = sock.recv(65536)
            except (TimeoutError, BlockingIOError):
                pass
            except ConnectionResetError:
                break
    finally:
        sock.close()
    results.append((sent, answer))


def test_huge_bodies_without_a_token_are_refused_before_they_are_read(setup: Setup) -> None:
    """1,000 MB bodies by Content-Length, and endless chunked ones, get 413 at once: no memory, no disk."""
    database = setup.site.sidecar.database if setup.site.sidecar else Path()
    stored = sum(f.stat().st_size for f in database.parent.iterdir())
    rss = process_status(setup.pid)["rss_kib"]
    peak, stop = [rss], threading.Event()
    sampler = threading.Thread(target=_rss_sampler, args=(setup.pid, stop, peak), daemon=True)
    sampler.start()
    try:
        by_length = []
        for source in ATTACKERS:  # four at once: only the heads are sent, the answer comes before any body
            sock = connect(setup.port, source)
            sock.sendall(head("POST", "/api/v1/posts/idlewells/telemetry", headers={"Content-Length": str(1000 * MiB)}))
            by_length.append(sock)
        answers = [read_answer(sock) for sock in by_length]
        for sock in by_length:
            sock.close()
        pushed: list[tuple[int, bytes]] = []
        pushers = [threading.Thread(target=_push_chunked, args=(setup.port, source, pushed)) for source in ATTACKERS]
        for thread in pushers:
            thread.start()
        for thread in pushers:
            thread.join(60)
    finally:
        stop.set()
        sampler.join(5)
    assert all(a is not None and a.status == 413 and b"1048576000 bytes" in a.body for a in answers)
    assert len(pushed) == 4
    for sent, answer in pushed:
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:100]
        assert sent < 16 * MiB, f"the server let {sent // MiB} MiB in before refusing"
    assert setup.http()["rejected"]["body_too_large"] >= 8
    assert peak[0] - rss < 64 * 1024, f"RSS grew by {(peak[0] - rss) // 1024} MiB"
    assert list((setup.folder / "tmp").iterdir()) == []
    assert sum(f.stat().st_size for f in database.parent.iterdir()) - stored < MiB
    assert setup.telemetry().status_code == 202


def test_two_hundred_event_streams_and_twenty_live_views_leave_posts_and_pages_served(setup: Setup) -> None:
    """200 event streams and 20 live views add no request threads; telemetry, the dashboard and a clean stop work."""
    threads = process_status(setup.pid)["threads"]
    posts = [p.id for p in setup.site.posts]
    token = {"Authorization": f"Bearer {setup.sidecar.token()}"}  # the pages' reads need a login or the token
    with Streams(setup.port, token) as streams:
        events = streams.open("/api/v1/events", 200, [f"127.0.1.{n}" for n in range(1, 11)])
        for i in range(20):
            streams.open(f"/cameras/{posts[i % len(posts)]}/live.mjpeg", 1, [f"127.0.2.{i % 4 + 1}"])
        streams.wait("every stream answered 200", lambda s: s.status == 200, 60)
        streams.wait("two pictures on every live view", lambda s: s.parts >= 2 or s.path.endswith("events"), 90)
        http = setup.http()
        assert (http["streams"]["events"], http["streams"]["live_views"]) == (200, 20)
        # One decoder per camera watched (and a little slack for FFmpeg), not a thread per stream or view.
        assert process_status(setup.pid)["threads"] - threads <= len(posts) + 2
        with connect(setup.port, "127.0.2.9") as sock:
            sock.sendall(head("GET", f"/cameras/{posts[0]}/live.mjpeg", headers=token))
            refused = read_answer(sock)
        assert refused is not None and refused.status == 503 and b"too many live views" in refused.body
        for n in range(20):
            assert setup.telemetry(state=f"idle-{n}").status_code == 202
        streams.wait("all 20 post.status events on every event stream",
                     lambda s: s.path.endswith(".mjpeg") or s.seen.count("post.status") >= 20, 60)
        page = setup.sidecar.get("/")
        assert page.status_code == 200 and "Sutton Market" in page.text
        assert setup.sidecar.get("/static/dashboard.js").status_code == 200
        assert all(s.status == 200 for s in events)
        # A clean stop with everything open: every stream ends, and the sidecar exits 0.
        assert setup.sidecar.stop() == 0
        streams.wait("every stream ended", lambda s: s.ended, 30)
    assert "Traceback" not in setup.sidecar.log()
    setup.sidecar.start()
