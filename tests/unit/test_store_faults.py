"""The store never loses an event silently: a real full disk (a tmpfs filled up), bounded memory for the writes
it holds meanwhile, and database files that cannot be trusted (damaged pages, empty, not SQLite) refused."""

from __future__ import annotations

import logging
import queue
import random
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from sip_refuge.config import load_site
from sip_refuge.config.model import Site
from sip_refuge.config.secrets import init_secrets
from sip_refuge.errors import SidecarError
from sip_refuge.sidecar import events as ev
from sip_refuge.sidecar.backlog import Backlog
from sip_refuge.sidecar.core import Hub
from sip_refuge.sidecar.outbox import Outbox
from sip_refuge.sidecar.store import Store, StoreError
from sip_refuge.sidecar.web import create_app
from tests.support.clock import Clock
from tests.support.disk import SmallDisk
from tests.support.hubs import ScriptedTarget
from tests.support.receivers import make_site
from tests.support.telemetry import message

TOKEN = "t0ken-for-the-store-fault-tests-0123"
T0 = 1_800_000_000.0
REPO = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).with_name("sip-refuge")


@pytest.fixture()
def site(tmp_path: Path) -> Site:
    return make_site(tmp_path / "site")  # type: ignore[no-any-return]


@pytest.fixture()
def disk(tmp_path: Path) -> Iterator[SmallDisk]:
    with SmallDisk(tmp_path / "disk", "2m") as small:
        yield small


class Sidecar:
    """A hub on a real store, with one scripted CCTV target, a live page and the web app."""

    def __init__(self, site: Site, db: Path, backlog: Backlog | None = None) -> None:
        self.clock = Clock(T0)
        self.store = Store(db)
        self.hook = ScriptedTarget("hook")
        self.outbox = Outbox(self.store, [self.hook], clock=self.clock, backlog=backlog)
        self.hub = Hub(site, self.store, self.outbox, base_url="http://127.0.0.1:8080")
        self.hub.link.on_link(True)
        self.page = self.hub.fanout.subscribe()
        self.client: FlaskClient = create_app(self.hub, token=TOKEN).test_client()

    def call(self, uid: str, post: str = "sutton-market") -> None:
        """Asterisk's events of one answered call (the tracker turns them into queued, answered, ended)."""
        for event in ({"Event": "QueueCallerJoin", "Queue": "refuge", "Channel": f"PJSIP/{post}-0000001a",
                       "Uniqueid": uid, "Position": "1"},
                      {"Event": "AgentCalled", "Uniqueid": uid, "Interface": "PJSIP/desk-1"},
                      {"Event": "AgentConnect", "Uniqueid": uid, "Interface": "PJSIP/desk-1"},
                      {"Event": "AgentComplete", "Uniqueid": uid, "Reason": "agent"},
                      {"Event": "Hangup", "Uniqueid": uid}):
            self.hub.recorder.on_ami_event(event)

    def paged(self) -> list[str]:
        out: list[str] = []
        while True:
            try:
                event = self.page.get_nowait()
            except queue.Empty:
                return out
            if event is not None and event.type not in ("post.status", "call.updated"):  # hints, not events
                out.append(event.type)

    def close(self) -> None:
        self.hub.close()
        self.outbox.close()
        self.store.close()


def truncate_wal(db: Path) -> None:
    """Give back the WAL's space, so the very next write needs new blocks on the (then full) disk."""
    with sqlite3.connect(db) as other:
        other.execute("PRAGMA wal_checkpoint(TRUNCATE)")


# -- a real full disk -----------------------------------------------------------------------------------------

