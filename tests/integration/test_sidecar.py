"""The whole sidecar, as `sip-refuge sidecar SITE` runs it, against real parts.

A real Asterisk 22 on loopback; posts and desks are real SIP peers (tests/support/sipua.py); every post's
camera is a mount of a real RTSP test camera behind a login; the CCTV target is a real Standard Webhooks
receiver that verifies signatures and de-duplicates by webhook-id. The sidecar runs as a subprocess, so it
can be SIGKILLed and restarted, and everything it prints is searched for the camera password at the end. Its
database lives on a small tmpfs mounted for this module (tests run as root), which one test fills up.

The tests of this module share one set-up and run in file order; each leaves the parts as it found them.
"""

from __future__ import annotations

import os
import secrets
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import requests
import yaml

from sip_refuge.config import Desk, Post, Site, load_site
from sip_refuge.config.secrets import init_secrets
from sip_refuge.pbx.asterisk import Asterisk, free_port
from tests.integration.conftest import EXAMPLE, desks_ready
from tests.support.disk import SmallDisk
from tests.support.metrics import Scrape
from tests.support.receivers import OutageReceiver
from tests.support.rtsp_camera import TestCamera
from tests.support.sidecar import Sidecar, wait_until
from tests.support.sipua import IncomingCall, OutgoingCall, SipPeer
from tests.support.sites import cameras_on, rtp_range

pytestmark = pytest.mark.integration

CAMERA_USER = "viewer"
TARGET = "vms-hook"
QUALIFY, GRACE, CAMERA_INTERVAL = 5, 5, 5
QUALIFY_TIMEOUT = 3  # the rendered AOR's qualify_timeout
OUTAGE = 60.0  # seconds the webhook receiver is down: the outbox's backoff cap


# -- the set-up ---------------------------------------------------------------------------------------


def write_site(folder: Path, camera: Any, camera_password: str, hook_port: int, database: Path) -> Path:
    """The example site on free loopback ports, short timers, cameras on the test camera, one webhook target."""
    data = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    pbx = data["pbx"]
    pbx.update(host="127.0.0.1", bind="127.0.0.1", sip_port=free_port(), transport="udp",
               qualify_frequency=QUALIFY)
    pbx["rtp_start"], pbx["rtp_end"] = rtp_range()
    pbx["ami"]["port"] = free_port()
    data["queue"].update(ring_timeout=5, max_wait=8)
    data["sidecar"].update(listen=f"127.0.0.1:{free_port()}", offline_grace=f"{GRACE}s",
                           camera_interval=f"{CAMERA_INTERVAL}s", database=str(database))
    data["cctv"] = [{"type": "webhook", "name": TARGET, "url": f"http://127.0.0.1:{hook_port}/hook",
                     "secret_file": "secrets/webhook.secret"}]
    cameras_on(data, folder, camera, CAMERA_USER, camera_password)
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    init_secrets(load_site(path, check_secrets=False))
    return path


class EventFeed:
    """Reads the sidecar's /api/v1/events the whole module long (reconnecting across restarts), raw."""

    def __init__(self, url: str, token: str = "") -> None:
        self.url, self.token, self.lock = url, token, threading.Lock()
        self.text: list[str] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="sse-reader", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                with requests.get(self.url, stream=True, timeout=(2, 30),
                                  headers={"Authorization": f"Bearer {self.token}"}) as resp:
                    for line in resp.iter_lines(decode_unicode=True):
                        with self.lock:
                            self.text.append(line)
                        if self.stopping.is_set():
                            return
            except requests.RequestException:
                self.stopping.wait(0.5)

    def all(self) -> str:
        with self.lock:
            return "\n".join(self.text)

    def close(self) -> None:
        self.stopping.set()


