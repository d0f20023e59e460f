"""The record on the pages, close-out and the site plan, in a real headless Chromium against the real sidecar app.

As in test_pages.py the sidecar app runs in-process behind its own HTTP server with a real camera monitor on a
real RTSP test camera, and AMI is played by the test (tests/support/pages.py). The site has a site plan
picture with a coloured dot where each post stands.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import requests
from playwright.sync_api import Page, expect

from tests.support.browser import Browser
from tests.support.pages import (
    OPERATOR,
    PLAN_DOTS,
    SCREENSHOTS,
    WAIT_MS,
    PageSidecar,
    answer,
    assert_not_reloaded,
    end_every_call,
    hang_up,
    incident_of,
    open_page,
    operator_browser,
    overflow,
    page_sidecar,
    queue_call,
)
from tests.support.waiting import wait_for as wait_until

pytestmark = pytest.mark.integration

LONDON = ZoneInfo("Europe/London")  # the browser's time zone (tests/support/browser.py)
# The state colours of refuge.css, as Chromium computes them.
GREEN, AMBER, BLUE, RED, GREY = ("rgb(48, 164, 108)", "rgb(255, 178, 36)", "rgb(91, 156, 245)", "rgb(229, 72, 77)",
                                 "rgb(139, 149, 161)")


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PageSidecar]:
    with page_sidecar(tmp_path_factory.mktemp("record")) as running:
        for post in running.hub.site.posts:
            running.hub.recorder.on_ami_event({"Event": "ContactStatus", "AOR": post.id, "ContactStatus": "Reachable"})
        yield running


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory, sidecar: PageSidecar) -> Iterator[Browser]:
    with operator_browser(tmp_path_factory.mktemp("chromium-profile"), sidecar) as chromium:
        yield chromium


@pytest.fixture(autouse=True)
def no_call_left(sidecar: PageSidecar) -> Iterator[None]:
    yield
    end_every_call(sidecar.hub)
    cameras = sidecar.hub.recorder.state().cameras
    for post in sidecar.hub.site.posts:
        if cameras[post.id].ok is not True:
            sidecar.camera.set_mode(post.id, "normal")
            sidecar.monitor.probe(post.id)


def local_time(iso: str) -> str:
    """``iso`` (UTC) as the pages show it in the browser's time zone."""
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone(LONDON).strftime("%H:%M:%S")


def camera_fails(sidecar: PageSidecar, post_id: str) -> None:
    """The post's camera goes black, and the monitor sees it. While a page shows that camera live, its stream
    is shared and a probe's first frames may still be from before: probe again, as the monitor would."""
    sidecar.camera.set_mode(post_id, "black")
    wait_until(lambda: not sidecar.monitor.probe(post_id).ok, 30, f"the camera of {post_id} seen black")


def live_call(sidecar: PageSidecar, incident: str) -> dict[str, Any]:
    return next(c for c in sidecar.hub.views.live_calls() if c["incident"] == incident)


# -- the record ---------------------------------------------------------------------------------------------

