"""The real ``sip-refuge sidecar SITE`` from the attacker's side: logins, sessions, CSRF, monitoring, TLS proxy.

The sidecar listens on 127.0.0.1 (the operators' desks and the monitoring are there too); the attacker is at
127.0.0.2. Operators are in the site's users file with the real scrypt parameters. Every post camera is a mount
of the real RTSP test camera. Asterisk is not started (AMI stays unconnected). The TLS test puts Debian's nginx
in front, configured by config/nginx-sip-refuge.conf, and logs in through it with Chromium.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from playwright.sync_api import expect

from sip_refuge.config import Site
from sip_refuge.config.secrets import telemetry_token
from tests.support.browser import Browser
from tests.support.browser import log_in as browser_log_in
from tests.support.nginx import PROXY_ADDRESS, Nginx
from tests.support.operators import add_operator, client, log_in, page_csrf
from tests.support.rtsp_camera import TestCamera
from tests.support.sidecar import Sidecar
from tests.support.sites import sidecar_site
from tests.support.telemetry import report

pytestmark = pytest.mark.integration

ATTACKER = "127.0.0.2"
WAIT_MS = 20_000


@dataclass
class Setup:
    site: Site
    sidecar: Sidecar
    folder: Path
    passwords: dict[str, str]

    @property
    def url(self) -> str:
        return self.sidecar.url

    def audit(self, limit: int = 100) -> list[dict[str, Any]]:
        """Oldest first, read with the bearer token."""
        entries: list[dict[str, Any]] = self.sidecar.json(f"/api/v1/audit?limit={limit}")["entries"]
        return list(reversed(entries))

    def telemetry(self, post_id: str, **body: Any) -> int:
        token = telemetry_token(post_id, self.site.post(post_id).secret.read())
        reply = requests.post(f"{self.url}/api/v1/posts/{post_id}/telemetry", timeout=15,
                              json=report(post_id, **body),
                              headers={"Authorization": f"Bearer {token}"})
        return reply.status_code


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    folder = tmp_path_factory.mktemp("sidecar-access")
    password = "cam-" + secrets.token_hex(8)
    with TestCamera(["sutton-market", "idlewells", "kirkby-bus-station"], user="viewer", password=password) as cam:
        site = sidecar_site(folder, camera=cam, camera_password=password,
                            sidecar={"proxies": [f"{PROXY_ADDRESS}/32"], "camera_interval": "5s"})
        passwords = {"alice": add_operator(site, "alice"), "root": add_operator(site, "root", "admin"),
                     "bob": add_operator(site, "bob")}
        assert site.sidecar is not None
        with Sidecar(site.path, f"http://127.0.0.1:{site.sidecar.port}", log_file=folder / "sidecar.log") as sidecar:
            yield Setup(site, sidecar, folder, passwords)


def test_a_stranger_reads_no_page_camera_stream_export_or_metrics(setup: Setup) -> None:
    """From 127.0.0.2 without a login: pages redirect to /login, cameras, streams, exports and /metrics answer 401."""
    stranger = client(ATTACKER)
    for page in ("/", "/operator?desk=desk-1"):
        reply = stranger.get(setup.url + page, allow_redirects=False, timeout=15)
        assert reply.status_code == 303 and reply.headers["Location"].startswith("/login?next="), page
    refused = ["/cameras/idlewells/thumbnail.jpg", "/cameras/idlewells/live.mjpeg", "/api/v1/events",
               "/api/v1/incidents?format=csv", "/api/v1/incidents", "/api/v1/posts", "/api/v1/posts/idlewells",
               "/api/v1/incidents/x/snapshot.jpg", "/api/v1/audit", "/api/v1/session", "/metrics", "/healthz"]
    for path in refused:
        reply = stranger.get(setup.url + path, timeout=15, stream=True)
        assert reply.status_code == 401, (path, reply.status_code)
        assert reply.json()["error"] == "Unauthorized", path
        reply.close()
    assert stranger.post(setup.url + "/api/v1/posts/idlewells/press", timeout=15).status_code == 401
    login = stranger.get(setup.url + "/login", timeout=15)
    assert login.status_code == 200 and "Sutton" not in login.text  # the login page names no post
    # The sidecar's own host reads /metrics and /healthz without a login; the token reads them from anywhere.
    assert requests.get(setup.url + "/metrics", timeout=15).status_code == 200
    assert requests.get(setup.url + "/healthz", timeout=15).status_code in (200, 503)
    token = {"Authorization": f"Bearer {setup.sidecar.token()}"}
    assert stranger.get(setup.url + "/metrics", headers=token, timeout=15).status_code == 200


def test_a_stolen_cookie_needs_the_csrf_token_to_write_and_dies_with_logout(setup: Setup) -> None:
    """A session cookie used from 127.0.0.2: reads work, a write without CSRF is 403, after logout nothing, streams end."""
    operator = client()
    assert log_in(operator, setup.url, "bob", setup.passwords["bob"]).status_code == 303
    cookie = operator.cookies["refuge_session"]
    thief = client(ATTACKER)
    thief.cookies.set("refuge_session", cookie)
    assert thief.get(setup.url + "/api/v1/posts", timeout=15).status_code == 200
    forged = thief.post(setup.url + "/api/v1/posts/idlewells/press", timeout=15)
    assert forged.status_code == 403 and "CSRF" in forged.json()["detail"]
    # A stream opened with the stolen cookie before the logout.
    stream = thief.get(setup.url + "/api/v1/events", stream=True, timeout=30)
    assert stream.status_code == 200
    ended = threading.Event()

    def read_to_the_end() -> None:
        for _ in stream.iter_content(chunk_size=None):
            pass
        ended.set()

    reader = threading.Thread(target=read_to_the_end, daemon=True)
    reader.start()
    out = operator.post(setup.url + "/logout", data={"csrf": page_csrf(operator, setup.url)}, allow_redirects=False,
                        timeout=15)
    assert out.status_code == 303
    assert thief.get(setup.url + "/api/v1/posts", timeout=15).status_code == 401
    assert thief.get(setup.url + "/", allow_redirects=False, timeout=15).status_code == 303
    assert ended.wait(30), "the stream opened with the session outlived its logout"  # at its next keep-alive
    stream.close()
    entries = [(e["action"], e["outcome"], e["actor"], e["address"]) for e in setup.audit() if e["actor"] == "bob"]
    assert entries[-3:] == [("login", "ok", "bob", "127.0.0.1"), ("write", "refused", "bob", ATTACKER),
                            ("logout", "ok", "bob", "127.0.0.1")]


def test_a_password_guesser_at_127_0_0_2_is_slowed_and_logged_while_the_operator_logs_in(setup: Setup) -> None:
    """Guessing alice's password from 127.0.0.2: after 5 failures 429 with Retry-After, each in the audit log
    and the sidecar's log; alice logs in from her desk meanwhile."""
    guesser = client(ATTACKER)
    answers = [log_in(guesser, setup.url, "alice", f"guess number {n}") for n in range(8)]
    assert [a.status_code for a in answers] == [401] * 6 + [429, 429]
    assert int(answers[-1].headers["Retry-After"]) >= 1
    assert "Too many failed logins" in answers[-1].text
    right = log_in(guesser, setup.url, "alice", setup.passwords["alice"])
    assert right.status_code == 429  # even the right password waits: the guess is not even checked
    desk = client()
    assert log_in(desk, setup.url, "alice", setup.passwords["alice"]).status_code == 303
    entries = [e for e in setup.audit() if e["actor"] == "alice"]
    failed = [e for e in entries if e["outcome"] == "failed"]
    assert len(failed) == 6 and {e["address"] for e in failed} == {ATTACKER}
    assert [e["outcome"] for e in entries][-2:] == ["throttled", "ok"]
    log = setup.sidecar.log()
    assert log.count("audit: login failed by alice from 127.0.0.2 reason=wrong password") == 6
    assert "audit: login throttled by alice from 127.0.0.2" in log
    assert setup.passwords["alice"] not in log and "guess number" not in log  # passwords are never logged