@dataclass
class World:
    site: Site
    site_file: Path
    pbx: Asterisk
    camera: TestCamera
    camera_password: str
    receiver: OutageReceiver
    sidecar: Sidecar
    feed: EventFeed
    disk: SmallDisk
    posts: dict[str, SipPeer] = field(default_factory=dict)
    desks: dict[str, SipPeer] = field(default_factory=dict)

    # phones ------------------------------------------------------------------------------------------
    def phone(self, phone_id: str) -> SipPeer:
        phones: list[Post | Desk] = [*self.site.posts, *self.site.desks]
        phone = next(p for p in phones if p.id == phone_id)
        peer = SipPeer(phone_id, phone.secret.read(), (self.site.pbx.host, self.site.pbx.sip_port))
        response = peer.register()
        assert response.code == 200, f"{phone_id} could not register: {response}"
        return peer

    def register_all(self) -> None:
        for group in (self.posts, self.desks):
            for peer in group.values():
                assert peer.register().code == 200
        wait_until(lambda: desks_ready(self.pbx, self.site), 20, "desks ready in the queue")

    def call(self, post_id: str) -> OutgoingCall:
        return self.posts[post_id].call(self.site.queue.extension)

    def answer(self, desk_id: str, before: int) -> IncomingCall:
        """Answer the first INVITE ``desk_id`` got after it had ``before`` of them."""
        incoming = self.desks[desk_id].wait_incoming(15, index=before)
        incoming.answer()
        return incoming

    # webhook receiver --------------------------------------------------------------------------------
    def received(self) -> list[dict[str, Any]]:
        with self.receiver.cond:
            return list(self.receiver.events)

    def wait_event(self, match: Callable[[dict[str, Any]], bool], timeout: float, what: str,
                   since: int = 0) -> dict[str, Any]:
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            found[:] = [e for e in self.receiver.events[since:] if match(e)]
            return bool(found)

        self.receiver.wait_for(seen, timeout, what)
        return found[0]

    def of_incident(self, incident: str) -> list[str]:
        return [e["type"] for e in self.received() if e["data"].get("incident") == incident]

    # sidecar -----------------------------------------------------------------------------------------
    def latest_incident(self, post_id: str, after: set[str]) -> dict[str, Any]:
        def new() -> dict[str, Any] | None:
            rows = self.sidecar.json(f"/api/v1/incidents?post={post_id}")["incidents"]
            return next((r for r in rows if r["id"] not in after), None)

        return wait_until(new, 15, f"new incident of {post_id}")

    def incident_ids(self) -> set[str]:
        return {i["id"] for i in self.sidecar.json("/api/v1/incidents?limit=10000")["incidents"]}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    folder = tmp_path_factory.mktemp("sidecar")
    password = "cam-" + secrets.token_hex(10)
    hook_port = free_port()
    with SmallDisk(folder / "db", "16m") as disk, \
            TestCamera(["sutton-market", "idlewells", "kirkby-bus-station"], user=CAMERA_USER,
                       password=password) as camera:
        site_file = write_site(folder, camera, password, hook_port, disk.path / "sidecar.sqlite3")
        site = load_site(site_file)
        receiver = OutageReceiver((folder / "secrets" / "webhook.secret").read_text().strip())
        receiver.port = hook_port
        receiver.start()
        sidecar = Sidecar(site_file, f"http://{site.sidecar.host}:{site.sidecar.port}" if site.sidecar else "",
                          verbose=True)
        with Asterisk(site, command="pytest tests/integration/test_sidecar.py", boot_timeout=60,
                      ) as pbx:
            world = World(site, site_file, pbx, camera, password, receiver, sidecar, EventFeed(""), disk)
            try:
                world.posts = {p.id: world.phone(p.id) for p in site.posts}
                world.desks = {d.id: world.phone(d.id) for d in site.desks}
                wait_until(lambda: desks_ready(pbx, site), 20, "desks ready in the queue")
                sidecar.start()
                world.feed = EventFeed(sidecar.url + "/api/v1/events", sidecar.token())
                sidecar.wait_ami()
                wait_until(lambda: all(p["online"] for p in sidecar.posts().values()), 20, "every post online")
                yield world
            finally:
                world.feed.close()
                sidecar.close()
                for peer in [*world.posts.values(), *world.desks.values()]:
                    peer.close()
                receiver.stop()


# -- calls --------------------------------------------------------------------------------------------


