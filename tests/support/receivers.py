"""Real receivers on loopback for CCTV target tests: a Standard Webhooks receiver, a black hole, and
protocol-faithful fakes of Milestone's Generic Event server and Nx Witness, written from their public docs
(Milestone XProtect administrator manual, "Generic events" and data sources; Nx Meta API docs and
networkoptix/nx_open_integrations). Plus a real VLC with its HTTP interface.

Every receiver waits on a condition with a deadline (``wait_for``), never on a sleep.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError


class Waitable:
    """A condition variable that receivers notify on every change."""

    def __init__(self) -> None:
        self.cond = threading.Condition()

    def changed(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
        with self.cond:
            if not self.cond.wait_for(predicate, timeout):
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class _Quiet(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # test output stays readable; receivers record what matters

    def body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("content-length") or 0))

    def reply(self, status: int, payload: object = None, headers: dict[str, str] | None = None) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Server(Waitable):
    """An HTTP server that can be stopped and started again on the same port (a receiver outage)."""

    handler: type[BaseHTTPRequestHandler]

    def __init__(self) -> None:
        super().__init__()
        self.port = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        httpd = ThreadingHTTPServer(("127.0.0.1", self.port), self.handler)
        httpd.daemon_threads = True
        httpd.owner = self  # type: ignore[attr-defined]
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._httpd is not None and self._thread is not None:
            self._httpd.shutdown()
            self._httpd.server_close()  # the port now refuses connections
            self._thread.join()
        self._httpd = self._thread = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


# -- Standard Webhooks ---------------------------------------------------------------------------------


class _WebhookHandler(_Quiet):
    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        owner: WebhookReceiver = self.server.owner  # type: ignore[attr-defined]
        status = owner.handle(self.path, self.body(), {k: v for k, v in self.headers.items()})
        self.reply(status)


# What a receiver written from docs/spec.md section 6 relies on, per event type (beyond type and timestamp).
SPEC_DATA = {
    "call.queued": ("incident", "reference", "post", "camera", "desk", "snapshot_url"),
    "call.answered": ("incident", "reference", "post", "desk"),
    "call.ended": ("incident", "reference", "post", "outcome"),
    "call.unanswered": ("incident", "reference", "post", "reason"),
    "incident.closed": ("incident", "reference", "post", "reason", "reason_label", "note", "outcome", "closed_by"),
    "post.offline": ("post",), "post.online": ("post",), "camera.fault": ("post", "reason"),
    "camera.ok": ("post",), "selftest.failed": ("post", "reason"),
    "pbx.down": ("pbx", "reason"), "pbx.up": ("pbx", "reason"),
    "post.fault": ("post", "reason", "faults"),
    "post.ok": ("post", "faults"),
}


class WebhookReceiver(_Server):
    """Verifies every request with ``standardwebhooks`` and de-duplicates by ``webhook-id``, as a VMS should.
    Each event is also checked against the spec's fields for its type: ``malformed`` lists those that miss one
    (an unknown type counts too), while unknown extra fields are ignored, as the spec asks of receivers."""

    handler = _WebhookHandler

    def __init__(self, secret: str) -> None:
        super().__init__()
        self._verifier = Webhook(secret)
        self.events: list[dict[str, Any]] = []  # verified, de-duplicated, in arrival order
        self.ids: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.requests = 0
        self.duplicates = 0
        self.rejected = 0
        self.malformed: list[str] = []  # "TYPE: what is missing", for events that break the spec
        self.fail_with: int | None = None  # answer this status instead of accepting

    def handle(self, path: str, body: bytes, headers: dict[str, str]) -> int:
        with self.cond:
            self.requests += 1
            try:
                payload = self._verifier.verify(body, headers)
            except WebhookVerificationError:
                self.rejected += 1
                self.cond.notify_all()
                return 401
            if self.fail_with is not None:
                self.cond.notify_all()
                return self.fail_with
            event_id = {k.lower(): v for k, v in headers.items()}["webhook-id"]
            if event_id in self.ids:
                self.duplicates += 1
            else:
                self.ids.append(event_id)
                self.events.append(payload)
                self.headers.append(headers)
                self._check(payload)
            self.cond.notify_all()
            return 204


    def _check(self, payload: dict[str, Any]) -> None:
        kind, data = payload.get("type"), payload.get("data")
        needed = SPEC_DATA.get(str(kind))
        if needed is None or not isinstance(data, dict):
            self.malformed.append(f"{kind}: not an event type of the spec, or no data")
            return
        missing = [k for k in needed if k not in data]
        if missing:
            self.malformed.append(f"{kind}: no {', '.join(missing)}")

    def closed(self, incident: str) -> list[dict[str, Any]]:
        """The ``incident.closed`` events received for ``incident``."""
        with self.cond:
            return [e for e in self.events if e["type"] == "incident.closed" and e["data"]["incident"] == incident]


class BlackHole(Waitable):
    """Accepts TCP connections and never answers until ``release()``: the slowest possible target."""

    def __init__(self) -> None:
        super().__init__()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self.cond:
                self.connections.append(conn)
                self.cond.notify_all()

    def release(self) -> None:
        self._sock.close()
        with self.cond:
            for conn in self.connections:
                conn.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


def refused_port() -> int:
    """A loopback port with nothing listening (a dead target)."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return int(sock.getsockname()[1])