def test_only_an_admin_reads_the_audit_log(setup: Setup) -> None:
    """GET /api/v1/audit: an operator's session 403, an admin's 200 with the logins in it."""
    operator, admin = client(), client()
    log_in(operator, setup.url, "bob", setup.passwords["bob"])
    log_in(admin, setup.url, "root", setup.passwords["root"])
    assert operator.get(setup.url + "/api/v1/audit", timeout=15).status_code == 403
    entries = admin.get(setup.url + "/api/v1/audit?limit=5", timeout=15).json()["entries"]
    assert (entries[0]["action"], entries[0]["actor"], entries[0]["role"]) == ("login", "root", "admin")


def test_tls_proxy_recipe_logs_in_and_streams_through_nginx(setup: Setup, tmp_path: Path) -> None:
    """Chromium logs in through a real nginx (the shipped recipe, TLS): Secure cookie, live dashboard, MJPEG, logout."""
    assert setup.site.sidecar is not None
    with Nginx(tmp_path / "nginx", setup.site.sidecar.port) as nginx, \
            Browser(tmp_path / "chromium", ignore_https_errors=True) as chromium:
        page = chromium.page()
        browser_log_in(page, nginx.url + "/", "alice", setup.passwords["alice"])
        assert page.url == nginx.url + "/"
        expect(page.locator("#link-state")).to_have_attribute("data-state", "open", timeout=WAIT_MS)
        [cookie] = [c for c in chromium.context.cookies() if c["name"] == "refuge_session"]
        assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict"  # X-Forwarded-Proto
        login = [e for e in setup.audit() if e["action"] == "login" and e["actor"] == "alice"][-1]
        assert login["address"] == "127.0.0.1"  # the browser's own, from X-Forwarded-For, not nginx's 127.0.0.9

        # The event stream works through the proxy: a post's report (straight to the sidecar) reaches the page.
        assert setup.telemetry("kirkby-bus-station", state="proxied-and-live") == 202
        expect(page.locator("#post-kirkby-bus-station")).to_contain_text("proxied-and-live", timeout=WAIT_MS)
        page.wait_for_function("() => document.querySelector('#post-idlewells .thumb img').naturalWidth > 0",
                               timeout=WAIT_MS)  # a camera thumbnail through the proxy

        # A live view (multipart MJPEG) comes through unbuffered: two pictures, with the browser's session.
        session = requests.Session()
        session.cookies.set("refuge_session", cookie["value"])
        parts = 0
        with session.get(nginx.url + "/cameras/idlewells/live.mjpeg", stream=True, timeout=30,
                         verify=str(tmp_path / "nginx" / "cert.pem")) as live:  # the test's own certificate
            assert live.status_code == 200 and live.headers["Content-Type"].startswith("multipart/x-mixed-replace")
            for chunk in live.iter_content(chunk_size=None):
                parts += chunk.count(b"\xff\xd8\xff")
                if parts >= 2:
                    break
        assert parts >= 2

        # /metrics through the proxy: the client nginx saw decides, whatever X-Forwarded-For the client sends.
        cert = str(tmp_path / "nginx" / "cert.pem")
        assert requests.get(nginx.url + "/metrics", timeout=15, verify=cert).status_code == 200  # from 127.0.0.1
        forged = client(ATTACKER).get(nginx.url + "/metrics", headers={"X-Forwarded-For": "127.0.0.1"}, timeout=15,
                                      verify=cert)
        assert forged.status_code == 401

        with page.expect_navigation():
            page.click("#logout")
        assert page.url.startswith(nginx.url + "/login")
        page.goto(nginx.url + "/")
        assert "/login" in page.url
        assert chromium.errors == []
