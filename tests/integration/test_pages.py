"""The dashboard and the operator pop-up in a real headless Chromium, against the real sidecar app.

The app is served by the sidecar's own HTTP server (as in production) around a hub built in-process, with a real camera monitor
reading a real RTSP test camera. AMI is the only part played by the test: it feeds the hub the events
Asterisk's queue sends (QueueCallerJoin, AgentCalled, AgentConnect, AgentComplete, ContactStatus)
(tests/support/pages.py).
"""

from __future__ import annotations

import http.client
import json
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from playwright.sync_api import Route, expect

from sip_refuge.config.secrets import telemetry_token
from tests.support.browser import Browser
from tests.support.pages import (
    CAMERA_FRAME_SHOWN,
    OPERATOR,
    SCREENSHOTS,
    TOKEN,
    WAIT_MS,
    PageSidecar,
    answer,
    assert_not_reloaded,
    end_every_call,
    hang_up,
    open_page,
    operator_browser,
    page_sidecar,
    queue_call,
)
from tests.support.telemetry import message, report

pytestmark = pytest.mark.integration

Sidecar = PageSidecar


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    with page_sidecar(tmp_path_factory.mktemp("pages")) as running:
        yield running


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory, sidecar: Sidecar) -> Iterator[Browser]:
    """One Chromium for the module, logged in as the operator once (its pages share the session cookie)."""
    with operator_browser(tmp_path_factory.mktemp("chromium-profile"), sidecar) as chromium:
        yield chromium


@pytest.fixture(autouse=True)
def no_call_left(sidecar: Sidecar) -> Iterator[None]:
    """Each test starts without a live call, even when the one before failed half-way through a call."""
    yield
    end_every_call(sidecar.hub)


# -- tests ------------------------------------------------------------------------------------------------

def test_event_stream_reaches_a_reader_while_the_stream_stays_open(sidecar: Sidecar) -> None:
    """Waitress sends each server-sent event as it happens, not when its buffer fills or the stream ends."""
    connection = http.client.HTTPConnection("127.0.0.1", int(sidecar.url.rsplit(":", 1)[1]), timeout=10)
    try:
        connection.request("GET", "/api/v1/events", headers={"Authorization": f"Bearer {TOKEN}"})
        reply = connection.getresponse()
        assert reply.status == 200 and reply.getheader("Content-Type", "").startswith("text/event-stream")
        assert [reply.readline(), reply.readline()] == [b"retry: 2000\n", b"\n"]
        sidecar.hub.recorder.on_camera_change("kirkby-bus-station", True, "ok")  # as the camera monitor reports it
        # A few hundred bytes would sit in a buffering server until the 15 s keep-alive; the 10 s socket
        # timeout turns that into a failure.
        lines = [reply.readline() for _ in range(4)]
        assert lines[0].startswith(b"id: evt_") and lines[1] == b"event: camera.ok\n"
        assert lines[2].startswith(b"data: {") and lines[3] == b"\n"
    finally:
        connection.close()


