"""Retention with an explicit clock: old events, deliveries and telemetry go, each post's telemetry stays within
its byte budget, incidents stay unless the site says otherwise; and the site file keys that set it."""

from __future__ import annotations

import json
import logging
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sip_refuge.config import load_site
from sip_refuge.config.model import Retention, Site
from sip_refuge.errors import ConfigError
from sip_refuge.sidecar import events as ev
from sip_refuge.sidecar.core import Hub
from sip_refuge.sidecar.outbox import Outbox
from sip_refuge.sidecar.retention import Pruner, TelemetryBudget, prune
from sip_refuge.sidecar.store import Store
from tests.support.receivers import make_site
from tests.support.telemetry import message

NOW = datetime(2027, 6, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)


@pytest.fixture()
def site(tmp_path: Path) -> Site:
    return make_site(tmp_path / "site")  # type: ignore[no-any-return]


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "refuge.sqlite3")


def call(store: Store, site: Site, incident: str, at: datetime, *, ended: bool = True,
         delivered: bool = True) -> None:
    with store.transaction():
        store.open_incident(incident, "sutton-market", at)
        store.add_timeline(incident, "queued", at)
        if ended:
            store.update_incident(incident, state="ended", ended=ev.iso_utc(at), outcome="ended")
        event = ev.build_event(ev.CALL_QUEUED, site, post_id="sutton-market", now=at, incident=incident)
        store.add_event(event, ["hook"], at.timestamp())
    if delivered:
        [head] = [d for d in store.due("hook", at.timestamp() + 1) if d.event.id == event.id]
        store.mark_delivered(head.seq, "hook", at)