def test_call_is_queued_answered_and_ended_at_the_webhook(world: World) -> None:
    """A post's call reaches the webhook as call.queued (signed, full RTSP URL, snapshot JPEG), call.answered, call.ended."""
    post = world.site.posts[0]
    desk = world.site.desks[0]
    mark = len(world.received())
    rung = len(world.desks[desk.id].incoming)
    call = world.call(post.id)
    queued = world.wait_event(lambda e: e["type"] == "call.queued" and e["data"]["post"]["id"] == post.id,
                              15, "call.queued", since=mark)
    incident = queued["data"]["incident"]
    # The receiver keeps only requests whose signature verified; their headers line up with the events.
    headers = {k.lower(): v for k, v in world.receiver.headers[world.received().index(queued)].items()}
    assert headers["webhook-id"].startswith("evt_") and headers["webhook-signature"].startswith("v1,")
    assert world.receiver.rejected == 0, "the receiver refused a signature"
    # The CCTV target, and only it, gets the camera's full URL with the password.
    assert queued["data"]["camera"]["rtsp_url"] == world.camera.url(post.id, user=CAMERA_USER,
                                                                  password=world.camera_password)
    assert queued["data"]["post"]["name"] == post.name
    assert queued["data"]["post"]["location"]["address"] == post.location.address
    # The CCTV system fetches the snapshot with the key in its URL, without a login; without the key, no picture.
    snap = requests.get(queued["data"]["snapshot_url"], timeout=30)
    assert snap.status_code == 200 and snap.headers["content-type"] == "image/jpeg"
    assert requests.get(queued["data"]["snapshot_url"].split("?")[0], timeout=30).status_code == 401
    assert snap.content[:3] == b"\xff\xd8\xff"
    image = cv2.imdecode(np.frombuffer(snap.content, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[:2] == (360, 640)

    world.answer(desk.id, rung)
    assert call.wait_final(10).code == 200
    answered = world.wait_event(lambda e: e["type"] == "call.answered" and e["data"]["incident"] == incident,
                                15, "call.answered")
    assert answered["data"]["desk"] == {"id": desk.id, "name": desk.name, "extension": desk.extension,
                                        "workstation": desk.workstation}

    call.hangup()
    world.wait_event(lambda e: e["type"] == "call.ended" and e["data"]["incident"] == incident, 15, "call.ended")
    assert world.of_incident(incident) == ["call.queued", "call.answered", "call.ended"]

    found = wait_until(lambda: (i := world.sidecar.incident(incident)) and i["state"] == "ended" and i, 10,
                       "incident ended in the API")
    assert found["post_id"] == post.id and found["answered_by"] == desk.id and found["outcome"] == "ended"
    listed = world.sidecar.json("/api/v1/incidents")["incidents"]
    assert incident in [i["id"] for i in listed]
    kinds = [t["kind"] for t in found["timeline"]]
    for earlier, later in [("queued", "desk_rung"), ("desk_rung", "answered"), ("answered", "ended")]:
        assert earlier in kinds and later in kinds and kinds.index(earlier) < kinds.index(later), kinds
    rung_desks = {t["detail"]["desk"] for t in found["timeline"] if t["kind"] == "desk_rung"}
    assert rung_desks == {d.id for d in world.site.desks}


# -- post reachability and cameras ----------------------------------------------------------------------


def test_dead_post_goes_offline_and_comes_back(world: World) -> None:
    """A post that stops answering qualify is post.offline within qualify + grace, and post.online when back."""
    post = world.site.posts[1]
    mark = len(world.received())
    world.posts.pop(post.id).close()  # the post dies: its OPTIONS go unanswered (port closed)
    died = time.monotonic()
    bound = QUALIFY + QUALIFY_TIMEOUT + GRACE + 10  # + margin for scheduling
    offline = world.wait_event(lambda e: e["type"] == "post.offline" and e["data"]["post"]["id"] == post.id,
                               bound, "post.offline", since=mark)
    took = time.monotonic() - died
    print(f"post.offline {took:.1f} s after the post died (qualify {QUALIFY} s + timeout + grace {GRACE} s)")
    assert offline["data"]["incident"] is None
    assert world.sidecar.posts()[post.id]["online"] is False

    world.posts[post.id] = world.phone(post.id)
    world.wait_event(lambda e: e["type"] == "post.online" and e["data"]["post"]["id"] == post.id, 20,
                     "post.online", since=mark)
    wait_until(lambda: world.sidecar.posts()[post.id]["online"], 10, "post online in the API")
    assert Scrape(world.sidecar.metrics()).value("refuge_posts_online") == len(world.site.posts)


@pytest.mark.parametrize("mode", ["black", "frozen"])
def test_camera_fault_and_recovery(world: World, mode: str) -> None:
    """A camera that turns black or freezes raises camera.fault with that reason, and camera.ok once it recovers."""
    post = world.site.posts[2]
    mark = len(world.received())
    world.camera.set_mode(post.id, mode)
    try:
        fault = world.wait_event(lambda e: e["type"] == "camera.fault" and e["data"]["post"]["id"] == post.id,
                                 CAMERA_INTERVAL * 8, f"camera.fault ({mode})", since=mark)
        assert fault["data"]["reason"] == mode
        wait_until(lambda: world.sidecar.posts()[post.id]["camera"] == {"ok": False, "reason": mode}, 10,
                   "camera fault in the API")
        assert Scrape(world.sidecar.metrics()).value("refuge_camera_faults") == 1
    finally:
        world.camera.set_mode(post.id, "normal")
    ok = world.wait_event(lambda e: e["type"] == "camera.ok" and e["data"]["post"]["id"] == post.id,
                          CAMERA_INTERVAL * 6, "camera.ok", since=mark)
    assert ok["data"]["reason"] == "ok"
    assert world.received()[mark:].index(fault) < world.received()[mark:].index(ok)
    wait_until(lambda: Scrape(world.sidecar.metrics()).value("refuge_camera_faults") == 0, 10,
               "no camera fault in /metrics")


# -- configuration the sidecar depends on -----------------------------------------------------------------


# -- outages ----------------------------------------------------------------------------------------------


def complete_call(world: World, post_id: str, desk_id: str = "desk-1") -> str:
    """Place, answer and hang up one call; return its incident id (from the sidecar's API)."""
    known = world.incident_ids()
    rung = len(world.desks[desk_id].incoming)
    call = world.call(post_id)
    incident: str = world.latest_incident(post_id, known)["id"]
    world.answer(desk_id, rung)
    assert call.wait_final(10).code == 200
    wait_until(lambda: (i := world.sidecar.incident(incident)) and i["state"] == "answered", 10, "answered")
    call.hangup()
    wait_until(lambda: (i := world.sidecar.incident(incident)) and i["state"] == "ended", 10, "ended")
    return incident


def test_asterisk_restart_reconnects_and_puts_state_right(world: World) -> None:
    """After Asterisk crashes under a live call and restarts, the sidecar reconnects, closes that call, sees posts online."""
    post = world.site.posts[0]
    known = world.incident_ids()
    rung = len(world.desks["desk-1"].incoming)
    call = world.call(post.id)
    incident = world.latest_incident(post.id, known)["id"]
    world.answer("desk-1", rung)
    assert call.wait_final(10).code == 200
    wait_until(lambda: (i := world.sidecar.incident(incident)) and i["state"] == "answered", 10, "answered")
    before = world.sidecar.health()["ami"]["since"]

    # A crash, not `core stop`: a stopping Asterisk still reports the hang-ups, a crashed one tells nothing.
    assert world.pbx.pid is not None
    os.kill(world.pbx.pid, signal.SIGKILL)
    world.pbx.restart()
    world.register_all()  # phones re-register, as real ones do when their PBX comes back
    health = wait_until(lambda: (h := world.sidecar.health())["ami"]["connected"] and h["ami"]["since"] != before
                        and h, 30, "AMI reconnected")
    assert health["status"] == "ok"
    ended = world.wait_event(lambda e: e["type"] == "call.ended" and e["data"]["incident"] == incident, 30,
                             "call.ended of the call Asterisk dropped")
    assert ended["data"].get("resync") is True
    found = world.sidecar.incident(incident)
    assert found is not None and found["state"] == "ended"
    assert world.sidecar.json("/api/v1/posts")["calls"] == []
    wait_until(lambda: all(p["online"] for p in world.sidecar.posts().values()), 30, "every post online again")
    # And calls are followed as before.
    done = complete_call(world, post.id)
    world.wait_event(lambda e: e["type"] == "call.ended" and e["data"]["incident"] == done, 20, "next call.ended")


def press_while_booting(world: World, post_id: str, within: float) -> tuple[OutgoingCall, float]:
    """Restart Asterisk and place an alarm from ``post_id`` as soon as it takes one: an INVITE every 50 ms from
    the moment the process starts, so the press is the first call it answers. Returns the call and how long
    after the start Asterisk took it."""
    peer = world.posts[post_id]
    world.pbx.stop()
    booting = threading.Thread(target=world.pbx.start, name="asterisk-boot")
    started = time.monotonic()
    booting.start()
    try:
        tries: list[OutgoingCall] = []
        while time.monotonic() - started < within + 30:
            tries.append(peer.call(world.site.queue.extension))
            time.sleep(0.05)
            answered = next((c for c in tries if c.responses), None)
            if answered is not None:
                took = time.monotonic() - started
                break
        else:
            raise AssertionError("the restarted Asterisk answered no INVITE")
    finally:
        booting.join(60)
    with peer.lock:  # the tries Asterisk never got (its port was still closed) are no calls to hang up
        peer.calls[:] = [c for c in peer.calls if c not in tries or c is answered]
    return answered, took


def test_alarm_pressed_as_the_pbx_restarts_gets_its_incident(world: World) -> None:
    """An alarm pressed while Asterisk is still booting (sidecar attached throughout) gets its incident and events."""
    post = world.site.posts[1]
    known = world.incident_ids()
    mark = len(world.received())
    rung = len(world.desks["desk-1"].incoming)
    call, took = press_while_booting(world, post.id, within=1.0)
    world.register_all()
    queued = world.wait_event(lambda e: e["type"] == "call.queued" and e["data"]["post"]["id"] == post.id, 30,
                              "call.queued of the alarm pressed at boot", since=mark)
    incident = queued["data"]["incident"]
    assert incident not in known
    # Right after a start Asterisk does not yet know the desks can take calls (their first qualify is still
    # to come): it may send the alarm straight to the overflow route. Either way the incident must be there.
    desk = world.desks["desk-1"]

    def ringing() -> IncomingCall | None:  # the queue rings again after each ring timeout: take a live ring
        with desk.lock:
            return next((c for c in reversed(desk.incoming[rung:]) if c.state == "ringing"), None)

    overflowed = wait_until(lambda: "unanswered" if "call.unanswered" in world.of_incident(incident) else
                            "rang" if ringing() else None, 30, "a desk ringing or the overflow")
    print(f"Asterisk took the press {took:.2f} s after its process started; the call {overflowed}")
    if overflowed == "rang":
        ring = ringing()
        assert ring is not None
        ring.answer()
        assert call.wait_final(15).code == 200
        world.wait_event(lambda e: e["type"] == "call.answered" and e["data"]["incident"] == incident, 15,
                         "call.answered")
    call.hangup()
    world.wait_event(lambda e: e["type"] == "call.ended" and e["data"]["incident"] == incident, 15, "call.ended")
    if overflowed == "rang":
        assert world.of_incident(incident) == ["call.queued", "call.answered", "call.ended"]
    else:
        # Overflowed: live in the overflow route until the post hung up, then ended.
        assert world.of_incident(incident) == ["call.queued", "call.unanswered", "call.ended"]
        unanswered = world.received()[[e["type"] for e in world.received()].index("call.unanswered", mark)]
        assert unanswered["data"]["reason"] == "overflowed"
    found = wait_until(lambda: (i := world.sidecar.incident(incident)) and i["state"] == "ended" and i, 15,
                       "the incident ended in the API")
    assert found["post_id"] == post.id
    assert wait_until(lambda: world.sidecar.health()["status"] == "ok", 30, "healthy sidecar")


def test_sigkill_mid_delivery_loses_nothing(world: World) -> None:
    """Events stored but not yet delivered when the sidecar is SIGKILLed are delivered once it is restarted."""
    world.receiver.stop()  # deliveries now fail and wait in the outbox
    try:
        incident = complete_call(world, world.site.posts[2].id)
        wait_until(lambda: world.sidecar.health()["targets"][0]["pending"] >= 3, 10, "3 pending deliveries")
        world.sidecar.kill()
    finally:
        world.receiver.start()
    world.sidecar.start()
    world.sidecar.wait_ami()
    world.receiver.wait_for(lambda: len(world.of_incident(incident)) >= 3, 90, "the 3 events after the restart")
    assert world.of_incident(incident) == ["call.queued", "call.answered", "call.ended"]
    wait_until(lambda: world.sidecar.health()["targets"][0]["pending"] == 0, 30, "empty outbox")


def test_call_that_ends_while_the_sidecar_is_dead_is_closed_after_restart(world: World) -> None:
    """A call answered before a SIGKILL and hung up while the sidecar is dead is closed (call.ended) after restart."""
    post = world.site.posts[1]
    known = world.incident_ids()
    rung = len(world.desks["desk-1"].incoming)
    call = world.call(post.id)
    incident = world.latest_incident(post.id, known)["id"]
    world.answer("desk-1", rung)
    assert call.wait_final(10).code == 200
    world.wait_event(lambda e: e["type"] == "call.answered" and e["data"]["incident"] == incident, 15,
                     "call.answered")
    world.sidecar.kill()
    call.hangup()
    wait_until(lambda: "0 active channels" in world.pbx.cli("core show channels count"), 10, "the call gone")
    world.sidecar.start()
    world.sidecar.wait_ami()
    ended = world.wait_event(lambda e: e["type"] == "call.ended" and e["data"]["incident"] == incident, 30,
                             "call.ended after the restart")
    assert ended["data"]["resync"] is True and ended["data"]["desk"]["id"] == "desk-1"
    assert world.of_incident(incident) == ["call.queued", "call.answered", "call.ended"]
    found = world.sidecar.incident(incident)
    assert found is not None and found["state"] == "ended" and found["outcome"] == "ended"
    assert world.sidecar.json("/api/v1/posts")["calls"] == []


def test_webhook_down_for_a_minute_gets_all_nine_events_in_order(world: World) -> None:
    """Three calls while the webhook receiver is down 60 s: all nine events arrive afterwards, in order, once each."""
    duplicates = world.receiver.duplicates
    world.receiver.stop()
    down = time.monotonic()
    try:
        incidents = [complete_call(world, post.id) for post in world.site.posts]
        health = world.sidecar.health()
        assert health["targets"][0]["healthy"] is False and health["targets"][0]["pending"] >= 9
        time.sleep(max(0.0, OUTAGE - (time.monotonic() - down)))  # the outage itself, not a wait for a result
    finally:
        world.receiver.start()
    up = time.monotonic()
    world.receiver.wait_for(lambda: all(len(world.of_incident(i)) >= 3 for i in incidents), 90,
                            "all nine events after the outage")
    print(f"nine events delivered {time.monotonic() - up:.1f} s after the receiver came back")
    for incident in incidents:
        assert world.of_incident(incident) == ["call.queued", "call.answered", "call.ended"]
    assert len(set(world.receiver.ids)) == len(world.receiver.ids)
    print(f"duplicates the receiver dropped: {world.receiver.duplicates - duplicates}")
    wait_until(lambda: world.sidecar.health()["targets"][0]["healthy"], 10, "target healthy again")


def call_through_webhook(world: World, post_id: str, desk_id: str = "desk-1") -> str:
    """Place, answer and hang up one call, following it at the webhook only (not the API: the store may not
    have it); return its incident id."""
    mark, rung = len(world.received()), len(world.desks[desk_id].incoming)
    call = world.call(post_id)
    queued = world.wait_event(lambda e: e["type"] == "call.queued" and e["data"]["post"]["id"] == post_id, 15,
                              f"call.queued of {post_id}", since=mark)
    incident: str = queued["data"]["incident"]
    world.answer(desk_id, rung)
    assert call.wait_final(10).code == 200
    world.wait_event(lambda e: e["type"] == "call.answered" and e["data"]["incident"] == incident, 15,
                     "call.answered", since=mark)
    call.hangup()
    world.wait_event(lambda e: e["type"] == "call.ended" and e["data"]["incident"] == incident, 15, "call.ended",
                     since=mark)
    return incident


def test_full_disk_loses_no_call(world: World) -> None:
    """With the database's disk full, three calls still reach the webhook and the pages, /healthz is degraded at once, and all is stored once space returns."""
    database = world.site.sidecar.database if world.site.sidecar else None
    assert database is not None and database.parent == world.disk.path
    with sqlite3.connect(database) as admin:  # no WAL space left over: the next write needs new blocks
        admin.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    duplicates = world.receiver.duplicates
    filled = world.disk.fill()
    try:
        first = call_through_webhook(world, world.site.posts[0].id)
        health = world.sidecar.health()
        assert health["status"] == "degraded" and health["database"]["error_kind"] == "full", health
        assert any("database or disk is full" in p for p in health["problems"])
        incidents = [first] + [call_through_webhook(world, post.id) for post in world.site.posts[1:]]
        health = world.sidecar.health()
        assert health["database"]["held"]["events"] >= 9 and health["database"]["lost"]["writes"] == 0
        assert Scrape(world.sidecar.metrics()).value("refuge_store_up") == 0
        assert all(world.sidecar.incident(i) is None for i in incidents)  # not in the database yet
        for incident in incidents:
            assert world.of_incident(incident) == ["call.queued", "call.answered", "call.ended"]
            wait_until(lambda i=incident: world.feed.all().count(i) >= 3, 10, "the pages' events")  # type: ignore[misc]
        print(f"disk filled with {filled} bytes; {health['database']['held']['writes']} writes held in memory")
    finally:
        world.disk.free()
    for incident in incidents:
        found = wait_until(lambda i=incident: (x := world.sidecar.incident(i)) and x["state"] == "ended" and x,  # type: ignore[misc]
                           15, "the incident stored once space returned")
        assert found["answered_by"] == "desk-1" and [t["kind"] for t in found["timeline"]][0] == "queued"
    health = wait_until(lambda: (h := world.sidecar.health())["status"] == "ok" and h, 30, "healthy again")
    assert health["database"]["held"]["writes"] == 0 and health["targets"][0]["pending"] == 0
    assert world.receiver.duplicates == duplicates  # delivered from memory, then recorded: never sent twice


# -- what the sidecar shows -----------------------------------------------------------------------------


def test_metrics_show_calls_deliveries_posts_and_cameras(world: World) -> None:
    """/metrics counts calls by outcome, deliveries by target, posts online and camera faults."""
    scrape = Scrape(world.sidecar.metrics())
    assert (scrape.value("refuge_calls_total", outcome="ended") or 0) >= 6
    assert (scrape.value("refuge_deliveries", target=TARGET, status="delivered") or 0) >= 18
    assert scrape.value("refuge_target_up", target=TARGET) == 1
    assert scrape.value("refuge_posts_online") == len(world.site.posts)
    assert scrape.value("refuge_camera_faults") == 0
    assert (scrape.value("refuge_answer_seconds_count") or 0) >= 1
    assert scrape.value("refuge_ami_connected") == 1


def test_camera_password_is_never_shown(world: World) -> None:
    """The camera password is in no log line, API answer, event stream, health or metrics text, nor the database."""
    password = world.camera_password
    sidecar = world.sidecar
    seen = {
        "log": sidecar.log(),
        "events stream": world.feed.all(),
        "/healthz": sidecar.get("/healthz").text,
        "/metrics": sidecar.metrics(),
        "/api/v1/posts": sidecar.get("/api/v1/posts").text,
        "/api/v1/incidents": sidecar.get("/api/v1/incidents?limit=10000").text,
        "/api/v1/incidents csv": sidecar.get("/api/v1/incidents?format=csv").text,
    }
    for post in world.site.posts:
        seen[f"/api/v1/posts/{post.id}"] = sidecar.get(f"/api/v1/posts/{post.id}").text
    assert "call.queued" in seen["events stream"] and "rtsp://" in seen["events stream"]
    assert f"rtsp://{CAMERA_USER}@127.0.0.1:{world.camera.port}/" in seen["log"], "the log names cameras"
    database = world.site.sidecar.database if world.site.sidecar else None
    assert database is not None
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        seen["database"] = "\n".join(str(row) for table in ("events", "incidents", "timeline")
                                     for row in db.execute(f"SELECT * FROM {table}"))  # noqa: S608
    leaks = [where for where, text in seen.items() if password in text]
    assert not leaks, f"the camera password shows in: {leaks}"
    # Only the CCTV target got it.
    assert any(password in str(e["data"]["camera"]["rtsp_url"]) for e in world.received()
               if e["type"] == "call.queued")