def test_dashboard_lists_every_post_and_follows_calls_live(sidecar: Sidecar, browser: Browser) -> None:
    """The dashboard shows every post, then follows a call, a self-test and a camera fault without a reload."""
    hub = sidecar.hub
    for post in hub.site.posts:
        hub.recorder.on_ami_event({"Event": "ContactStatus", "AOR": post.id, "ContactStatus": "Reachable"})
    page = open_page(browser, sidecar.url + "/")
    cards = page.locator("#posts > li")
    expect(cards).to_have_count(len(hub.site.posts))
    for post in hub.site.posts:
        card = page.locator(f"#post-{post.id}")
        expect(card.locator("h3")).to_have_text(post.name)
        expect(card).to_contain_text("Online")
        expect(card).to_contain_text("OK")  # the camera probe of the fixture
        page.wait_for_function("id => document.querySelector(`#post-${id} .thumb img`).naturalWidth > 0",
                               arg=post.id, timeout=WAIT_MS)
    expect(page.locator("#calls")).to_contain_text("No calls in progress")

    uid = queue_call(hub, "idlewells")
    expect(page.locator("#calls li.queued")).to_contain_text("Idlewells Shopping Centre", timeout=WAIT_MS)
    expect(page.locator("#post-idlewells")).to_have_class(re.compile(r"\bcalling\b"))
    expect(page.locator("#incidents tr").first).to_contain_text("Waiting")

    answer(hub, uid, "desk-1")
    expect(page.locator("#calls li.answered")).to_contain_text("answered by Operator Desk 1", timeout=WAIT_MS)
    expect(page.locator("#post-idlewells")).to_contain_text("Answered by Operator Desk 1")

    hang_up(hub, uid)
    expect(page.locator("#calls li.none")).to_have_text("No calls in progress", timeout=WAIT_MS)
    row = page.locator("#incidents tr").first
    expect(row).to_contain_text("Ended")
    expect(row).to_contain_text("Operator Desk 1")
    row.locator("summary").click()
    expect(row.locator(".timeline li")).to_contain_text(
        ["Queued", "Rang: Operator Desk 1", "Rang: Operator Desk 2", "Answered by: Operator Desk 1", "Ended"])

    # Post telemetry and camera probes reach the page the same way.
    hub.recorder.on_telemetry("sutton-market", message("sutton-market", "selftest",
                                              last_self_test={"at": datetime.now(UTC).isoformat(), "passed": True,
                                                              "detail": "echo heard"}))
    expect(page.locator("#post-sutton-market")).to_contain_text("Passed", timeout=WAIT_MS)
    sidecar.camera.set_mode("kirkby-bus-station", "black")
    try:
        sidecar.monitor.probe("kirkby-bus-station")
        expect(page.locator("#post-kirkby-bus-station")).to_contain_text("Fault: black", timeout=WAIT_MS)
        expect(page.locator("#post-kirkby-bus-station")).to_have_class(re.compile(r"\bfault\b"))

        # A call waiting, for the picture in the docs: amber beside red and green.
        second = queue_call(hub, "sutton-market")
        expect(page.locator("#calls li.queued")).to_contain_text("Sutton Market Place", timeout=WAIT_MS)
        row.locator("summary").click()  # closed again, so the picture shows the table as it first appears
        # Thumbnails are fetched again on a camera event: the picture shows the black one once all have loaded.
        page.wait_for_function("() => [...document.querySelectorAll('.thumb img')].every("
                               "i => i.src.includes('?t=') && i.complete && i.naturalWidth > 0)", timeout=WAIT_MS)
        page.evaluate("window.scrollTo(0, 0)")
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=SCREENSHOTS / "dashboard.png")
        hang_up(hub, second)
        expect(page.locator("#calls li.none")).to_be_visible(timeout=WAIT_MS)
    finally:
        sidecar.camera.set_mode("kirkby-bus-station", "normal")
    sidecar.monitor.probe("kirkby-bus-station")
    expect(page.locator("#post-kirkby-bus-station")).not_to_have_class(re.compile("fault"), timeout=WAIT_MS)
    assert_not_reloaded(page)
    assert sidecar.camera_password not in page.content()
    assert browser.errors == []
    page.close()