# -- Milestone XProtect Generic Event, "Compatible" data source ------------------------------------------


@dataclass
class MilestoneEventServer(Waitable):
    """The XProtect event server's "Compatible" data source: TCP, plain ASCII, no separator, echo all bytes.

    Per the administrator manual: each generic event has an expression; "search" expressions match when
    every quoted term appears in the package (a term of several words must appear as written); only clients
    on the allowed list (by default only localhost) are served; other connections are dropped unanswered.
    """

    expressions: dict[str, list[str]] = field(default_factory=dict)  # generic event name -> terms
    allowed: tuple[str, ...] = ("127.0.0.1",)
    packages: list[str] = field(default_factory=list)
    fired: list[tuple[str, str]] = field(default_factory=list)  # (event name, package)

    def __post_init__(self) -> None:
        Waitable.__init__(self)
        owner = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                if self.client_address[0] not in owner.allowed:
                    return
                self.request.settimeout(5)
                received = b""
                while chunk := self.request.recv(4096):
                    self.request.sendall(chunk)  # "Echo all bytes"
                    received += chunk
                owner.analyse(received.decode("ascii", "replace"))

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def analyse(self, package: str) -> None:
        with self.cond:
            self.packages.append(package)
            for name, terms in self.expressions.items():
                if all(term in package for term in terms):
                    self.fired.append((name, package))
            self.cond.notify_all()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# -- Nx Witness / DW Spectrum ---------------------------------------------------------------------------


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()  # noqa: S324 - HTTP digest (RFC 7616 MD5) as Nx uses it


class _NxHandler(_Quiet):
    def do_GET(self) -> None:  # noqa: N802
        self.server.owner.route(self, "GET")  # type: ignore[attr-defined]

    def do_POST(self) -> None:  # noqa: N802
        self.server.owner.route(self, "POST")  # type: ignore[attr-defined]