def test_a_page_opened_mid_call_shows_real_times_reference_camera_fault_and_overflow(
        sidecar: PageSidecar, browser: Browser) -> None:
    """Pages opened mid-call show its real times and reference; a camera fault and the overflow stay visible while live."""
    hub = sidecar.hub
    uid = f"1700000100.{id(hub) % 1000}"
    hub.recorder.on_ami_event({"Event": "QueueCallerJoin", "Queue": hub.site.queue.name,
                               "Channel": "PJSIP/idlewells-00000a01", "Uniqueid": uid, "Position": "1"})
    hub.recorder.on_ami_event({"Event": "AgentCalled", "Uniqueid": uid, "Interface": "PJSIP/desk-1"})
    incident = incident_of(hub, uid)
    call = live_call(sidecar, incident)
    dashboard = open_page(browser, sidecar.url + "/")
    operator = open_page(browser, sidecar.url + "/operator?desk=desk-2")
    try:
        # The real times and the reference, not "Queued —".
        expect(operator.locator("#post-name")).to_have_text("Idlewells Shopping Centre", timeout=WAIT_MS)
        expect(operator.locator("#call-since")).to_have_text(local_time(call["queued_at"]))
        expect(operator.locator("#incident")).to_have_text(f"{call['reference']} {incident}")
        assert re.fullmatch(r"[A-Z]{3}-\d{4}", call["reference"])
        waited = operator.locator("#call-wait").inner_text()
        assert re.fullmatch(r"\d+:\d\d", waited), waited
        expect(operator.locator("#call-wait")).not_to_have_text(waited, timeout=WAIT_MS)  # it counts on
        row = dashboard.locator(f"#calls li[data-incident='{incident}']")
        expect(row).to_contain_text(f"Idlewells Shopping Centre {call['reference']}: waiting")
        expect(row).to_contain_text("(rang 1 desk)")  # plurals: one desk ...
        hub.recorder.on_ami_event({"Event": "AgentCalled", "Uniqueid": uid, "Interface": "PJSIP/desk-2"})
        expect(row).to_contain_text("(rang 2 desks)", timeout=WAIT_MS)  # ... two desks
        first = dashboard.locator(f"#incidents tr[data-incident='{incident}']")
        expect(first.locator("summary")).to_have_text("3 steps")
        expect(first.locator(".reference")).to_have_text(f"{call['reference']}{incident}")

        # A camera fault on the calling post shows beside the call's colour.
        camera_fails(sidecar, "idlewells")
        card = dashboard.locator("#post-idlewells")
        expect(card).to_have_class(re.compile(r"\bcalling\b.*\bfault\b"), timeout=WAIT_MS)
        expect(card.locator("h3 .badge.bad")).to_have_text("Camera fault")
        assert dashboard.evaluate("getComputedStyle(document.getElementById('post-idlewells')).borderTopColor") == RED
        expect(row).to_contain_text("Camera fault: black")
        expect(operator.locator("#call-camera")).to_have_text("Fault: black", timeout=WAIT_MS)
        expect(operator.locator(f"#call-list [data-incident='{incident}'] .badge.bad")).to_have_text("Camera fault")

        # max_wait passes: the caller goes on to the overflow route, and the pages say so while it lasts.
        overflow(hub, uid)
        expect(operator.locator("#banner")).to_have_attribute("data-state", "overflowed", timeout=WAIT_MS)
        expect(operator.locator("#banner")).to_have_text(
            "Call from Idlewells Shopping Centre overflowed: the caller is on the overflow route")
        expect(operator.locator("#call-state")).to_have_text("Overflowed: the caller is on the overflow route")
        expect(dashboard.locator("#calls li.overflowed")).to_contain_text("the caller is on the overflow route",
                                                                         timeout=WAIT_MS)
        expect(dashboard.locator("#post-idlewells")).to_contain_text("Overflowed: on the overflow route")
        for page in (dashboard, operator):  # nobody in the control room took it: the alarm stays on
            expect(page.locator("body")).to_have_attribute("data-alarm", "on")
        assert live_call(sidecar, incident)["state"] == "overflowed"
    finally:
        hub.recorder.on_ami_event({"Event": "Hangup", "Uniqueid": uid, "Cause-txt": "Normal Clearing"})
    expect(dashboard.locator("#calls li.none")).to_be_visible(timeout=WAIT_MS)
    expect(dashboard.locator(f"#incidents tr[data-incident='{incident}']")).to_contain_text("Overflowed")
    assert_not_reloaded(dashboard)
    assert_not_reloaded(operator)
    dashboard.close()
    operator.close()
    assert browser.errors == []


def test_one_step_is_a_step(sidecar: PageSidecar, browser: Browser) -> None:
    """A timeline of one step says "1 step" (not "1 steps"), and the reference stands beside the incident's id."""
    hub = sidecar.hub
    uid = "1700000200.1"
    hub.recorder.on_ami_event({"Event": "QueueCallerJoin", "Queue": hub.site.queue.name,
                               "Channel": "PJSIP/kirkby-bus-station-00000b01", "Uniqueid": uid, "Position": "1"})
    incident = incident_of(hub, uid)
    page = open_page(browser, sidecar.url + "/")
    row = page.locator(f"#incidents tr[data-incident='{incident}']")
    expect(row.locator("summary")).to_have_text("1 step", timeout=WAIT_MS)
    expect(row.locator(".reference strong")).to_have_text(live_call(sidecar, incident)["reference"])
    expect(row.locator(".reference code")).to_have_text(incident)
    expect(row.locator(".closeout-cell")).to_have_text("once the call is over")  # no close-out while live
    page.close()


# -- close-out ------------------------------------------------------------------------------------------------

def ended_call(sidecar: PageSidecar, post_id: str) -> str:
    uid = queue_call(sidecar.hub, post_id)
    answer(sidecar.hub, uid, "desk-1")
    hang_up(sidecar.hub, uid)
    return incident_of(sidecar.hub, uid)