def test_operator_page_pops_up_the_callers_camera_within_two_seconds(sidecar: Sidecar, browser: Browser) -> None:
    """The operator page shows the calling post and a live camera frame within 2 s of call.queued, no reload."""
    hub = sidecar.hub
    here = open_page(browser, sidecar.url + "/operator?desk=desk-1")
    other = open_page(browser, sidecar.url + "/operator?desk=desk-2")
    for page in (here, other):
        expect(page.locator("#banner")).to_have_text("Waiting for calls")
        expect(page.locator("#banner")).to_have_attribute("data-state", "idle")

    published = time.monotonic()
    uid = queue_call(hub, "sutton-market")
    here.wait_for_function(CAMERA_FRAME_SHOWN, polling=20, timeout=WAIT_MS)
    shown_after = time.monotonic() - published

    for page in (here, other):
        banner = page.locator("#banner")
        expect(banner).to_have_attribute("data-state", "queued")
        expect(banner).to_have_text("Refuge call from Sutton Market Place: ringing, answer your phone")
        expect(page.locator("#post-name")).to_have_text("Sutton Market Place")
        expect(page.locator("#post-address")).to_have_text("Market Place, Sutton-in-Ashfield")
        expect(page.locator("#post-coords")).to_contain_text("53.12460, -1.26170")
        expect(page.locator("#call-state")).to_have_text("Ringing the desks")
        expect(page.locator("#camera")).to_have_attribute("src", re.compile(r"^/cameras/sutton-market/live\.mjpeg"))
    # The camera password reaches CCTV targets only, never a page.
    assert sidecar.camera_password not in here.content()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    here.screenshot(path=SCREENSHOTS / "operator.png")
    assert shown_after < 2.0, f"the camera took {shown_after:.2f} s to show"  # checked after the picture for docs

    answer(hub, uid, "desk-1")
    expect(here.locator("#banner")).to_have_attribute("data-state", "answered-here", timeout=WAIT_MS)
    expect(here.locator("#call-state")).to_have_text("Answered by Operator Desk 1 (this desk)")
    expect(other.locator("#banner")).to_have_attribute("data-state", "answered", timeout=WAIT_MS)
    expect(other.locator("#banner")).to_have_text("Operator Desk 1 answered the call from Sutton Market Place")

    hang_up(hub, uid)
    for page in (here, other):
        expect(page.locator("#banner")).to_have_attribute("data-state", "ended", timeout=WAIT_MS)
        expect(page.locator("#post-name")).to_have_text("Sutton Market Place")  # the last call stays a moment
    for page in (here, other):
        expect(page.locator("#banner")).to_have_text("Waiting for calls", timeout=WAIT_MS)
        expect(page.locator("#call-view")).to_be_hidden()
        assert page.evaluate("document.getElementById('camera').hasAttribute('src')") is False
        assert_not_reloaded(page)
        page.close()
    assert browser.errors == []


def test_operator_page_opened_during_a_call_shows_it(sidecar: Sidecar, browser: Browser) -> None:
    """An operator page (re)opened while a call is live catches up from the API and shows that call."""
    hub = sidecar.hub
    uid = queue_call(hub, "idlewells")
    answer(hub, uid, "desk-2")
    page = open_page(browser, sidecar.url + "/operator?desk=desk-2")
    try:
        expect(page.locator("#banner")).to_have_attribute("data-state", "answered-here", timeout=WAIT_MS)
        expect(page.locator("#post-name")).to_have_text("Idlewells Shopping Centre")
        expect(page.locator("#call-state")).to_have_text("Answered by Operator Desk 2 (this desk)")
        expect(page.locator("#post-extension")).to_have_text("dial 9002")
    finally:
        hang_up(hub, uid)
    expect(page.locator("#banner")).to_have_attribute("data-state", "ended", timeout=WAIT_MS)
    page.close()
    assert browser.errors == []


def test_operator_page_for_an_unknown_desk_is_a_404(sidecar: Sidecar) -> None:
    """An operator page for a desk the site does not have answers 404, not an empty page."""
    connection = http.client.HTTPConnection("127.0.0.1", int(sidecar.url.rsplit(":", 1)[1]), timeout=10)
    try:
        connection.request("GET", "/operator?desk=nobody", headers={"Authorization": f"Bearer {TOKEN}"})
        assert connection.getresponse().status == 404
    finally:
        connection.close()


# -- hostile telemetry (issue 8, finding 10) -------------------------------------------------------------

def hostile_reports(post_id: str) -> list[bytes]:
    """What one post's token could send: every one broke a page or the JSON API before telemetry was typed."""
    duration = json.dumps(report(post_id, "call", duration=1.5))
    return [json.dumps(body).encode() for body in (
        report(post_id, faults=5), report(post_id, faults="abc"), report(post_id, faults=[3, None]),
        report(post_id, registered="yes"), report(post_id, last_self_test={"at": "junk", "passed": "x"}),
        report(post_id, state="<img src=x onerror=alert(1)>"), report(post_id, reason="x" * 10_000),
        report(post_id, kind="heartbeat"))] + [
        duration.replace("1.5", "NaN").encode(), duration.replace("1.5", "Infinity").encode(),
        b"[" * 30_000 + b"]" * 30_000, b'{"a":' * 10_000 + b"1" + b"}" * 10_000]