class NxServer(_Server):
    """Nx Witness mediaserver endpoints for generic events.

    - ``/api/createEvent`` (GET query or POST JSON): HTTP digest auth (realm "VMS", qop=auth); replies
      ``{"error": "0", "errorString": "", "reply": null}`` and an error code in the body when a parameter is
      wrong (metadata not JSON, or none of source/caption/description).
    - ``POST /rest/v4/login/sessions`` ``{"username","password"}`` -> ``{"token": ...}``;
      ``POST /rest/v4/events/generic`` with ``Authorization: Bearer``; 401 for an unknown or expired token.
    """

    handler = _NxHandler
    realm = "VMS"

    def __init__(self, username: str, password: str) -> None:
        super().__init__()
        self.username, self.password = username, password
        self.nonces: set[str] = set()
        self.tokens: set[str] = set()
        self.logins = 0
        self.events: list[dict[str, Any]] = []  # what the rule engine received: api, source, caption, ...

    def expire_sessions(self) -> None:
        with self.cond:
            self.tokens.clear()

    def route(self, h: _Quiet, method: str) -> None:
        path = urlsplit(h.path).path
        body = h.body()
        if path == "/api/createEvent":
            self._legacy(h, method, body)
        elif path == "/rest/v4/login/sessions" and method == "POST":
            self._login(h, body)
        elif path == "/rest/v4/events/generic" and method == "POST":
            self._generic(h, body)
        else:
            h.reply(404, {"error": "4", "errorString": "not found"})

    def _digest_ok(self, h: _Quiet, method: str) -> bool:
        header = h.headers.get("authorization", "")
        if not header.startswith("Digest "):
            return False
        fields = {}
        for part in header[7:].split(","):
            key, _, value = part.strip().partition("=")
            fields[key] = value.strip('"')
        if fields.get("nonce") not in self.nonces or fields.get("username") != self.username:
            return False
        ha1 = _md5(f"{self.username}:{self.realm}:{self.password}")
        ha2 = _md5(f"{method}:{fields.get('uri')}")
        expect = _md5(f"{ha1}:{fields['nonce']}:{fields.get('nc')}:{fields.get('cnonce')}:auth:{ha2}")
        return secrets.compare_digest(expect, fields.get("response", ""))

    def _legacy(self, h: _Quiet, method: str, body: bytes) -> None:
        with self.cond:
            if not self._digest_ok(h, method):
                nonce = secrets.token_hex(16)
                self.nonces.add(nonce)
                h.reply(401, {"error": "401", "errorString": "Unauthorized"}, {
                    "WWW-Authenticate": f'Digest realm="{self.realm}", nonce="{nonce}", algorithm=MD5, qop="auth"'})
                return
            if method == "GET":
                params = {k: v[0] for k, v in parse_qs(urlsplit(h.path).query).items()}
            else:
                params = json.loads(body or b"{}")
            if not any(params.get(k) for k in ("source", "caption", "description")):
                h.reply(200, {"error": "1", "errorString": "Missing required parameter", "reply": None})
                return
            try:
                metadata = json.loads(params.get("metadata") or "{}")
            except ValueError:
                h.reply(200, {"error": "2", "errorString": "Invalid parameter 'metadata'", "reply": None})
                return
            self.events.append({"api": "legacy", **params, "metadata": metadata})
            self.cond.notify_all()
        h.reply(200, {"error": "0", "errorString": "", "reply": None})

    def _login(self, h: _Quiet, body: bytes) -> None:
        creds = json.loads(body or b"{}")
        with self.cond:
            self.logins += 1
            if creds.get("username") != self.username or creds.get("password") != self.password:
                h.reply(401, {"error": "401", "errorId": "unauthorized", "errorString": "Wrong credentials"})
                return
            token = "vms-" + secrets.token_hex(16)
            self.tokens.add(token)
        h.reply(200, {"token": token, "username": self.username, "expiresInS": 2592000})

    def _generic(self, h: _Quiet, body: bytes) -> None:
        auth = h.headers.get("authorization", "")
        with self.cond:
            if not auth.startswith("Bearer ") or auth[7:] not in self.tokens:
                h.reply(401, {"error": "401", "errorId": "unauthorized", "errorString": "Session expired"})
                return
            event = json.loads(body or b"{}")
            if event.get("state", "instant") not in ("instant", "started", "stopped"):
                h.reply(400, {"error": "2", "errorId": "invalidParameter", "errorString": "state"})
                return
            self.events.append({"api": "v4", **event})
            self.cond.notify_all()
        h.reply(200, {})


# -- real VLC -------------------------------------------------------------------------------------------


@dataclass
class Vlc:
    url: str
    password: str

    def playlist(self) -> list[str]:
        """URIs of the playlist items, as VLC's HTTP interface reports them."""
        resp = requests.get(self.url + "/requests/playlist.json", auth=("", self.password), timeout=5)
        resp.raise_for_status()
        uris: list[str] = []

        def walk(node: dict[str, Any]) -> None:
            if "uri" in node:
                uris.append(str(node["uri"]))
            for child in node.get("children", []):
                walk(child)

        walk(resp.json())
        return uris


