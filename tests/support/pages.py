"""The real sidecar app for the page tests, in-process, and AMI as Asterisk's queue reports a refuge call.

The app is served by the sidecar's own HTTP server (as in production) around a hub built in-process, with a
real camera monitor reading a real RTSP test camera. AMI is the only part played by the test: it feeds the hub
the events Asterisk's queue sends (QueueCallerJoin, AgentCalled, AgentConnect, AgentComplete, ContactStatus).
The site is the example site, behind a login, with every post camera on the test camera and a site plan
picture (:func:`plan_picture`) whose coloured dots mark where each post stands.
"""

from __future__ import annotations

import itertools
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import yaml
from playwright.sync_api import Page, expect

from sip_refuge.config import HttpLimits, Site, load_site
from sip_refuge.config.secrets import init_secrets
from sip_refuge.sidecar.access import Access
from sip_refuge.sidecar.cameras import CameraMonitor
from sip_refuge.sidecar.core import Hub
from sip_refuge.sidecar.outbox import Outbox
from sip_refuge.sidecar.store import Store
from sip_refuge.sidecar.web import MAX_BODY, create_app
from sip_refuge.sidecar.web.admission import Admission
from sip_refuge.sidecar.web.server import HttpServer
from tests.support.browser import Browser, log_in
from tests.support.operators import add_operator
from tests.support.rtsp_camera import TestCamera
from tests.support.sites import cameras_on

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config" / "site.example.yaml"
SCREENSHOTS = REPO / "docs" / "img"
TOKEN = "t0ken-for-the-page-tests-0123456789"
CAMERA_USER = "viewer"
OPERATOR = "alice"
WAIT_MS = 15_000  # generous bound for page updates: these tests prove behaviour, not speed
# The plan picture: [[south, west], [north, east]] around the example site's posts, and its size in pixels.
PLAN_BOUNDS = ((53.095, -1.270), (53.130, -1.240))
PLAN_SIZE = (900, 700)
# Each post's dot on the plan picture, in a colour of its own (BGR, as OpenCV writes it).
PLAN_DOTS = {"sutton-market": (0, 0, 255), "idlewells": (0, 255, 0), "kirkby-bus-station": (255, 0, 0)}
_uniqueids = itertools.count(1)


@dataclass
class PageSidecar:
    """The sidecar as the pages see it: an HTTP base URL, and the hub the test feeds AMI events to."""

    url: str
    hub: Hub
    monitor: CameraMonitor
    camera: TestCamera
    camera_password: str
    password: str  # the operator's (OPERATOR), in the site's users file
    access: Access

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


def plan_picture(path: Path, site_data: dict[str, object]) -> None:
    """A PNG site plan: grey ground, and a dot of PLAN_DOTS' colour where each post's lat/lon falls, by the
    meaning of ``site.plan.bounds`` (the picture's edges are those latitudes and longitudes)."""
    (south, west), (north, east) = PLAN_BOUNDS
    width, height = PLAN_SIZE
    picture = np.full((height, width, 3), 60, np.uint8)
    for post in site_data["posts"]:  # type: ignore[attr-defined]
        lat, lon = post["location"]["lat"], post["location"]["lon"]
        x = round((lon - west) / (east - west) * width)
        y = round((north - lat) / (north - south) * height)
        cv2.circle(picture, (x, y), 6, PLAN_DOTS[post["id"]], -1)
    ok, png = cv2.imencode(".png", picture)
    assert ok
    path.write_bytes(png.tobytes())


def write_site(folder: Path, camera: TestCamera, password: str) -> Site:
    """The example site with every post camera on the test camera, behind a login like a real one, a site
    plan picture, and no grace before a post that stops answering is offline (the tests say when)."""
    data = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    cameras_on(data, folder, camera, CAMERA_USER, password)
    plan_picture(folder / "plan.png", data)
    data["site"]["plan"] = {"image": "plan.png", "bounds": [list(c) for c in PLAN_BOUNDS]}
    data["sidecar"]["offline_grace"] = 0
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    init_secrets(load_site(path, check_secrets=False))
    return load_site(path)