def tamper_with(field_values: dict[str, Any], post_id: str) -> Any:
    """A route handler that hands dashboard.js and operator.js a /api/v1/posts whose ``post_id`` has
    ``field_values``: what an earlier sidecar, which passed telemetry through unchecked, served."""

    def handle(route: Route) -> None:
        body = route.fetch().json()
        for post in body["posts"]:
            if post["id"] == post_id:
                post.update(field_values)
        body["posts"].append(None)  # and a post that is not even an object
        route.fulfill(json=body)

    return handle


HOSTILE_VIEW = {"faults": "abc", "registered": "yes", "last_self_test": "junk", "camera": 5, "location": None,
                "state": {"not": "text"}, "call": [], "mock_gpio": "yes", "online": "maybe"}


def test_hostile_telemetry_from_one_post_never_breaks_the_pages(sidecar: Sidecar, browser: Browser) -> None:
    """One post's hostile reports are refused (4xx), and even a hostile API answer leaves every post on the pages."""
    hub = sidecar.hub
    port = int(sidecar.url.rsplit(":", 1)[1])
    token = telemetry_token("idlewells", hub.site.post("idlewells").secret.read())
    for body in hostile_reports("idlewells"):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            connection.request("POST", "/api/v1/posts/idlewells/telemetry", body=body,
                               headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
            reply = connection.getresponse()
            answer = json.loads(reply.read())
        finally:
            connection.close()
        assert reply.status in (400, 413, 422), (reply.status, answer)
        assert set(answer) == {"error", "detail"}

    page = browser.page()
    page.route("**/api/v1/posts", tamper_with(HOSTILE_VIEW, "idlewells"))
    page.goto(sidecar.url + "/")
    expect(page.locator("#link-state")).to_have_attribute("data-state", "open", timeout=WAIT_MS)
    page.wait_for_function("() => document.querySelector('#post-idlewells .post-info').dataset.html !== undefined",
                           timeout=WAIT_MS)  # dashboard.js rendered the tampered answer
    expect(page.locator("#posts > li")).to_have_count(len(hub.site.posts))
    for post in hub.site.posts:
        expect(page.locator(f"#post-{post.id} h3")).to_have_text(post.name)
    idlewells = page.locator("#post-idlewells")
    expect(idlewells).to_contain_text("Self-test")
    expect(idlewells).not_to_contain_text("abc")  # a fault list that is not a list shows no faults
    expect(idlewells.locator("button.press")).to_have_count(0)  # "yes" is not true

    # The page keeps following the other posts: a good report from one of them still shows.
    hub.recorder.on_telemetry("kirkby-bus-station", message("kirkby-bus-station", "fault", faults=["tamper"]))
    expect(page.locator("#post-kirkby-bus-station")).to_contain_text("tamper", timeout=WAIT_MS)
    page.close()

    # The operator page reads the same answer when it catches up with a call already live.
    uid = queue_call(hub, "idlewells")
    operator = browser.page()
    operator.route("**/api/v1/posts", tamper_with({**HOSTILE_VIEW, "extension": 5}, "idlewells"))
    operator.goto(sidecar.url + "/operator?desk=desk-1")
    try:
        expect(operator.locator("#banner")).to_have_attribute("data-state", "queued", timeout=WAIT_MS)
        expect(operator.locator("#post-name")).to_have_text("Idlewells Shopping Centre")
        expect(operator.locator("#post-extension")).to_have_text("—")
    finally:
        hang_up(hub, uid)
    expect(operator.locator("#banner")).to_have_attribute("data-state", "ended", timeout=WAIT_MS)
    operator.close()
    assert browser.errors == []


# -- operators' login (issue 11, access) ---------------------------------------------------------------------

def test_an_operator_logs_in_follows_a_call_live_presses_and_logs_out(sidecar: Sidecar, browser: Browser,
                                                                        tmp_path: Path) -> None:
    """Chromium: the pages ask for a login; logged in they follow a call live and press with the session; logout ends it."""
    hub = sidecar.hub
    with Browser(tmp_path / "chromium", beside=browser) as chromium:  # not logged in: a profile of its own
        operator = chromium.page()
        operator.goto(sidecar.url + "/operator?desk=desk-1")
        assert urlsplit(operator.url).path == "/login", operator.url
        assert parse_qs(urlsplit(operator.url).query)["next"] == ["/operator?desk=desk-1"]
        operator.screenshot(path=SCREENSHOTS / "login.png")
        operator.fill("#name", OPERATOR)
        operator.fill("#password", "not the password")
        operator.click("#login")
        expect(operator.locator("#login-message")).to_have_text("Wrong name or password.", timeout=WAIT_MS)
        operator.fill("#password", sidecar.password)
        with operator.expect_navigation():
            operator.click("#login")
        assert operator.url == sidecar.url + "/operator?desk=desk-1"
        expect(operator.locator("#link-state")).to_have_attribute("data-state", "open", timeout=WAIT_MS)
        [cookie] = [c for c in chromium.context.cookies() if c["name"] == "refuge_session"]
        assert (cookie["httpOnly"], cookie["sameSite"], cookie["secure"]) == (True, "Strict", False)  # plain http

        dashboard = chromium.page()  # the same browser: no second login
        dashboard.goto(sidecar.url + "/")
        expect(dashboard.locator("#session-user")).to_have_text(OPERATOR)
        expect(dashboard.locator("#link-state")).to_have_attribute("data-state", "open", timeout=WAIT_MS)
        uid = queue_call(hub, "kirkby-bus-station")
        try:
            expect(operator.locator("#banner")).to_have_attribute("data-state", "queued", timeout=WAIT_MS)
            expect(operator.locator("#post-name")).to_have_text("Kirkby Bus Station")
            expect(dashboard.locator("#calls li.queued")).to_contain_text("Kirkby Bus Station", timeout=WAIT_MS)
        finally:
            hang_up(hub, uid)
        expect(dashboard.locator("#calls li.none")).to_be_visible(timeout=WAIT_MS)

        # The press button of a mock post sends the session's CSRF token: the write gets through the guard to
        # the post agent (none runs here: 503), where a write without it gets 403.
        hub.recorder.on_telemetry("idlewells", message("idlewells", mock_gpio=True))
        press = dashboard.locator("#post-idlewells button.press")
        expect(press).to_be_visible(timeout=WAIT_MS)
        press.click()
        expect(dashboard.locator("#press-notice")).to_have_text("Press failed: HTTP 503.", timeout=WAIT_MS)
        [pressed] = [e for e in sidecar.access.audit.entries(20) if e["action"] == "press"]
        assert (pressed["actor"], pressed["target"], pressed["outcome"]) == (OPERATOR, "idlewells", "503")

        with dashboard.expect_navigation():
            dashboard.click("#logout")
        assert dashboard.url.startswith(sidecar.url + "/login")
        # The other tab's event stream ends with the session (at its next keep-alive, within 15 s), and the page
        # goes to the login.
        expect(operator).to_have_url(re.compile(r"/login\?next="), timeout=40_000)
        dashboard.goto(sidecar.url + "/")
        assert "/login" in dashboard.url
        stolen = requests.get(sidecar.url + "/api/v1/posts", cookies={"refuge_session": cookie["value"]}, timeout=10)
        assert stolen.status_code == 401
        hub.recorder.on_telemetry("idlewells", message("idlewells"))
        actions = [(e["action"], e["outcome"]) for e in reversed(sidecar.access.audit.entries(20))
                   if e["actor"] == OPERATOR]
        assert actions[-4:] == [("login", "failed"), ("login", "ok"), ("press", "503"), ("logout", "ok")]
        # The only console errors are the answers this test asked for: the wrong password (401), the press with
        # no agent (503), and the closed tab's stream and session check after the logout (401).
        expected = re.compile(r"status of (401 \(UNAUTHORIZED\) \(\S+/(login|api/v1/events|api/v1/session)\)"
                              r"|503 \(SERVICE UNAVAILABLE\) \(\S+/api/v1/posts/idlewells/press\))$")
        assert [e for e in chromium.errors if not expected.search(e)] == []