def close_in(page: Page, row_selector: str, reason: str, note: str | None, screenshot: str | None = None) -> None:
    page.locator(f"{row_selector} button.close-incident").click()
    dialog = page.locator("#closeout")
    expect(dialog).to_be_visible()
    expect(page.locator("#closeout-reason")).to_be_focused()
    page.locator("#closeout-submit").click()  # no reason yet: the browser asks for one, the dialog stays
    expect(dialog).to_be_visible()
    assert page.eval_on_selector("#closeout-reason", "e => e.validity.valueMissing") is True
    page.select_option("#closeout-reason", label=reason)
    if note is not None:
        page.fill("#closeout-note", note)
    if screenshot:
        page.screenshot(path=SCREENSHOTS / screenshot)
    page.locator("#closeout-submit").click()
    expect(dialog).to_be_hidden(timeout=WAIT_MS)


def test_an_operator_closes_ended_incidents_on_both_pages_and_the_export_has_them(
        sidecar: PageSidecar, browser: Browser) -> None:
    """Chromium: an ended incident closes with a reason and note on either page; both show who, why and when; so does the CSV."""
    first = ended_call(sidecar, "sutton-market")
    dashboard = open_page(browser, sidecar.url + "/")
    operator = open_page(browser, sidecar.url + "/operator?desk=desk-1")
    row = f"#incidents tr[data-incident='{first}']"
    note = "Two men fighting by the bus stop.\nPolice sent."
    close_in(dashboard, row, "Police dispatched", note, screenshot="closeout.png")
    cell = dashboard.locator(f"{row} .closeout-cell")
    expect(cell).to_contain_text("Police dispatched", timeout=WAIT_MS)
    expect(cell).to_contain_text(f"by {OPERATOR}")
    expect(cell.locator(".note")).to_have_text(note)
    stored = sidecar.hub.store.incident(first)
    assert stored is not None and (stored.close_reason, stored.close_note, stored.closed_by) == ("police", note, OPERATOR)
    expect(cell.locator("time")).to_have_text(local_time(stored.closed_at or ""))
    expect(dashboard.locator(f"{row} .timeline")).to_contain_text(f"Closed by {OPERATOR}: Police dispatched")
    # The operator page's recent calls show it closed too, without a reload.
    expect(operator.locator(f"#recent tr[data-incident='{first}'] .closeout-cell")).to_contain_text(
        f"Police dispatched by {OPERATOR}", timeout=WAIT_MS)

    # The other way round: closed on the operator page, the dashboard follows.
    second = ended_call(sidecar, "kirkby-bus-station")
    close_in(operator, f"#recent tr[data-incident='{second}']", "Test", None)
    expect(dashboard.locator(f"#incidents tr[data-incident='{second}'] .closeout-cell")).to_contain_text(
        f"Test by {OPERATOR}", timeout=WAIT_MS)
    expect(dashboard.locator(f"#incidents tr[data-incident='{second}'] .note")).to_have_count(0)

    # The export the dashboard links to has both close-outs.
    with dashboard.expect_download() as download:
        dashboard.locator("#export-csv").click()
    path = download.value.path()
    rows = {r["id"]: r for r in csv.DictReader(io.StringIO(path.read_text(encoding="utf-8")))}
    assert (rows[first]["close_reason"], rows[first]["close_note"], rows[first]["closed_by"]) == ("police", note, OPERATOR)
    assert (rows[second]["close_reason"], rows[second]["close_note"]) == ("test", "")
    assert rows[first]["closed_at"] == stored.closed_at
    actions = [(e["action"], e["outcome"], e["target"]) for e in sidecar.access.audit.entries(20)]
    assert ("incident.close", "ok", first) in actions and ("incident.close", "ok", second) in actions
    assert_not_reloaded(dashboard)
    assert_not_reloaded(operator)
    dashboard.close()
    operator.close()
    assert browser.errors == []


# -- the site plan --------------------------------------------------------------------------------------------