@contextmanager
def page_sidecar(folder: Path) -> Iterator[PageSidecar]:
    password = "cam-" + secrets.token_hex(8)
    with TestCamera(["sutton-market", "idlewells", "kirkby-bus-station"], user=CAMERA_USER,
                    password=password) as camera:
        site = write_site(folder, camera, password)
        store = Store(folder / "sidecar.sqlite3")
        monitor: CameraMonitor | None = None

        def snapshot(post_id: str) -> bytes:
            assert monitor is not None
            return monitor.snapshot(post_id)

        hub = Hub(site, store, Outbox(store, []), base_url="http://127.0.0.1", snapshot=snapshot)
        assert hub.snapshots is not None
        snapshots = threading.Thread(target=hub.snapshots.run, name="snapshots")  # as the runner starts it
        snapshots.start()
        monitor = CameraMonitor.for_site(site, on_change=hub.recorder.on_camera_change, interval=300)
        # One probe each now, in this thread: the dashboard then has camera states and thumbnails to show.
        for post in site.posts:
            monitor.probe(post.id)
        stop = threading.Event()
        operator_password = add_operator(site, OPERATOR)
        access = Access.for_site(site, store, TOKEN)
        admission = Admission(HttpLimits(), trusted=site.pbx.networks.posts)
        app = create_app(hub, token=TOKEN, cameras=monitor, stop=stop, http=admission.status, access=access)
        server = HttpServer(app, admission, host="127.0.0.1", port=0, max_body=MAX_BODY).start()
        try:
            yield PageSidecar(f"http://127.0.0.1:{server.port}", hub, monitor, camera, password, operator_password,
                              access)
        finally:
            # As the runner stops: streams end, the server joins its threads, then the live views' decoders.
            stop.set()
            hub.close()
            server.stop()
            monitor.close_feeds()
            snapshots.join(30)
            store.close()


@contextmanager
def operator_browser(profile: Path, sidecar: PageSidecar) -> Iterator[Browser]:
    """One Chromium with its profile in ``profile``, logged in as the operator once (its pages share the session
    cookie)."""
    with Browser(profile) as chromium:
        page = chromium.page()
        log_in(page, sidecar.url + "/", OPERATOR, sidecar.password)
        page.close()
        yield chromium


def end_every_call(hub: Hub) -> None:
    """No live call left and no missed call sounding the alarm, even after a test that failed half-way."""
    for call in hub.recorder.tracker.live_calls():
        hub.recorder.on_ami_event({"Event": "Hangup", "Uniqueid": call.uniqueid, "Cause-txt": "test cleanup"})
    for missed in hub.views.missed(hub.views.now()):
        hub.recorder.acknowledge_incident(missed["incident"], None, by="test-cleanup")


# -- AMI as Asterisk's queue reports a refuge call --------------------------------------------------------

def queue_call(hub: Hub, post_id: str) -> str:
    uid = f"1700000000.{next(_uniqueids)}"
    hub.recorder.on_ami_event({"Event": "QueueCallerJoin", "Queue": hub.site.queue.name,
                               "Channel": f"PJSIP/{post_id}-{int(uid.split('.')[1]):08x}", "Uniqueid": uid,
                               "Position": "1"})
    for desk in hub.site.desks:
        hub.recorder.on_ami_event({"Event": "AgentCalled", "Uniqueid": uid, "Interface": f"PJSIP/{desk.id}"})
    return uid


def answer(hub: Hub, uid: str, desk_id: str) -> None:
    hub.recorder.on_ami_event({"Event": "AgentConnect", "Uniqueid": uid, "Interface": f"PJSIP/{desk_id}"})


def hang_up(hub: Hub, uid: str) -> None:
    hub.recorder.on_ami_event({"Event": "AgentComplete", "Uniqueid": uid, "Reason": "agent"})


def overflow(hub: Hub, uid: str) -> None:
    """max_wait passed: Asterisk 22 reports the timeout as QueueCallerAbandon with no hang-up before it."""
    hub.recorder.on_ami_event({"Event": "QueueCallerAbandon", "Uniqueid": uid, "Queue": hub.site.queue.name})


def incident_of(hub: Hub, uid: str) -> str:
    return next(i.id for i in hub.store.incidents(50) if i.timeline and i.timeline[0].detail.get("uniqueid") == uid)


# -- pages --------------------------------------------------------------------------------------------------

# A camera frame is on screen: the image has a picture and it is the test camera's colour bars, not the
# sidecar's black "camera unavailable" placeholder of the same size.
CAMERA_FRAME_SHOWN = """() => {
  const img = document.getElementById("camera");
  if (!img.src || img.naturalWidth === 0) return false;
  const canvas = document.createElement("canvas");
  canvas.width = 32; canvas.height = 18;
  const g = canvas.getContext("2d");
  g.drawImage(img, 0, 0, 32, 18);
  const px = g.getImageData(0, 0, 32, 18).data;
  let sum = 0;
  for (let i = 0; i < px.length; i += 4) sum += px[i] + px[i + 1] + px[i + 2];
  return sum / (px.length / 4) / 3 > 60;
}"""


def open_page(browser: Browser, url: str) -> Page:
    """``url`` loaded and subscribed to the event stream, with a marker that only a reload would lose."""
    page = browser.page()
    page.goto(url)
    expect(page.locator("#link-state")).to_have_attribute("data-state", "open", timeout=WAIT_MS)
    page.evaluate("window.loadMarker = 'still the first load'")
    return page


def assert_not_reloaded(page: Page) -> None:
    assert page.evaluate("window.loadMarker") == "still the first load"
