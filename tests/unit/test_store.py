"""The store (schema, WAL, incidents, exports, status) and the outbox driven on it with an explicit ``now``."""

from __future__ import annotations

import csv
import io
import json
import logging
import random
import sqlite3
import subprocess
import sys
import textwrap
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sip_refuge.config.model import Site
from sip_refuge.config.secrets import Masker
from sip_refuge.errors import SidecarError
from sip_refuge.sidecar import events as ev
from sip_refuge.sidecar import export
from sip_refuge.sidecar.migrations import MIGRATIONS
from sip_refuge.sidecar.outbox import Backoff, Outbox
from sip_refuge.sidecar.store import CameraStatus, PostStatus, Store
from tests.support.hubs import ScriptedTarget
from tests.support.receivers import make_site

T0 = datetime(2026, 11, 26, 21, 0, 0, tzinfo=UTC)
NOW = 1_800_000_000.0


@pytest.fixture()
def site(tmp_path: Path) -> Site:
    site: Site = make_site(tmp_path)
    return site


def call(site: Site, incident: str, minutes: int = 0, post: str = "sutton-market") -> list[ev.Event]:
    at = T0 + timedelta(minutes=minutes)
    return [ev.build_event(ev.CALL_QUEUED, site, post_id=post, now=at, incident=incident),
            ev.build_event(ev.CALL_ANSWERED, site, post_id=post, now=at, incident=incident, desk_id="desk-1"),
            ev.build_event(ev.CALL_ENDED, site, post_id=post, now=at, incident=incident, desk_id="desk-1")]


# -- schema and pragmas ---------------------------------------------------------------------------------

def test_migrates_an_empty_file_to_the_latest_version_in_wal_mode(store: Store) -> None:
    assert store.schema_version() == len(MIGRATIONS) >= 1
    assert store.journal_mode() == "wal"
    db = sqlite3.connect(store.path)
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"incidents", "timeline", "events", "deliveries", "post_status", "camera_status", "telemetry"} <= tables
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent, seen by other connections
    db.close()


def test_reopening_keeps_data_and_does_not_migrate_again(store: Store, site: Site) -> None:
    store.add_event(call(site, "inc-1")[0], ["hook"], NOW)
    store.close()
    again = Store(store.path)
    assert again.schema_version() == len(MIGRATIONS) and again.pending_count("hook") == 1


def test_a_newer_schema_is_refused(store: Store) -> None:
    store.close()
    db = sqlite3.connect(store.path)
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.close()
    with pytest.raises(SidecarError, match="newer than this sip-refuge"):
        Store(store.path)


def test_a_failed_transaction_leaves_nothing(store: Store, site: Site) -> None:
    with pytest.raises(RuntimeError), store.transaction():
        store.open_incident("inc-1", "sutton-market", T0)
        store.add_event(call(site, "inc-1")[0], ["hook"], NOW)
        raise RuntimeError("crash between the incident and its event")
    assert store.incident("inc-1") is None and store.pending_count("hook") == 0


# -- events and deliveries ------------------------------------------------------------------------------

def test_each_event_is_stored_once_with_a_delivery_per_target(store: Store, site: Site) -> None:
    event = call(site, "inc-1")[0]
    assert store.add_event(event, ["hook", "vlc"], NOW) is True
    assert store.add_event(event, ["hook", "vlc"], NOW) is False
    assert store.event(event.id) == ev.event_from_json(event.id, "inc-1", "sutton-market", event.to_json())
    assert store.delivery_counts() == {"hook": {"pending": 1}, "vlc": {"pending": 1}}
    assert [e.id for _, e in store.events_since(0)] == [event.id]


def test_only_the_head_of_each_stream_is_due(store: Store, site: Site) -> None:
    first, second = call(site, "inc-1"), call(site, "inc-2", post="bus-station")
    for a, b in zip(first, second, strict=True):
        store.add_event(a, ["hook"], NOW)
        store.add_event(b, ["hook"], NOW)
    due = store.due("hook", NOW)
    assert [d.event.id for d in due] == [first[0].id, second[0].id]
    store.mark_failed(due[0].seq, "hook", "refused", NOW + 10)
    store.mark_delivered(due[1].seq, "hook", T0)
    # inc-1 waits for its head's retry; inc-2 moves on; nothing of inc-1 overtakes its head.
    assert [d.event.id for d in store.due("hook", NOW)] == [second[1].id]
    assert store.next_attempt("hook") == NOW
    assert [d.event.id for d in store.due("hook", NOW + 10)] == [first[0].id, second[1].id]
    assert store.due("hook", NOW + 10)[0].attempts == 1