def test_full_disk_degrades_health_at_once_delivers_from_memory_and_stores_when_space_returns(
        site: Site, disk: SmallDisk, caplog: pytest.LogCaptureFixture) -> None:
    side = Sidecar(site, disk.path / "refuge.sqlite3")
    try:
        assert side.client.get("/healthz").status_code == 200
        truncate_wal(disk.path / "refuge.sqlite3")
        disk.fill()
        with caplog.at_level(logging.ERROR):
            for n in range(3):
                side.call(f"1700000000.{n}", post=("sutton-market", "bus-station")[n % 2])
        assert "database or disk is full" in caplog.text

        reply = side.client.get("/healthz")
        body = reply.get_json()
        assert reply.status_code == 503 and body["status"] == "degraded"
        assert body["database"]["ok"] is False and body["database"]["error_kind"] == "full"
        assert body["database"]["held"]["events"] == 9 and body["database"]["lost"]["writes"] == 0
        assert any("database or disk is full" in p for p in body["problems"])
        assert any("held in memory" in p for p in body["problems"])
        assert "refuge_store_up 0" in side.client.get("/metrics").data.decode()
        assert side.store.incidents() == []  # nothing reached the file...

        # ...yet the page and the CCTV target got every event, each incident's in order.
        assert side.paged() == ["call.queued", "call.answered", "call.ended"] * 3
        assert side.outbox.step(side.clock.now) is None
        by_incident: dict[str, list[str]] = {}
        for event in side.hook.accepted:
            by_incident.setdefault(str(event.incident), []).append(event.type)
        assert list(by_incident.values()) == [["call.queued", "call.answered", "call.ended"]] * 3

        disk.free()
        side.clock.now += 2  # the next attempt at storing what is held
        side.hub.recorder.tick()
        stored = side.store.incidents()
        assert sorted(i.id for i in stored) == sorted(by_incident)
        assert all(i.state == "ended" and i.answered_by == "desk-1" for i in stored)
        assert all([t.kind for t in i.timeline] == ["queued", "desk_rung", "answered", "ended"] for i in stored)
        side.outbox.step(side.clock.now)
        assert len(side.hook.accepted) == 9  # recorded as delivered, not sent again
        assert side.store.delivery_counts() == {"hook": {"delivered": 9}}
        reply = side.client.get("/healthz")
        assert reply.status_code == 200, reply.get_json()["problems"]
        assert reply.get_json()["database"]["held"]["writes"] == 0
    finally:
        side.close()


def test_full_memory_gives_up_telemetry_first_and_reports_a_lost_call_loudly(
        site: Site, disk: SmallDisk, caplog: pytest.LogCaptureFixture) -> None:
    side = Sidecar(site, disk.path / "refuge.sqlite3", backlog=Backlog(limit=16_000))
    try:
        truncate_wal(disk.path / "refuge.sqlite3")
        disk.fill()
        report = message("bus-station", reason="x" * 900)
        for _ in range(40):  # a flood of reports from one post
            side.hub.recorder.on_telemetry("bus-station", report)
        held = side.outbox.backlog.status()
        assert held.lost.get("telemetry", 0) > 0 and held.bytes <= held.limit
        side.call("1700000000.1")  # fits: telemetry makes room
        assert side.outbox.backlog.status().lost.get("call", 0) == 0
        with caplog.at_level(logging.ERROR):
            for n in range(2, 12):
                side.call(f"1700000000.{n}")
        lost = side.outbox.backlog.status().lost.get("call", 0)
        assert lost > 0 and "LOST" in caplog.text and "call.queued" in caplog.text
        body = side.client.get("/healthz").get_json()
        assert any("LOST" in p for p in body["problems"]) and body["database"]["lost"]["by_kind"]["call"] == lost
        assert f'refuge_store_lost_writes_total{{kind="call"}} {lost}' in side.client.get("/metrics").data.decode()

        assert side.outbox.step(side.clock.now) is None  # what is held goes out from memory
        sent = {e.incident for e in side.hook.accepted if e.type == "call.queued"}
        assert 1 <= len(sent) < 11

        disk.free()
        side.clock.now += 2
        side.hub.recorder.tick()
        assert side.outbox.backlog.status().writes == 0
        assert {i.id for i in side.store.incidents(limit=None)} == sent  # the record has what CCTV got
        # A lost write stays reported until someone restarts the sidecar after reading the log.
        assert any("LOST" in p for p in side.client.get("/healthz").get_json()["problems"])
    finally:
        side.close()


