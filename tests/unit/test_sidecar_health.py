"""Sidecar health: AMI login refusals and resync retries, /healthz problems, /metrics from SQL aggregates,
post faults, camera routes and the snapshot cache."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient
from panoramisk.message import Message

from sip_refuge.config import Site
from sip_refuge.config.model import Retention
from sip_refuge.sidecar.ami import AmiFollower, Snapshot
from sip_refuge.sidecar.cameras import CameraError
from sip_refuge.sidecar.core import Hub
from sip_refuge.sidecar.outbox import Outbox, TargetStatus
from sip_refuge.sidecar.snapshots import SnapshotCache
from sip_refuge.sidecar.store import Store
from sip_refuge.sidecar.web import create_app
from tests.support.metrics import Scrape
from tests.support.telemetry import report

TOKEN = "t0ken-for-the-health-tests-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture()
def client(hub: Hub) -> FlaskClient:
    return create_app(hub, token=TOKEN).test_client()


def follower(site: Site, hub: Hub | None = None, **options: Any) -> AmiFollower:
    return AmiFollower(site.pbx.ami, site.queue.name, on_event=lambda e: None,
                       on_resync=hub.recorder.on_resync if hub else lambda s: None,
                       on_link=hub.link.on_link if hub else lambda up: None,
                       on_error=hub.link.on_error if hub else None, **options)


# -- M1: a refused AMI login ----------------------------------------------------------------------------

class FakeManager:
    def __init__(self, fail: int = 0) -> None:
        self.authenticated_future: asyncio.Future[Any] | None = None
        self.fail = fail  # how many actions fail before they work
        self.actions: list[str] = []

    async def send_action(self, action: dict[str, str]) -> Message:
        self.actions.append(action["Action"])
        if self.fail:
            self.fail -= 1
            raise ConnectionError("AMI went quiet")
        return Message({"Response": "Success"})


def test_refused_login_is_logged_once_per_reason_and_shown_in_healthz(
        site: Site, hub: Hub, client: FlaskClient, caplog: pytest.LogCaptureFixture) -> None:
    ami = follower(site, hub)
    manager = FakeManager()
    loop = asyncio.new_event_loop()

    async def login(reason: str) -> None:
        # What panoramisk does on connect: send Login, then call on_connect; its own callback drops a failure.
        future = loop.create_future()
        manager.authenticated_future = future
        ami._connected(manager)  # type: ignore[arg-type]
        future.set_result(Message({"Response": "Error", "Message": reason}))
        await future
        await asyncio.sleep(0)

    try:
        with caplog.at_level(logging.INFO, logger="sip_refuge.sidecar.ami"):
            for reason in ("Authentication failed", "Authentication failed", "Too many sessions"):
                loop.run_until_complete(login(reason))
    finally:
        loop.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    user = site.pbx.ami.username
    assert errors == [f"AMI login as {user} refused: Authentication failed",
                      f"AMI login as {user} refused: Too many sessions"]
    assert ami.last_error == f"AMI login as {user} refused: Too many sessions"
    health = client.get("/healthz")
    body = health.get_json()
    assert health.status_code == 503 and body["status"] == "degraded"
    assert body["ami"]["last_error"] == ami.last_error and body["ami"]["last_error_at"]
    assert any(p.startswith("ami: not connected") and "Too many sessions" in p for p in body["problems"])


def test_a_successful_login_answer_is_no_error(site: Site) -> None:
    ami = follower(site)
    loop = asyncio.new_event_loop()
    try:
        future = loop.create_future()
        future.set_result(Message({"Response": "Success", "Message": "Authentication accepted"}))
        ami._login_answered(future)
    finally:
        loop.close()
    assert ami.last_error is None


# -- M2: a failed resync is retried while the link stays up ---------------------------------------------

def test_failed_resync_is_retried_until_it_works(site: Site, hub: Hub, client: FlaskClient) -> None:
    errors: list[str | None] = []
    resynced = asyncio.Event()  # set on the follower's loop, where resyncs are applied

    def on_resync(snap: Snapshot) -> None:
        hub.recorder.on_resync(snap)
        resynced.set()

    def on_error(error: str | None) -> None:
        errors.append(error)
        hub.link.on_error(error)

    ami = AmiFollower(site.pbx.ami, site.queue.name, on_event=lambda e: None, on_resync=on_resync,
                      on_link=hub.link.on_link, on_error=on_error, resync_retry=0.01)
    manager = FakeManager(fail=2)  # the first two attempts fail at their first action
    loop = asyncio.new_event_loop()

    async def scenario() -> None:
        ami.connected = True
        hub.link.on_link(True)
        await ami._resync(manager)  # type: ignore[arg-type]
        await resynced.wait()  # the retries run on this loop's timers

    try:
        loop.run_until_complete(asyncio.wait_for(scenario(), timeout=10))
    finally:
        loop.close()
    assert manager.actions.count("PJSIPShowContacts") == 3
    assert errors == ["AMI resync failed", None] and ami.last_error is None
    assert ami.resynced_at is not None
    body = client.get("/healthz").get_json()
    assert body["status"] == "ok" and body["ami"]["resynced_at"] and body["ami"]["last_error"] is None


def test_no_resync_retry_once_the_link_is_down(site: Site) -> None:
    ami = follower(site, resync_retry=0.01)
    manager = FakeManager(fail=1)
    loop = asyncio.new_event_loop()
    try:
        ami.connected = False
        loop.run_until_complete(ami._resync(manager))  # type: ignore[arg-type]
        assert ami._resync_retry is None  # the next login resyncs
        ami.connected = True
        manager.fail = 1
        loop.run_until_complete(ami._resync(manager))  # type: ignore[arg-type]
        assert ami._resync_retry is not None
        ami._lost(manager, None)  # type: ignore[arg-type]
        assert ami._resync_retry is None
    finally:
        loop.close()


# -- M6: /healthz problems --------------------------------------------------------------------------------

class FakeCameraState:
    def __init__(self, ok: bool | None) -> None:
        self.ok = ok


class FakeMonitor:
    def states(self) -> dict[str, FakeCameraState]:
        return {"sutton-market": FakeCameraState(False), "idlewells": FakeCameraState(True),
                "kirkby-bus-station": FakeCameraState(None)}

    def thumbnail(self, post_id: str) -> bytes | None:
        raise CameraError(f"post {post_id} has no camera")

    def mjpeg(self, post_id: str, stop: threading.Event) -> Iterator[bytes]:
        raise CameraError(f"post {post_id} has no camera")


def test_healthz_is_degraded_by_a_failing_target_and_shows_cameras(
        hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    client = create_app(hub, token=TOKEN, cameras=FakeMonitor()).test_client()
    hub.link.on_link(True)
    statuses = [TargetStatus("vms-hook", consecutive_failures=2, last_error="HTTP 500"),
                TargetStatus("xprotect", consecutive_failures=3, last_error="refused")]
    monkeypatch.setattr(hub.outbox, "status", lambda: statuses)
    reply = client.get("/healthz")
    body = reply.get_json()
    assert reply.status_code == 503 and body["status"] == "degraded"
    assert body["problems"] == ["target xprotect: 3 failed attempts in a row (refused)"]
    assert body["cameras"] == {"count": 3, "in_fault": 1, "faulty": ["sutton-market"], "unknown": 1}
    statuses[1] = TargetStatus("xprotect", consecutive_failures=0)
    reply = client.get("/healthz")
    assert reply.status_code == 200 and reply.get_json()["problems"] == []


def test_healthz_without_camera_checks_has_no_camera_summary(client: FlaskClient, hub: Hub) -> None:
    hub.link.on_link(True)
    assert client.get("/healthz").get_json()["cameras"] is None


# -- Low: camera routes for a post without a camera ---------------------------------------------------------

def test_camera_routes_answer_404_for_a_post_without_a_camera(hub: Hub) -> None:
    client = create_app(hub, token=TOKEN, cameras=FakeMonitor()).test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {TOKEN}"  # cameras need a login or the token
    assert client.get("/cameras/idlewells/live.mjpeg").status_code == 404
    assert client.get("/cameras/idlewells/thumbnail.jpg").status_code == 404
    assert client.get("/cameras/nope/live.mjpeg").status_code == 404


# -- M3: post faults and self-tests in /metrics -------------------------------------------------------------

def test_metrics_show_post_faults_and_the_last_self_test(client: FlaskClient) -> None:
    url = "/api/v1/posts/{}/telemetry"
    client.post(url.format("idlewells"), headers=AUTH,
                json=report("idlewells", "fault", faults=["tamper", "button_stuck", "tamper"],
                            last_self_test={"at": "2024-01-01T00:00:00Z", "passed": True}))
    client.post(url.format("sutton-market"), headers=AUTH,
                json=report("sutton-market", "selftest", result="fail", passed=False, detail="no echo",
                            last_self_test={"at": "2024-01-01T00:00:00Z", "passed": False, "detail": "no echo"}))
    refused = client.post(url.format("kirkby-bus-station"), headers=AUTH,
                          json=report("kirkby-bus-station", faults="tamper"))
    assert refused.status_code == 422
    text = client.get("/metrics").data.decode()
    scrape = Scrape(text)
    assert scrape.value("refuge_post_fault", post="idlewells", fault="button_stuck") == 1
    assert scrape.value("refuge_post_fault", post="idlewells", fault="tamper") == 1
    assert sorted(f["fault"] for f in scrape.labelled("refuge_post_fault")) == ["button_stuck", "tamper"]
    assert "kirkby-bus-station" not in "".join(line for line in text.splitlines() if "refuge_post_fault{" in line)
    assert scrape.value("refuge_selftest_ok", post="idlewells") == 1
    assert scrape.value("refuge_selftest_ok", post="sutton-market") == 0
    assert scrape.value("refuge_selftest_ok", post="kirkby-bus-station") is None  # unknown: absent
    client.post(url.format("idlewells"), headers=AUTH, json=report("idlewells", "fault", active=False, faults=[]))
    assert "refuge_post_fault{" not in client.get("/metrics").data.decode()


# -- M4: /metrics from SQL aggregates; no unbounded IN list ---------------------------------------------------

def fill(store: Store, count: int) -> list[float]:
    """``count`` incidents: every third still queued, the rest answered (a wait of i % 70 s) and ended."""
    start = datetime(2024, 1, 1, tzinfo=UTC)
    waits = []
    with store.transaction():
        for i in range(count):
            at = start + timedelta(seconds=i)
            incident = f"inc-{i:05d}"
            store.open_incident(incident, "idlewells", at)
            store.add_timeline(incident, "queued", at)
            if i % 3 == 0:
                continue
            wait = float(i % 70)
            waits.append(wait)
            store.add_timeline(incident, "answered", at, {"wait_seconds": wait})
            store.add_timeline(incident, "answered", at, {"wait_seconds": 999})  # only the first counts
            store.update_incident(incident, state="ended", outcome="ended" if i % 2 else "abandoned")
    return waits


def test_store_aggregates_outcomes_and_answer_waits_in_sql() -> None:
    with Store(":memory:") as store:
        waits = fill(store, 1200)
        store.open_incident("odd", "idlewells", datetime(2025, 1, 1, tzinfo=UTC))
        store.add_timeline("odd", "answered", datetime(2025, 1, 1, tzinfo=UTC), {"wait_seconds": "soon"})
        counts = store.outcome_counts()
        assert counts == {"queued": 401, "ended": 400, "abandoned": 400}
        within, total, count = store.answer_waits((5, 30, 120))
        assert count == len(waits) and total == pytest.approx(sum(waits))
        assert within == {b: sum(1 for w in waits if w <= b) for b in (5, 30, 120)}
        # Every incident's timeline, across the chunks of the IN list.
        incidents = store.incidents(limit=None)
        assert len(incidents) == 1201
        assert all(len(i.timeline) == (1 if int(i.id[4:]) % 3 == 0 else 3)
                   for i in incidents if i.id.startswith("inc-"))


def test_metrics_do_not_load_the_incident_history(client: FlaskClient, hub: Hub,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    waits = fill(hub.store, 30)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("/metrics must not load incidents")

    monkeypatch.setattr(hub.store, "incidents", refuse)
    text = client.get("/metrics").data.decode()
    assert 'refuge_calls_total{outcome="queued"} 10' in text
    assert f"refuge_answer_seconds_count {len(waits)}" in text
    assert f'refuge_answer_seconds_bucket{{le="+Inf"}} {len(waits)}' in text
    assert f'refuge_answer_seconds_bucket{{le="5"}} {sum(1 for w in waits if w <= 5)}' in text
    assert f"refuge_answer_seconds_sum {sum(waits):g}" in text


# -- M5: the snapshot cache and its single worker --------------------------------------------------------------

def test_snapshots_are_bounded_and_taken_by_one_worker() -> None:
    threads: set[str] = set()

    def source(post_id: str) -> bytes:
        threads.add(threading.current_thread().name)
        return f"jpeg of {post_id}".encode()

    cache = SnapshotCache(source, kept=5)
    for i in range(8):
        cache.take(f"inc-{i}", "idlewells")
    assert cache.get("inc-7") is None  # nothing is taken until the runner starts the worker
    worker = threading.Thread(target=cache.run, name="snapshots")
    worker.start()
    assert cache.get("inc-7", wait=10) == b"jpeg of idlewells"  # jobs run in order: all done now
    assert threads == {"snapshots"}
    assert [cache.get(f"inc-{i}") for i in range(3)] == [None, None, None]
    assert all(cache.get(f"inc-{i}") for i in range(3, 8))
    cache.close()
    worker.join(10)
    assert not worker.is_alive()
    cache.take("late", "idlewells")  # after close: no snapshot
    assert cache.get("late", wait=0.1) is None


# -- /metrics made by prometheus_client ------------------------------------------------------------------------

SPEC_FAMILIES = {  # docs/spec.md section 7, HTTP: every family, its type and its labels
    "refuge_calls": ("counter", {"outcome"}), "refuge_answer_seconds": ("histogram", {"le"}),
    "refuge_deliveries": ("gauge", {"target", "status"}),
    "refuge_delivery_attempts_failed": ("counter", {"target"}), "refuge_target_up": ("gauge", {"target"}),
    "refuge_posts_online": ("gauge", set()), "refuge_post_up": ("gauge", {"post"}),
    "refuge_post_fault": ("gauge", {"post", "fault"}), "refuge_selftest_ok": ("gauge", {"post"}),
    "refuge_camera_faults": ("gauge", set()), "refuge_ami_connected": ("gauge", set()),
    "refuge_store_up": ("gauge", set()), "refuge_store_errors": ("counter", set()),
    "refuge_store_held_writes": ("gauge", set()), "refuge_store_held_bytes": ("gauge", set()),
    "refuge_store_lost_writes": ("counter", {"kind"}), "refuge_store_pruned": ("counter", {"table"}),
    "refuge_http_connections": ("gauge", set()), "refuge_http_connections_limit": ("gauge", set()),
    "refuge_http_workers_busy": ("gauge", set()), "refuge_http_workers_limit": ("gauge", set()),
    "refuge_http_streams": ("gauge", {"kind"}), "refuge_http_streams_limit": ("gauge", {"kind"}),
    "refuge_http_refused": ("counter", {"cap"}), "refuge_http_rejected": ("counter", {"reason"}),
    "refuge_http_timeouts": ("counter", {"phase"}),
    "refuge_incidents_closed": ("counter", {"reason"}), "refuge_calls_live": ("gauge", {"state"}),
}


def test_metrics_keep_every_family_type_and_label_of_the_spec(site: Site) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from sip_refuge.config.model import HttpLimits
    from sip_refuge.sidecar.retention import Pruner
    from sip_refuge.sidecar.web.admission import Admission
    from tests.support.hubs import ScriptedTarget

    with Store(":memory:") as store:
        hub = Hub(site, store, Outbox(store, [ScriptedTarget("hook")]), base_url="http://x")
        hub.pruner = Pruner(store, site.sidecar.retention if site.sidecar else Retention())
        admission = Admission(HttpLimits())
        admission.refused("per_client")
        admission.rejected("body_too_large")
        admission.timed_out("header")
        client = create_app(hub, token=TOKEN, http=admission.status).test_client()
        client.post("/api/v1/posts/idlewells/telemetry", headers=AUTH,
                    json=report("idlewells", "fault", faults=["tamper"],
                                last_self_test={"at": "2024-01-01T00:00:00Z", "passed": True}))
        hub.recorder.on_ami_event({"Event": "QueueCallerJoin", "Queue": "refuge", "Uniqueid": "1.1",
                                   "Channel": "PJSIP/idlewells-00000001"})
        hub.recorder.on_ami_event({"Event": "AgentConnect", "Uniqueid": "1.1", "Interface": "PJSIP/desk-1"})
        hub.outbox.step(0.0)
        answer = client.get("/metrics")
        assert answer.content_type == "text/plain; version=0.0.4; charset=utf-8"
        families = {f.name: f for f in text_string_to_metric_families(answer.data.decode())}
        for name, (kind, labels) in SPEC_FAMILIES.items():
            assert name in families, f"{name} is missing"
            family = families[name]
            assert family.type == kind, name
            assert all(set(s.labels) == labels for s in family.samples if not s.name.endswith(("_sum", "_count"))), \
                (name, [s.labels for s in family.samples])
        assert Scrape(answer.data.decode()).value("refuge_calls_live", state="answered") == 1
        # A scraper that asks for OpenMetrics gets it.
        openmetrics = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        assert openmetrics.content_type.startswith("application/openmetrics-text")
        assert openmetrics.data.decode().rstrip().endswith("# EOF")
        hub.close()