# -- the outbox on the store, with an explicit now --------------------------------------------------------

def test_outbox_retries_with_capped_backoff_and_keeps_order(store: Store, site: Site,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    hook = ScriptedTarget("hook")
    outbox = Outbox(store, [hook], backoff=Backoff(base=1, cap=8), rng=random.Random(1), mask=Masker.for_site(site))
    events = call(site, "inc-1")
    for event in events:
        outbox.publish(event)
    hook.down = True
    now, delays = NOW, []
    with caplog.at_level(logging.WARNING):
        for _ in range(6):
            next_due = outbox.step(now)
            assert next_due is not None
            delays.append(next_due - now)
            now = next_due
    assert set(hook.attempts) == {events[0].id}  # the later events never go before the first
    for attempt, delay in enumerate(delays, start=1):
        ceiling = min(8, 2 ** (attempt - 1))
        assert ceiling / 2 <= delay <= ceiling
    status = outbox.status()[0]
    assert (status.pending, status.failed, status.delivered, status.consecutive_failures) == (3, 6, 0, 6)
    assert status.last_error == "hook: refused *** at rtsp://viewer:***@x"
    assert "S3cret" not in caplog.text and "refused *** at rtsp://viewer:***@x" in caplog.text
    hook.down = False
    assert outbox.step(now) is None
    assert [e.id for e in hook.accepted] == [e.id for e in events]
    status = outbox.status()[0]
    assert (status.pending, status.delivered, status.consecutive_failures) == (0, 3, 0)


def test_only_targets_that_open_the_stream_get_the_camera_password(store: Store, site: Site) -> None:
    vms, page = ScriptedTarget("vms", reveal=True), ScriptedTarget("page")
    outbox = Outbox(store, [vms, page], reveal=ev.Revealer(site))
    outbox.publish(call(site, "inc-1")[0])
    outbox.step(NOW)
    assert "%21pw" in vms.accepted[0].body["data"]["camera"]["rtsp_url"]
    assert page.accepted[0].body["data"]["camera"]["rtsp_url"] == "rtsp://viewer@10.20.5.11:554/stream1"
    assert "%21pw" not in json.dumps([e.to_json() for _, e in store.events_since()])


def test_duplicate_target_names_are_refused(store: Store) -> None:
    with pytest.raises(SidecarError, match="unique"):
        Outbox(store, [ScriptedTarget("a"), ScriptedTarget("a")])


CRASHER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from tests.support.receivers import make_site
    from sip_refuge.sidecar import events as ev
    from sip_refuge.sidecar.outbox import Outbox
    from sip_refuge.sidecar.store import Store
    from datetime import UTC, datetime

    class DiesMidDelivery:
        name, reveal_credentials, seen = "hook", False, 0
        def deliver(self, event):
            self.seen += 1
            if self.seen == 2:
                os.kill(os.getpid(), signal.SIGKILL)  # a crash while the second event is on the wire
        def close(self): pass

    site = make_site(Path(sys.argv[1]))
    outbox = Outbox(Store(sys.argv[2]), [DiesMidDelivery()])
    for i, t in enumerate((ev.CALL_QUEUED, ev.CALL_ANSWERED, ev.CALL_ENDED)):
        outbox.publish(ev.build_event(t, site, post_id="sutton-market", now=datetime.now(UTC),
                                      incident="inc-1", desk_id="desk-1", event_id=f"evt_{i}"))
    outbox.step(0.0 + 2e9)
""")


def test_a_killed_process_resumes_from_the_database(tmp_path: Path) -> None:
    """SIGKILL in the middle of a delivery: a new Store and Outbox on the same file resume, at-least-once."""
    sitedir = tmp_path / "site"
    sitedir.mkdir()
    db = tmp_path / "refuge.sqlite3"
    proc = subprocess.run([sys.executable, "-c", CRASHER, str(sitedir), str(db)], cwd=Path(__file__).parents[2],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    store = Store(db)
    assert store.pending_count("hook") == 2 and store.last_delivered("hook") is not None
    hook = ScriptedTarget("hook")
    assert Outbox(store, [hook]).step(2e9) is None
    assert [e.id for e in hook.accepted] == ["evt_1", "evt_2"]  # evt_1 again (it was on the wire), in order


# -- incidents and exports -------------------------------------------------------------------------------

def fill_incidents(store: Store) -> None:
    with store.transaction():
        assert store.open_incident("inc-1", "sutton-market", T0, state="queued")
        assert not store.open_incident("inc-1", "sutton-market", T0)
        store.add_timeline("inc-1", "pressed", T0 - timedelta(seconds=1), {"source": "telemetry"})
        store.add_timeline("inc-1", "queued", T0)
        store.add_timeline("inc-1", "rung", T0 + timedelta(seconds=1), {"desk": "desk-1"})
        store.add_timeline("inc-1", "answered", T0 + timedelta(seconds=4), {"desk": "desk-1"})
        store.update_incident("inc-1", state="answered", answered_by="desk-1",
                              answered_at=ev.iso_utc(T0 + timedelta(seconds=4)))
        store.add_timeline("inc-1", "ended", T0 + timedelta(seconds=60))
        store.update_incident("inc-1", state="ended", ended=ev.iso_utc(T0 + timedelta(seconds=60)),
                              outcome="answered")
    store.open_incident("inc-2", "bus-station", T0 + timedelta(hours=1))
    store.add_timeline("inc-2", "overflowed", T0 + timedelta(hours=1, seconds=30), {"to": "7001"})
    store.update_incident("inc-2", state="ended", outcome="overflowed")


def test_incidents_come_back_newest_first_with_timelines(store: Store) -> None:
    fill_incidents(store)
    newest, oldest = store.incidents()
    assert (newest.id, oldest.id) == ("inc-2", "inc-1")
    assert [t.kind for t in oldest.timeline] == ["pressed", "queued", "rung", "answered", "ended"]
    assert oldest.timeline[2].detail == {"desk": "desk-1"}
    assert (oldest.answered_by, oldest.outcome, oldest.ended) == ("desk-1", "answered", "2026-11-26T21:01:00.000Z")
    assert [i.id for i in store.incidents(post_id="bus-station")] == ["inc-2"]
    with pytest.raises(SidecarError, match="unknown incident fields: colour"):
        store.update_incident("inc-1", colour="red")


def test_export_json_and_csv(store: Store) -> None:
    fill_incidents(store)
    out = io.StringIO()
    export.write_json(store.incidents(limit=None), out)
    exported = json.loads(out.getvalue())
    assert exported[1]["id"] == "inc-1" and exported[1]["timeline"][0] == {
        "at": "2026-11-26T20:59:59.000Z", "kind": "pressed", "detail": {"source": "telemetry"}}
    out = io.StringIO()
    export.write_csv(store.incidents(limit=None), out)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [r["id"] for r in rows] == ["inc-2", "inc-1"]
    assert rows[1]["outcome"] == "answered" and rows[1]["answered_by"] == "desk-1"
    assert rows[1]["timeline"].startswith('2026-11-26T20:59:59.000Z pressed {"source": "telemetry"}; ')
    assert rows[0]["timeline"] == '2026-11-26T22:00:30.000Z overflowed {"to": "7001"}'


# -- status, telemetry, threads --------------------------------------------------------------------------

def test_post_and_camera_status_and_telemetry(store: Store) -> None:
    store.save_post_status(PostStatus("sutton-market", ev.iso_utc(T0), online=True, state="idle",
                                      contact="sip:sutton-market@10.0.0.5"))
    store.save_post_status(PostStatus("sutton-market", ev.iso_utc(T0), online=False))
    store.save_camera_status(CameraStatus("sutton-market", ev.iso_utc(T0), ok=False, reason="black image",
                                          detail={"mean": 1.5}))
    assert store.post_statuses()["sutton-market"].online is False
    assert store.camera_statuses()["sutton-market"] == CameraStatus("sutton-market", ev.iso_utc(T0), False,
                                                                    "black image", {"mean": 1.5})
    store.add_telemetry("sutton-market", T0, {"state": "idle"})
    store.add_telemetry("sutton-market", T0 + timedelta(seconds=5), {"state": "queued"})
    assert [b["state"] for _, b in store.telemetry("sutton-market")] == ["queued", "idle"]


def test_writers_on_many_threads(store: Store, site: Site) -> None:
    def write(n: int) -> None:
        for i in range(25):
            store.open_incident(f"inc-{n}-{i}", "sutton-market", T0)
            store.add_event(call(site, f"inc-{n}-{i}")[0], ["hook"], NOW)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(store.incidents(limit=None)) == 100 and store.pending_count("hook") == 100
