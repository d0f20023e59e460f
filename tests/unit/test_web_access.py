"""The guard, login, sessions, CSRF and the audit log through Flask's test client, from the attacker's address.

Operators' hashes here use cheap scrypt parameters (each hash carries its own); the real ones are in
test_access.py and the integration tests.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from sip_refuge.config import Site, load_site
from sip_refuge.config.passwords import Params, hash_password
from sip_refuge.config.secrets import snapshot_key
from sip_refuge.config.users import remove_user, set_user
from sip_refuge.sidecar.access import Access, AuditLog, LoginThrottle, Operators, Sessions, networks
from sip_refuge.sidecar.core import Hub
from sip_refuge.sidecar.outbox import Outbox
from sip_refuge.sidecar.store import Store
from sip_refuge.sidecar.web import create_app
from tests.support.clock import Clock
from tests.support.sites import example_copy

TOKEN = "t0ken-for-the-access-tests-0123456789"
FAST = Params(log2_n=10, r=8, p=1)
ATTACKER = "127.0.0.2"
PROXY = "127.0.0.9"
PASSWORDS = {"alice": "alice's long password", "root": "the admin's long password"}
CSRF_FIELD = re.compile(r'name="csrf" value="([^"]+)"')


@pytest.fixture()
def site(tmp_path: Path) -> Site:
    path = example_copy(tmp_path)
    users = tmp_path / "secrets" / "sidecar.users"
    set_user(users, "alice", "operator", hash_password(PASSWORDS["alice"], FAST))
    set_user(users, "root", "admin", hash_password(PASSWORDS["root"], FAST))
    return load_site(path)


@pytest.fixture()
def clock() -> Clock:
    return Clock(5000.0)


@pytest.fixture()
def app(site: Site, clock: Clock) -> Iterator[Flask]:
    store = Store(":memory:")
    hub = Hub(site, store, Outbox(store, []), base_url="http://127.0.0.1:8080")
    assert site.sidecar is not None
    access = Access(TOKEN, AuditLog(store), Operators(site.sidecar.users_file, clock), Sessions(600, 3600, clock),
                    LoginThrottle(clock), networks(("127.0.0.1/32", "::1/128", "10.1.0.0/16")),
                    networks((f"{PROXY}/32",)))
    yield create_app(hub, token=TOKEN, access=access)
    store.close()


def client(app: Flask, address: str = "127.0.0.1") -> FlaskClient:
    browser = app.test_client()
    browser.environ_base["REMOTE_ADDR"] = address
    return browser


def log_in(browser: FlaskClient, name: str, password: str, **form: str) -> TestResponse:
    page = browser.get("/login")
    found = CSRF_FIELD.search(page.get_data(as_text=True))
    assert found is not None
    return browser.post("/login", data={"name": name, "password": password, "csrf": found.group(1), **form})


def csrf_of(browser: FlaskClient) -> str:
    return str(browser.get("/api/v1/session").get_json()["csrf"])


def audit(app: Flask) -> list[dict[str, Any]]:
    access: Access = app.extensions["refuge"]["access"]
    return list(reversed(access.audit.entries(100)))


# -- nothing without a login --------------------------------------------------------------------------------

ARGUMENTS = {"post_id": "idlewells", "incident_id": "x", "filename": "refuge.css"}
# Who may call what without a login or the token: the login page, static files, and a post with its own token.
OPEN = {"auth.login_page", "auth.login", "auth.logout", "static", "api.telemetry"}


def test_every_route_but_login_and_static_refuses_a_stranger(app: Flask) -> None:
    """Every route the app has (one added later too), every method: a stranger gets a redirect to the login or 401."""
    stranger = client(app, ATTACKER)
    checked = set()
    for rule in app.url_map.iter_rules():
        built = rule.build(ARGUMENTS) if rule.arguments else ("", rule.rule)
        assert built is not None, rule.rule
        url = built[1]
        for method in sorted((rule.methods or set()) - {"OPTIONS"}):
            reply = stranger.open(url, method=method)
            reply.close()  # a static file's answer holds the file open
            checked.add(rule.endpoint)
            if rule.endpoint in OPEN:
                continue
            if rule.endpoint.startswith("pages.") and rule.endpoint not in ("pages.thumbnail", "pages.live",
                                                                            "pages.plan_image"):
                assert reply.status_code == 303 and reply.location.startswith("/login?next="), (url, method)
            else:
                assert reply.status_code == 401, (url, method, reply.status_code)
                assert "Bearer" in reply.headers["WWW-Authenticate"]
                if method != "HEAD":
                    assert reply.get_json()["error"] == "Unauthorized"
    assert {"pages.dashboard", "pages.operator", "pages.live", "pages.thumbnail", "stream.events", "api.incidents",
            "api.snapshot", "api.press", "api.acknowledge", "api.close", "pages.plan_image", "auth.audit",
            "health.metrics", "health.healthz"} <= checked
    # An export, and a path that does not exist, say nothing either.
    assert stranger.get("/api/v1/incidents?format=csv").status_code == 401
    assert stranger.get("/nothing/here").status_code == 401
    with stranger.get("/static/refuge.css") as css:
        assert css.status_code == 200


def test_a_wrong_bearer_token_is_refused_and_the_right_one_reads_and_writes(app: Flask) -> None:
    automation = client(app, ATTACKER)
    assert automation.get("/api/v1/posts", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert automation.get("/api/v1/posts", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert automation.get("/api/v1/incidents?format=csv", headers=auth).status_code == 200
    assert automation.get("/api/v1/audit", headers=auth).status_code == 200
    assert automation.post("/api/v1/posts/idlewells/press", headers=auth).status_code == 503  # no agent, no CSRF asked
    assert [(e["action"], e["actor"], e["outcome"]) for e in audit(app)] == [("press", "token", "503")]


# -- login, cookies, logout -------------------------------------------------------------------------------------

def test_login_sets_a_strict_httponly_session_cookie_and_goes_where_asked(app: Flask) -> None:
    browser = client(app)
    reply = log_in(browser, "alice", PASSWORDS["alice"], next="/operator?desk=desk-1")
    assert reply.status_code == 303 and reply.location == "/operator?desk=desk-1"
    cookie = next(h for h in reply.headers.getlist("Set-Cookie") if h.startswith("refuge_session="))
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie and "Secure" not in cookie
    page = browser.get("/")
    assert page.status_code == 200 and page.headers["Cache-Control"] == "no-store"
    text = page.get_data(as_text=True)
    assert f'<meta name="csrf-token" content="{csrf_of(browser)}">' in text and 'id="session-user">alice<' in text
    assert browser.get("/api/v1/session").get_json()["role"] == "operator"
    assert [(e["action"], e["outcome"], e["actor"], e["address"]) for e in audit(app)] == [
        ("login", "ok", "alice", "127.0.0.1")]


@pytest.mark.parametrize("target", ["//evil.example/x", "https://evil.example/", "/\\evil.example", "/\t/evil"])
def test_login_never_redirects_off_the_sidecar(app: Flask, target: str) -> None:
    assert log_in(client(app), "alice", PASSWORDS["alice"], next=target).location == "/"


def test_behind_a_named_proxy_over_https_the_cookie_is_secure_and_the_real_address_is_logged(app: Flask) -> None:
    proxied = client(app, PROXY)
    headers = {"X-Forwarded-For": "198.51.100.7, 203.0.113.9", "X-Forwarded-Proto": "https"}
    page = proxied.get("/login", headers=headers)
    token = CSRF_FIELD.search(page.get_data(as_text=True))
    assert token is not None and "Secure" in page.headers["Set-Cookie"]
    reply = proxied.post("/login", headers=headers, data={"name": "alice", "password": PASSWORDS["alice"],
                                                          "csrf": token.group(1)})
    assert "Secure" in next(h for h in reply.headers.getlist("Set-Cookie") if h.startswith("refuge_session="))
    assert audit(app)[-1]["address"] == "203.0.113.9"  # the one the proxy saw, not what the client claimed
    # The same headers from anyone else are ignored: no Secure cookie, the connection's own address.
    direct = client(app, ATTACKER)
    page = direct.get("/login", headers=headers)
    assert "Secure" not in page.headers["Set-Cookie"]
    token = CSRF_FIELD.search(page.get_data(as_text=True))
    assert token is not None
    direct.post("/login", headers=headers, data={"name": "alice", "password": "wrong", "csrf": token.group(1)})
    assert audit(app)[-1]["address"] == ATTACKER


def test_a_login_form_posted_from_elsewhere_is_refused(app: Flask) -> None:
    """Login CSRF: the form's token must match its cookie, which another site's page cannot have."""
    reply = client(app).post("/login", data={"name": "alice", "password": PASSWORDS["alice"], "csrf": "guess"})
    assert reply.status_code == 400 and "out of date" in reply.get_data(as_text=True)
    assert "refuge_session" not in str(reply.headers.getlist("Set-Cookie"))


def test_after_logout_the_old_cookie_opens_nothing(app: Flask) -> None:
    browser = client(app)
    log_in(browser, "alice", PASSWORDS["alice"])
    cookie = browser.get_cookie("refuge_session")
    assert cookie is not None
    assert browser.post("/logout", data={"csrf": "wrong"}).status_code == 403  # logout needs the token too
    reply = browser.post("/logout", data={"csrf": csrf_of(browser)})
    assert reply.status_code == 303 and reply.location == "/login"
    thief = client(app, ATTACKER)
    thief.set_cookie("refuge_session", cookie.value)
    assert thief.get("/api/v1/posts").status_code == 401
    assert thief.get("/").status_code == 303
    assert [(e["action"], e["outcome"]) for e in audit(app)] == [("login", "ok"), ("logout", "ok")]


def test_sessions_end_when_idle_at_their_lifetime_and_when_the_user_changes(app: Flask, clock: Clock,
                                                                             site: Site) -> None:
    assert site.sidecar is not None and site.sidecar.users_file is not None
    browser = client(app)
    log_in(browser, "alice", PASSWORDS["alice"])
    clock.now += 599
    assert browser.get("/api/v1/posts").status_code == 200
    clock.now += 601  # idle 600 s
    assert browser.get("/api/v1/posts").status_code == 401
    log_in(browser, "alice", PASSWORDS["alice"])
    for _ in range(7):
        clock.now += 500
        assert browser.get("/api/v1/session").status_code == 200
    clock.now += 500
    assert browser.get("/api/v1/posts").status_code == 401  # in use all along, but the lifetime is 3,600 s
    log_in(browser, "alice", PASSWORDS["alice"])
    set_user(site.sidecar.users_file, "alice", "operator", hash_password("a brand new password", FAST))
    clock.now += 2  # the users file is looked at again at most once a second
    assert browser.get("/api/v1/posts").status_code == 401  # a new password ends the old sessions
    assert audit(app)[-1]["action"] == "logout" and audit(app)[-1]["outcome"] == "ended"
    log_in(browser, "alice", "a brand new password")
    remove_user(site.sidecar.users_file, "alice")
    clock.now += 2
    assert browser.get("/api/v1/posts").status_code == 401
    assert log_in(browser, "alice", "a brand new password").status_code == 401


# -- CSRF on writes -----------------------------------------------------------------------------------------------

def test_a_write_with_the_session_cookie_but_without_its_csrf_token_is_refused_and_audited(app: Flask) -> None:
    browser = client(app)
    log_in(browser, "alice", PASSWORDS["alice"])
    press = "/api/v1/posts/idlewells/press"
    refused = browser.post(press)
    assert refused.status_code == 403 and "CSRF token is missing or wrong" in refused.get_json()["detail"]
    assert browser.post(press, headers={"X-CSRF-Token": "guess"}).status_code == 403
    other = browser.post(press, headers={"X-CSRF-Token": csrf_of(browser), "Origin": "https://evil.example"})
    assert other.status_code == 403 and "comes from https://evil.example" in other.get_json()["detail"]
    done = browser.post(press, headers={"X-CSRF-Token": csrf_of(browser), "Origin": "http://localhost"})
    assert done.status_code == 503  # through the guard: only the missing post agent stops it
    assert [(e["action"], e["outcome"]) for e in audit(app)] == [
        ("login", "ok"), ("write", "refused"), ("write", "refused"), ("write", "refused"), ("press", "503")]
    assert audit(app)[-1]["target"] == "idlewells" and audit(app)[-1]["actor"] == "alice"


# -- roles and the audit log ----------------------------------------------------------------------------------------

def test_only_an_admin_or_the_token_reads_the_audit_log(app: Flask) -> None:
    operator, admin = client(app), client(app, "127.0.0.5")
    log_in(operator, "alice", PASSWORDS["alice"])
    log_in(admin, "root", PASSWORDS["root"])
    assert operator.get("/api/v1/audit").status_code == 403
    entries = admin.get("/api/v1/audit?limit=1").get_json()["entries"]
    assert [(e["action"], e["actor"], e["role"], e["address"]) for e in entries] == [
        ("login", "root", "admin", "127.0.0.5")]
    older = admin.get(f"/api/v1/audit?before={entries[0]['seq']}").get_json()["entries"]
    assert [e["actor"] for e in older] == ["alice"]
    assert admin.get("/api/v1/audit?limit=0").status_code == 400
    assert admin.get("/api/v1/audit?before=abc").status_code == 400


# -- password guessing ----------------------------------------------------------------------------------------------

def test_a_guesser_is_slowed_and_logged_once_per_wait_while_the_operator_gets_in(app: Flask, clock: Clock) -> None:
    guesser = client(app, ATTACKER)
    answers = [log_in(guesser, "alice", f"guess {n}").status_code for n in range(8)]
    assert answers == [401] * 5 + [401, 429, 429]  # five free, then one more after a wait of 1 s
    slowed = log_in(guesser, "alice", PASSWORDS["alice"])
    assert slowed.status_code == 429 and slowed.headers["Retry-After"] == "1"  # not even the right one, now
    clock.now += 2
    assert log_in(guesser, "alice", "guess 9").status_code == 401
    outcomes = [(e["outcome"], e["address"]) for e in audit(app)]
    # One entry for the wait (not one per refused attempt: a flood of them must not flood the log).
    assert outcomes == [("failed", ATTACKER)] * 6 + [("throttled", ATTACKER)] + [("failed", ATTACKER)]
    assert audit(app)[0]["detail"]["reason"] == "wrong password"
    # Meanwhile alice logs in from her own desk.
    assert log_in(client(app), "alice", PASSWORDS["alice"]).status_code == 303
    # Monitoring sees the guessing without reading the audit log.
    metrics = client(app).get("/metrics").get_data(as_text=True)
    assert 'refuge_audit_entries_total{action="login",outcome="failed"} 7.0' in metrics
    assert 'refuge_audit_entries_total{action="login",outcome="throttled"} 1.0' in metrics
    assert 'refuge_audit_entries_total{action="login",outcome="ok"} 1.0' in metrics


def test_an_unknown_name_fails_like_a_wrong_password(app: Flask) -> None:
    reply = log_in(client(app, ATTACKER), "mallory", "any password at all")
    assert reply.status_code == 401 and "Wrong name or password." in reply.get_data(as_text=True)
    assert audit(app)[-1]["detail"]["reason"] == "unknown user" and audit(app)[-1]["actor"] == "mallory"


# -- monitoring and keyed snapshots ------------------------------------------------------------------------------

def test_metrics_and_healthz_are_open_to_monitoring_networks_only(app: Flask) -> None:
    for address, expected in (("127.0.0.1", 200), ("10.1.2.3", 200), (ATTACKER, 401), ("10.2.0.1", 401)):
        assert client(app, address).get("/metrics").status_code == expected, address
        assert client(app, address).get("/healthz").status_code in ((200, 503) if expected == 200 else (401,))
    # Forwarded by a proxy the site does not name: never taken for the sidecar's own host.
    assert client(app).get("/metrics", headers={"X-Forwarded-For": "127.0.0.1"}).status_code == 401
    # Through the named proxy, the real client decides.
    assert client(app, PROXY).get("/metrics", headers={"X-Forwarded-For": "10.1.0.7"}).status_code == 200
    assert client(app, PROXY).get("/metrics", headers={"X-Forwarded-For": "203.0.113.9"}).status_code == 401
    # Anywhere, with the token (a Prometheus with a bearer token).
    assert client(app, ATTACKER).get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_an_incidents_snapshot_opens_with_its_key_only(app: Flask, site: Site) -> None:
    assert site.sidecar is not None
    key = snapshot_key(site.sidecar.token.read(), "inc-1")
    stranger = client(app, ATTACKER)
    assert stranger.get(f"/api/v1/incidents/inc-1/snapshot.jpg?key={key}").status_code == 404  # in: no picture yet
    assert stranger.get(f"/api/v1/incidents/inc-2/snapshot.jpg?key={key}").status_code == 401  # another incident's
    assert stranger.get("/api/v1/incidents/inc-1/snapshot.jpg?key=").status_code == 401
    assert stranger.get("/api/v1/incidents/inc-1").status_code == 401  # the key opens the picture, nothing else


def test_a_line_break_in_a_name_or_path_cannot_forge_a_log_line(app: Flask, caplog: pytest.LogCaptureFixture) -> None:
    log_in(client(app, ATTACKER), "x\nINFO audit: login ok by root", "any password at all")
    browser = client(app)
    log_in(browser, "alice", PASSWORDS["alice"])
    browser.post("/api/v1/posts/idle%0Awells/press", headers={"X-CSRF-Token": csrf_of(browser)})
    lines = [r.getMessage() for r in caplog.records if r.name == "sip_refuge.audit"]
    assert all("\n" not in line for line in lines), lines
    assert audit(app)[0]["actor"] == "x\\ninfo audit: login ok by root"  # names are lowercased
    assert audit(app)[-1]["target"] == "idle\\nwells"