def test_a_write_that_fails_for_another_reason_reaches_no_page(site: Site, tmp_path: Path) -> None:
    side = Sidecar(site, tmp_path / "refuge.sqlite3")
    try:
        event = ev.build_event(ev.CALL_ANSWERED, site, post_id="sutton-market", now=datetime.now(UTC),
                               incident="no-such-incident")

        def orphan_step(store: Store) -> None:  # a timeline row of no incident: a foreign key error, a bug
            store.add_timeline("no-such-incident", "answered", datetime.now(UTC))

        with pytest.raises(StoreError) as raised:
            side.hub.recorder._record(orphan_step, [event])
        assert not raised.value.storage
        assert side.paged() == [] and side.outbox.backlog.status().writes == 0
        assert side.store.event(event.id) is None and side.store.fault is None
    finally:
        side.close()


# -- files that cannot be trusted -----------------------------------------------------------------------------

def filled_database(site: Site, path: Path, calls: int = 300) -> None:
    with Store(path) as store:
        for n in range(calls):
            at = datetime.fromtimestamp(T0 + n, UTC)
            incident = f"inc-{n:04d}"
            with store.transaction():
                store.open_incident(incident, "sutton-market", at)
                store.add_timeline(incident, "queued", at, {"uniqueid": f"1700000000.{n}"})
                store.add_event(ev.build_event(ev.CALL_QUEUED, site, post_id="sutton-market", now=at,
                                               incident=incident), ["hook"], T0)


def damage(path: Path, pages: int, seed: int, table: str | None = None) -> list[int]:
    """Overwrite ``pages`` random pages (never page 1, the header; only ``table``'s when given) with random
    bytes."""
    rng = random.Random(seed)
    with sqlite3.connect(path) as db:
        size = int(db.execute("PRAGMA page_size").fetchone()[0])
        if table is None:
            candidates = list(range(2, path.stat().st_size // size + 1))
        else:
            candidates = [int(r[0]) for r in db.execute("SELECT pageno FROM dbstat WHERE name = ?", (table,))]
    hit = sorted(rng.sample(candidates, pages))
    with open(path, "r+b") as f:
        for page in hit:  # pages count from 1
            f.seek((page - 1) * size)
            f.write(rng.randbytes(size))
    return hit


def test_a_database_with_damaged_pages_is_refused_and_the_documented_recovery_works(
        site: Site, tmp_path: Path) -> None:
    path = tmp_path / "refuge.sqlite3"
    filled_database(site, path)
    damage(path, pages=4, seed=11)
    with pytest.raises(SidecarError) as refused:
        Store(path)
    message = str(refused.value)
    assert str(path) in message and "damaged" in message and "quick_check" in message
    assert f"mv {path} {path}.corrupt" in message and "admin-guide" in message

    # The recovery the message and the admin guide give, pasted as an operator would.
    assert shutil.which("sqlite3"), "the sqlite3 command-line tool is needed (Debian package sqlite3)"
    steps = [line.strip() for line in message.splitlines() if line.startswith("    ")]
    subprocess.run(["bash", "-e", "-o", "pipefail", "-c", "\n".join(steps)], check=True, capture_output=True)
    with Store(path) as recovered:
        assert 0 < len(recovered.incidents(limit=None)) <= 300
        recovered.open_incident("after-recovery", "sutton-market", datetime.now(UTC))  # and it takes writes
    assert Path(f"{path}.corrupt").exists()


@pytest.fixture()
def example(tmp_path: Path) -> Site:
    """The example site (it has a sidecar section), its database under ``tmp_path``."""
    path = tmp_path / "example" / "site.yaml"
    path.parent.mkdir()
    shutil.copy(REPO / "config" / "site.example.yaml", path)
    init_secrets(load_site(path, check_secrets=False))
    return load_site(path)


def start_sidecar(site: Site) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CLI), "sidecar", str(site.path), "--no-cameras"], capture_output=True, text=True,
                          timeout=60, check=False)