@contextmanager
def running_vlc(workdir: Path) -> Iterator[Vlc]:
    """Debian's VLC (vlc-bin, vlc-plugin-base) with only its HTTP interface; VLC refuses to run as root, so
    as root it runs as ``nobody``."""
    binary = shutil.which("vlc")
    if binary is None:
        raise AssertionError("VLC is not installed: apt-get install -y vlc-bin vlc-plugin-base")
    password = secrets.token_urlsafe(12)
    port = refused_port()
    cmd = [binary, "-I", "http", "--http-host", "127.0.0.1", "--http-port", str(port),
           "--http-password", password, "--no-video", "--aout", "dummy"]
    home = workdir / "vlc-home"
    home.mkdir()
    if os.geteuid() == 0:
        shutil.chown(home, "nobody")
        cmd = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *cmd]
    proc = subprocess.Popen(cmd, cwd=home, env={"PATH": os.environ.get("PATH", ""), "HOME": str(home)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    vlc = Vlc(f"http://127.0.0.1:{port}", password)
    try:
        deadline = time.monotonic() + 20
        while True:  # wait for the HTTP interface: a condition with a deadline
            try:
                requests.get(vlc.url + "/requests/status.xml", auth=("", password), timeout=1).raise_for_status()
                break
            except requests.RequestException:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"VLC did not start (exit status {proc.poll()})") from None
                time.sleep(0.05)
        yield vlc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- a site for the targets ------------------------------------------------------------------------------

CAMERA_PASSWORD = "cam-S3cret!pw/with@odd"
SITE_YAML = """\
site: {{name: Receivers test site}}
pbx: {{host: 127.0.0.1, sip_port: 5060, transport: udp, ami: {{username: sidecar, secret_file: ami.secret}}}}
queue: {{name: refuge, extension: "7000", ring_timeout: 15, max_wait: 30, overflow: "7001"}}
self_test: {{extension: "7099", interval: 24h}}
desks:
  - {{id: desk-1, name: Operator Desk 1, extension: "2001", secret_file: desk-1.secret, workstation: ws-1}}
posts:
  - id: sutton-market
    name: Sutton Market Place
    extension: "9001"
    location: {{address: "Market Place, Sutton-in-Ashfield", lat: 53.1246, lon: -1.2617}}
    secret_file: sutton-market.secret
    camera: {{rtsp_url: "rtsp://viewer@10.20.5.11:554/stream1", password_file: camera.secret}}
    gpio: {{button: 17, yellow: 22, green: 23, red: 24}}
  - id: bus-station
    name: Bus Station
    extension: "9002"
    location: {{address: "Station Street, Kirkby-in-Ashfield"}}
    secret_file: bus-station.secret
    camera: {{rtsp_url: "rtsp://10.20.5.12/stream1"}}
    gpio: {{button: 17, yellow: 22, green: 23, red: 24}}
cctv:
{cctv}
"""


def make_site(directory: Path, cctv: str = "  []") -> Any:
    """Write and load a two-post site with its secrets (the camera of ``sutton-market`` has a password) in
    ``directory``, made if it is not there yet."""
    from sip_refuge.config.loader import load_site
    from sip_refuge.config.secrets import new_value

    directory.mkdir(parents=True, exist_ok=True)
    values = {"ami": new_value("password"), "desk-1": new_value("password"), "camera": CAMERA_PASSWORD,
              "sutton-market": new_value("password"), "bus-station": new_value("password"),
              "webhook": new_value("webhook"), "nx": "nx-admin-password-1", "vlc": "vlc-http-password-1"}
    for name, value in values.items():
        secret = directory / f"{name}.secret"
        secret.write_text(value + "\n")
        secret.chmod(0o600)
    path = directory / "site.yaml"
    path.write_text(SITE_YAML.format(cctv=cctv))
    return load_site(path)


class _OneRequestPerConnection(_WebhookHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        super().do_POST()
        # Without this a kept-alive connection outlives stop(): its handler thread goes on accepting events.
        self.close_connection = True


class OutageReceiver(WebhookReceiver):
    """The test webhook receiver, whose stop() is a real outage: it keeps no connection open between requests."""

    handler = _OneRequestPerConnection