def test_old_events_and_telemetry_go_incidents_stay(site: Site, store: Store,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    call(store, site, "old", NOW - 500 * DAY)
    call(store, site, "old-undelivered", NOW - 450 * DAY, delivered=False)
    call(store, site, "recent", NOW - 10 * DAY)
    for days in (40, 31, 29, 1):
        store.add_telemetry("bus-station", NOW - days * DAY, {"kind": "state", "days": days})
    with caplog.at_level(logging.WARNING):
        deleted = prune(store, Retention(events=400 * 86400, telemetry=30 * 86400), NOW)
    assert deleted == {"events": 2, "telemetry": 2}
    assert [e.incident for _, e in store.events_since(0)] == ["recent"]
    assert store.delivery_counts() == {"hook": {"delivered": 1}}
    assert "1 deliveries older than 400 days were still pending" in caplog.text
    assert [b["days"] for _, b in store.telemetry("bus-station")] == [1, 29]
    assert {i.id for i in store.incidents(limit=None)} == {"old", "old-undelivered", "recent"}  # the record
    assert prune(store, Retention(), NOW) == {}  # nothing more to do


def test_incidents_go_only_when_the_site_asks_and_never_a_live_one(site: Site, store: Store) -> None:
    call(store, site, "ended-long-ago", NOW - 800 * DAY)
    call(store, site, "live-long-ago", NOW - 800 * DAY, ended=False)
    call(store, site, "ended-recently", NOW - 20 * DAY)
    deleted = prune(store, Retention(incidents=730 * 86400), NOW)
    assert deleted["incidents"] == 1
    assert {i.id for i in store.incidents(limit=None)} == {"live-long-ago", "ended-recently"}
    assert store.incident("live-long-ago") is not None and store.incident("live-long-ago").timeline  # type: ignore[union-attr]


def test_the_audit_log_keeps_its_own_age(store: Store) -> None:
    for days in (500, 401, 399, 1):
        store.add_audit({"at": ev.iso_utc(NOW - days * DAY), "action": "login", "outcome": "ok", "actor": f"d{days}",
                         "role": "operator", "address": "127.0.0.1", "target": None, "detail": {}})
    assert prune(store, Retention(), NOW) == {"audit": 2}
    assert [e["actor"] for e in store.audit()] == ["d1", "d399"]
    assert prune(store, Retention(audit=30 * 86400), NOW) == {"audit": 1}
    assert [e["actor"] for e in store.audit()] == ["d1"]


def test_each_post_keeps_its_newest_telemetry_within_its_byte_budget(store: Store) -> None:
    for n in range(100):
        store.add_telemetry("sutton-market", NOW, {"n": n, "pad": "x" * 80})  # about 100 bytes each
    store.add_telemetry("bus-station", NOW, {"n": 0})
    prune(store, Retention(telemetry_per_post=1000), NOW)
    kept = [b["n"] for _, b in store.telemetry("sutton-market", limit=1000)]
    assert kept == list(range(99, 99 - len(kept), -1)) and 5 <= len(kept) <= 10
    assert sum(len(json.dumps(b, separators=(",", ":"))) for _, b in store.telemetry("sutton-market", 1000)) <= 1000
    assert len(store.telemetry("bus-station")) == 1


def test_a_post_flooding_telemetry_is_trimmed_as_it_grows(site: Site, store: Store) -> None:
    """Between the hourly prunes, the hub trims a post's history each time it grew by 1/8 of its budget."""
    hub = Hub(site, store, Outbox(store, []), base_url="http://x")
    budget = 64 * 1024
    hub.recorder._telemetry_budget = TelemetryBudget(budget)  # as `retention: {telemetry_per_post: 64KB}` sets it
    report = message("sutton-market", reason="y" * 900)
    for _ in range(400):  # 400 KB sent
        hub.recorder.on_telemetry("sutton-market", report)
    stored = sum(len(json.dumps(b, separators=(",", ":"))) for _, b in store.telemetry("sutton-market", 10_000))
    assert budget // 2 < stored <= budget + budget // 8 + 1000
    assert hub.views.posts()[0]["state"] == "idle"
    hub.close()


def test_the_pruner_runs_at_start_and_reports_what_it_did(site: Site, store: Store) -> None:
    call(store, site, "old", NOW - 500 * DAY)
    pruner = Pruner(store, Retention(), every=3600, clock=lambda: NOW)
    stop = threading.Event()
    thread = threading.Thread(target=pruner.run, args=(stop,))
    thread.start()
    try:
        for _ in range(200):
            if pruner.status().last_run:
                break
            stop.wait(0.05)
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
    status = pruner.status()
    assert status.last_run == ev.iso_utc(NOW) and status.pruned["events"] == 1 and status.last_error is None


# -- site file keys ------------------------------------------------------------------------------------------

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "site.example.yaml"


def site_with(tmp_path: Path, retention: str) -> Path:
    text = EXAMPLE.read_text(encoding="utf-8")
    marker = "  camera_interval: 60s"
    assert marker in text
    path = tmp_path / "site.yaml"
    path.write_text(text.replace(marker, marker + "\n" + retention), encoding="utf-8")
    return path


def test_retention_defaults_keep_incidents_for_ever() -> None:
    site = load_site(EXAMPLE, check_secrets=False)
    assert site.sidecar is not None and site.sidecar.retention == Retention(
        events=400 * 86400, telemetry=30 * 86400, telemetry_per_post=16 << 20, incidents=None, audit=400 * 86400)


def test_retention_keys_are_read(tmp_path: Path) -> None:
    path = site_with(tmp_path, "  retention: {events: 90d, telemetry: 7d, telemetry_per_post: 2MB, incidents: 3650d,"
                               " audit: 730d}")
    site = load_site(path, check_secrets=False)
    assert site.sidecar is not None
    assert site.sidecar.retention == Retention(90 * 86400, 7 * 86400, 2 << 20, 3650 * 86400, 730 * 86400)
    path = site_with(tmp_path, "  retention: {incidents: forever}")
    assert load_site(path, check_secrets=False).sidecar.retention.incidents is None  # type: ignore[union-attr]


def test_bad_retention_keys_are_located(tmp_path: Path) -> None:
    path = site_with(tmp_path, "  retention:\n    events: 2h\n    telemetry_per_post: lots\n    telemetry: 30\n"
                     "    incidnets: 1d\n    audit: 7d")
    with pytest.raises(ConfigError) as raised:
        load_site(path, check_secrets=False)
    lines = [str(p) for p in raised.value.problems]
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if "events: 2h" in t)
    assert f"{path}:{line}: sidecar.retention.events: '2h' is out of range (86400 s to 3153600000 s)" in lines
    assert any(f":{line + 1}: sidecar.retention.telemetry_per_post: 'lots' is not a size" in t for t in lines)
    assert any(f":{line + 2}: sidecar.retention.telemetry: 30 is out of range" in t for t in lines)
    assert any(f":{line + 3}: sidecar.retention.incidnets: unknown key; did you mean 'incidents'?" in t
               for t in lines)
    assert any(f":{line + 4}: sidecar.retention.audit: '7d' is out of range (2592000 s" in t for t in lines)