def test_the_sidecar_refuses_to_start_on_a_damaged_database(example: Site) -> None:
    assert example.sidecar is not None
    database = example.sidecar.database
    filled_database(example, database, calls=200)
    damage(database, pages=3, seed=5)
    started = start_sidecar(example)
    assert started.returncode == 2
    assert started.stderr.startswith(f"sip-refuge: the database {database} is damaged"), started.stderr
    assert "Traceback" not in started.stderr and ".dump" in started.stderr


def test_an_empty_file_is_refused_not_replaced(example: Site) -> None:
    assert example.sidecar is not None
    database = example.sidecar.database
    database.parent.mkdir(parents=True, exist_ok=True)
    database.write_bytes(b"")
    started = start_sidecar(example)
    assert started.returncode == 2
    assert f"the database {database} is an empty file (0 bytes)" in started.stderr, started.stderr
    assert "Traceback" not in started.stderr
    assert database.stat().st_size == 0  # left as it was, for whoever investigates


def test_a_file_that_is_not_sqlite_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "refuge.sqlite3"
    path.write_text("incidents.csv exported by hand\n")
    with pytest.raises(SidecarError, match=r"is not an SQLite database(.|\n)*mv .*refuge.sqlite3.corrupt"):
        Store(path)
    assert path.read_text() == "incidents.csv exported by hand\n"


def test_a_missing_file_starts_a_fresh_store_atomically(tmp_path: Path) -> None:
    path = tmp_path / "var" / "refuge.sqlite3"
    with Store(path) as store:
        assert store.incidents() == [] and store.journal_mode() == "wal"
    assert sorted(p.name for p in path.parent.iterdir() if not p.name.startswith("refuge.sqlite3")) == []


def test_damage_found_while_running_makes_health_degraded(site: Site, tmp_path: Path) -> None:
    path = tmp_path / "refuge.sqlite3"
    filled_database(site, path)
    side = Sidecar(site, path)
    try:
        assert len(side.store.incidents(limit=None)) == 300
        with sqlite3.connect(path) as other:  # a write by another process: the sidecar then re-reads pages
            other.execute("INSERT INTO camera_status (post_id, updated) VALUES ('bus-station', 'now')")
        damage(path, pages=3, seed=3, table="incidents")
        with pytest.raises(StoreError):
            side.store.incidents(limit=None)
        body = side.client.get("/healthz").get_json()
        assert body["status"] == "degraded" and body["database"]["error_kind"] == "corrupt"
        assert any("damaged" in p and "admin-guide" in p for p in body["problems"])
        side.clock.now += 2
        side.hub.recorder.tick()
        assert side.client.get("/healthz").get_json()["database"]["error_kind"] == "corrupt"  # it stays
    finally:
        side.close()


def test_a_long_backlog_is_stored_in_order_in_batches_and_a_bad_write_does_not_block_it(
        site: Site, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock(T0)
    with SmallDisk(tmp_path / "disk", "16m") as disk, Store(disk.path / "refuge.sqlite3") as store:
        outbox = Outbox(store, [ScriptedTarget("hook")], clock=clock)
        truncate_wal(disk.path / "refuge.sqlite3")
        disk.fill()
        at = datetime.fromtimestamp(T0, UTC)
        events = [ev.build_event(ev.POST_OFFLINE, site, post_id="bus-station", now=at) for _ in range(1200)]
        for n, event in enumerate(events):

            def changes(s: Store, orphan: bool = n == 700) -> None:
                if orphan:  # a timeline row of no incident: a fault in the code, not in the store
                    s.add_timeline("no-such-incident", "queued", at)

            assert outbox.record(changes, [event]) == "held"
        disk.free()
        flushed: list[int] = []
        with caplog.at_level(logging.ERROR):
            while len(outbox.backlog) and len(flushed) < 10:
                clock.now += 2
                flushed.append(outbox.flush())
        assert flushed[:2] == [500, 500] and sum(flushed) == 1200, flushed
        assert "cannot be stored and is dropped" in caplog.text and events[700].id in caplog.text
        stored = [e.id for _, e in store.events_since(0, limit=2000)]
        assert stored == [e.id for n, e in enumerate(events) if n != 700]