# Where the plan picture's coloured dots are on screen (found in the picture's own pixels), and where the
# page drew each post's marker.
DOTS_ON_SCREEN = """async (colours) => {
  const image = document.querySelector("#plan image");
  const picture = new Image();
  picture.src = image.getAttribute("href");
  await picture.decode();
  const canvas = document.createElement("canvas");
  canvas.width = picture.naturalWidth; canvas.height = picture.naturalHeight;
  const g = canvas.getContext("2d");
  g.drawImage(picture, 0, 0);
  const px = g.getImageData(0, 0, canvas.width, canvas.height).data;
  const box = image.getBoundingClientRect();
  const found = {};
  for (const [post, [r, gr, b]] of Object.entries(colours)) {
    let sx = 0, sy = 0, n = 0;
    for (let i = 0; i < px.length; i += 4) {
      if (Math.abs(px[i] - r) < 40 && Math.abs(px[i + 1] - gr) < 40 && Math.abs(px[i + 2] - b) < 40) {
        const p = i / 4; sx += p % canvas.width + 0.5; sy += Math.floor(p / canvas.width) + 0.5; n += 1;
      }
    }
    const dot = document.querySelector(`#marker-${post} .dot`).getBoundingClientRect();
    found[post] = { picture: [box.left + sx / n * box.width / canvas.width, box.top + sy / n * box.height / canvas.height],
                    marker: [dot.left + dot.width / 2, dot.top + dot.height / 2], pixels: n };
  }
  return found;
}"""


def fill(page: Page, post_id: str, part: str = "dot") -> str:
    return str(page.evaluate(f"getComputedStyle(document.querySelector('#marker-{post_id} .{part}'))"
                             f".{'fill' if part == 'dot' else 'stroke'}"))


def expect_colour(page: Page, post_id: str, colour: str, state: str) -> None:
    marker = page.locator(f"#marker-{post_id}")
    expect(marker).to_have_attribute("data-state", state, timeout=WAIT_MS)
    assert fill(page, post_id) == colour, (post_id, state, fill(page, post_id))


def test_the_site_plan_draws_each_post_where_its_lat_lon_falls_and_colours_it_by_state(
        sidecar: PageSidecar, browser: Browser) -> None:
    """Chromium: each post's marker sits on its dot of the site's plan picture and takes the colour of its state."""
    hub = sidecar.hub
    assert requests.get(sidecar.url + "/site/plan", timeout=10).status_code == 401  # behind the login, like the rest
    page = open_page(browser, sidecar.url + "/")
    expect(page.locator("#plan")).to_have_attribute("data-image", "yes")
    colours = {post: [bgr[2], bgr[1], bgr[0]] for post, bgr in PLAN_DOTS.items()}
    found = page.evaluate(DOTS_ON_SCREEN, colours)
    for post, where in found.items():
        assert where["pixels"] > 50, (post, where)  # the dot is in the picture the sidecar served
        dx, dy = (where["marker"][i] - where["picture"][i] for i in (0, 1))
        assert abs(dx) < 1.5 and abs(dy) < 1.5, (post, where)
    for post in hub.site.posts:  # reachable, camera OK, no call
        expect_colour(page, post.id, GREEN, "idle")
        expect(page.locator(f"#marker-{post.id} title")).to_have_text(f"{post.name}: Idle")

    uid = queue_call(hub, "sutton-market")
    expect_colour(page, "sutton-market", AMBER, "calling")
    answer(hub, uid, "desk-1")
    expect_colour(page, "sutton-market", BLUE, "answered")
    hang_up(hub, uid)
    expect_colour(page, "sutton-market", GREEN, "idle")

    camera_fails(sidecar, "kirkby-bus-station")
    expect_colour(page, "kirkby-bus-station", RED, "fault")
    # A call from the post with the fault: the call's colour, and a red ring for the fault beside it.
    second = queue_call(hub, "kirkby-bus-station")
    expect_colour(page, "kirkby-bus-station", AMBER, "calling")
    expect(page.locator("#marker-kirkby-bus-station")).to_have_class(re.compile(r"\bhas-fault\b"))
    assert fill(page, "kirkby-bus-station", "ring") == RED
    expect(page.locator("#marker-kirkby-bus-station title")).to_have_text("Kirkby Bus Station: Calling, fault")
    page.locator("#plan").screenshot(path=SCREENSHOTS / "plan.png")
    hang_up(hub, second)

    hub.recorder.on_ami_event({"Event": "ContactStatus", "AOR": "idlewells", "ContactStatus": "Unreachable"})
    hub.recorder.tick()  # sidecar.offline_grace is 0 on this site
    expect_colour(page, "idlewells", GREY, "offline")
    hub.recorder.on_ami_event({"Event": "ContactStatus", "AOR": "idlewells", "ContactStatus": "Reachable"})
    expect_colour(page, "idlewells", GREEN, "idle")
    assert_not_reloaded(page)
    page.close()
    assert browser.errors == []
