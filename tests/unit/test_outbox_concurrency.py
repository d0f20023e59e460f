"""The outbox's senders: the heads of different streams go to one target at once, never two events of one stream.

The outbox runs with its real threads on a real store; the target is a real in-process one that holds every
delivery until the test lets it go, so "in flight at once" is a state the test waits for, never a timing.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sip_refuge.config.model import TARGET_CONCURRENCY, Site
from sip_refuge.errors import ConfigError
from sip_refuge.sidecar import events as ev
from sip_refuge.sidecar.outbox import Backoff, Outbox
from sip_refuge.sidecar.store import Store
from sip_refuge.sidecar.targets import TargetError
from tests.support.disk import SmallDisk
from tests.support.receivers import make_site
from tests.unit.test_store_faults import truncate_wal

T0 = datetime(2026, 12, 2, 2, 0, 0, tzinfo=UTC)
FAST = Backoff(base=0.01, cap=0.05)  # real backoff, compressed so retries come within a test's time
WAIT = 20.0  # seconds: generous, for a loaded machine; never a measure


class Gate:
    """A target that holds each delivery until released, noting how many are inside at once (in all and per
    stream), and that can refuse chosen attempts."""

    reveal_credentials = False

    def __init__(self, name: str = "hook") -> None:
        self.name = name
        self.cond = threading.Condition()
        self.inside: list[ev.Event] = []
        self.peak = 0
        self.peak_per_stream = 0
        self.open = False  # True: let every delivery through
        self.released: set[str] = set()  # event ids let through once
        self.refuse: Counter[str] = Counter()  # event id -> attempts still to refuse
        self.accepted: list[ev.Event] = []
        self.attempts: list[str] = []

    def deliver(self, event: ev.Event) -> None:
        with self.cond:
            self.attempts.append(event.id)
            self.inside.append(event)
            self.peak = max(self.peak, len(self.inside))
            self.peak_per_stream = max(self.peak_per_stream, *Counter(e.stream for e in self.inside).values())
            self.cond.notify_all()
            try:
                if not self.cond.wait_for(lambda: self.open or event.id in self.released, WAIT):
                    raise TargetError(f"{self.name}: the test never released {event.id}")
                self.released.discard(event.id)
                if self.refuse[event.id] > 0:
                    self.refuse[event.id] -= 1
                    raise TargetError(f"{self.name}: refused {event.id}")
                self.accepted.append(event)
            finally:
                self.inside.remove(event)
                self.cond.notify_all()

    def wait_for(self, predicate: Callable[[], bool], what: str) -> None:
        with self.cond:
            if not self.cond.wait_for(predicate, WAIT):
                raise AssertionError(f"timed out waiting for {what}; inside: {[e.type for e in self.inside]}")

    def release(self, *events: ev.Event) -> None:
        with self.cond:
            self.released.update(e.id for e in events)
            self.cond.notify_all()

    def open_all(self) -> None:
        with self.cond:
            self.open = True
            self.cond.notify_all()

    def close(self) -> None:
        pass


@pytest.fixture()
def site(tmp_path: Path) -> Site:
    site: Site = make_site(tmp_path)
    return site


def call(site: Site, incident: str, post: str = "sutton-market") -> list[ev.Event]:
    at = T0 + timedelta(seconds=len(incident))
    return [ev.build_event(ev.CALL_QUEUED, site, post_id=post, now=at, incident=incident),
            ev.build_event(ev.CALL_ANSWERED, site, post_id=post, now=at, incident=incident, desk_id="desk-1"),
            ev.build_event(ev.CALL_ENDED, site, post_id=post, now=at, incident=incident, desk_id="desk-1")]


def eventually(predicate: Callable[[], bool], what: str) -> None:
    """Poll a state the outbox's threads reach (its status takes no waiter); never a measure of time."""
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def by_stream(events: list[ev.Event]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for event in events:
        out.setdefault(event.stream, []).append(event.id)
    return out


def test_the_heads_of_different_streams_are_in_flight_at_once_up_to_the_limit(store: Store, site: Site) -> None:
    gate = Gate()
    outbox = Outbox(store, [gate], concurrency=4, backoff=FAST)
    queued = [call(site, f"inc-{n}")[0] for n in range(6)]  # six incidents: six streams
    for event in queued:
        outbox.publish(event)
    outbox.start()
    try:
        gate.wait_for(lambda: len(gate.inside) == 4, "four deliveries in flight")
        assert len({e.stream for e in gate.inside}) == 4
        assert outbox.status()[0].in_flight == 4 and outbox.status()[0].pending == 6
        gate.release(*gate.inside)  # four done: the other two go
        gate.wait_for(lambda: len(gate.accepted) == 4 and len(gate.inside) == 2, "the other two in flight")
        gate.open_all()
        gate.wait_for(lambda: len(gate.accepted) == 6, "all six")
    finally:
        gate.open_all()
        outbox.close()
    assert gate.peak == 4  # never more than the limit
    assert sorted(e.id for e in gate.accepted) == sorted(e.id for e in queued)
    assert store.pending_count("hook") == 0


def test_events_of_one_stream_never_overlap_and_keep_their_order(store: Store, site: Site) -> None:
    gate = Gate()
    outbox = Outbox(store, [gate], concurrency=8, backoff=FAST)
    calls = [call(site, f"inc-{n}", post=("sutton-market", "bus-station")[n % 2]) for n in range(3)]
    for events in calls:
        for event in events:
            outbox.publish(event)
    outbox.start()
    try:
        # Eight senders, nine pending events: only the three heads (the call.queued of each incident) go.
        gate.wait_for(lambda: len(gate.inside) == 3, "the three heads in flight")
        assert {e.type for e in gate.inside} == {ev.CALL_QUEUED}
        gate.release(calls[0][0])  # inc-0 moves on to its call.answered; the others still wait
        gate.wait_for(lambda: calls[0][1] in gate.inside, "inc-0's second event")
        assert len(gate.inside) == 3 and calls[0][2] not in gate.inside
        gate.open_all()
        gate.wait_for(lambda: len(gate.accepted) == 9, "all nine")
    finally:
        gate.open_all()
        outbox.close()
    assert gate.peak_per_stream == 1
    assert by_stream(gate.accepted) == by_stream([e for events in calls for e in events])


def test_order_holds_under_concurrency_with_failures_and_retries(store: Store, site: Site) -> None:
    """Some events are refused once or twice: their stream waits for them (backoff per stream), the other
    streams go on, every event arrives with its id, and no stream's order changes."""
    gate = Gate()
    gate.open_all()
    outbox = Outbox(store, [gate], concurrency=4, backoff=FAST)
    calls = [call(site, f"inc-{n}") for n in range(8)]
    published = [e for events in calls for e in events]
    for n, event in enumerate(published):
        gate.refuse[event.id] = n % 3  # 0, 1 or 2 refusals
    outbox.start()
    try:
        for event in published:
            outbox.publish(event)
        gate.wait_for(lambda: len(gate.accepted) == len(published), "every event accepted")
    finally:
        outbox.close()
    assert gate.peak_per_stream == 1 and gate.peak <= 4
    assert by_stream(gate.accepted) == by_stream(published)
    assert Counter(gate.attempts) == Counter({e.id: 1 + n % 3 for n, e in enumerate(published)})
    status = outbox.status()[0]
    assert (status.delivered, status.failed, status.pending, status.in_flight) == (24, 24, 0, 0)
    assert store.pending_count("hook") == 0


def test_a_refused_head_delays_only_its_own_stream(store: Store, site: Site) -> None:
    gate = Gate()
    outbox = Outbox(store, [gate], concurrency=2, backoff=Backoff(base=3600, cap=3600))  # no retry in this test
    stuck, moving = call(site, "inc-stuck"), call(site, "inc-moving", post="bus-station")
    gate.refuse[stuck[0].id] = 1
    for events in (stuck, moving):
        for event in events:
            outbox.publish(event)
    gate.open_all()
    outbox.start()
    try:
        gate.wait_for(lambda: len(gate.accepted) == 3, "the other incident's three events")
        eventually(lambda: outbox.status()[0].delivered == 3, "the three recorded")
        assert outbox.status()[0].failed == 1 and outbox.status()[0].pending == 3
    finally:
        outbox.close()
    assert [e.id for e in gate.accepted] == [e.id for e in moving]
    assert gate.attempts.count(stuck[0].id) == 1 and stuck[1].id not in gate.attempts


def test_call_queued_goes_first_when_senders_are_scarce(store: Store, site: Site) -> None:
    gate = Gate()
    outbox = Outbox(store, [gate], concurrency=1, backoff=FAST)
    now = datetime.now(UTC)
    offline = [ev.build_event(ev.POST_OFFLINE, site, post_id=p, now=now) for p in ("sutton-market", "bus-station")]
    queued = call(site, "inc-1", post="bus-station")[0]
    for event in (*offline, queued):  # the call comes last
        outbox.publish(event)
    outbox.start()
    try:
        gate.wait_for(lambda: len(gate.inside) == 1, "the first delivery")
        assert gate.inside[0].id == queued.id
        gate.open_all()
        gate.wait_for(lambda: len(gate.accepted) == 3, "all three")
    finally:
        gate.open_all()
        outbox.close()
    assert gate.peak == 1
    assert [e.id for e in gate.accepted] == [queued.id, offline[0].id, offline[1].id]


def test_stopping_records_what_went_out_and_a_restart_resumes(tmp_path: Path, site: Site) -> None:
    db = tmp_path / "db.sqlite3"
    gate = Gate()
    events = call(site, "inc-1") + call(site, "inc-2", post="bus-station")
    with Store(db) as store:
        outbox = Outbox(store, [gate], concurrency=4, backoff=FAST)
        for event in events:
            outbox.publish(event)
        stop = threading.Event()
        running = threading.Thread(target=outbox.run, args=(stop,))
        running.start()
        gate.wait_for(lambda: len(gate.inside) == 2, "both heads in flight")
        stop.set()  # while both are on the wire: they finish, and nothing new starts
        gate.release(*gate.inside)
        running.join()
    assert len(gate.accepted) == 2
    again = Gate()
    again.open_all()
    with Store(db) as store:
        assert store.pending_count("hook") == 4  # the two delivered heads were recorded on the way out
        outbox = Outbox(store, [again], concurrency=4, backoff=FAST)
        outbox.start()
        try:
            again.wait_for(lambda: len(again.accepted) == 4, "the rest after the restart")
        finally:
            outbox.close()
    assert by_stream(gate.accepted + again.accepted) == by_stream(events)


def test_concurrency_is_a_target_setting_with_a_default_and_bounds(tmp_path: Path) -> None:
    entry = "  - type: milestone\n    name: xprotect\n    host: 10.0.0.9\n"
    for folder in ("default", "two", "zero"):
        (tmp_path / folder).mkdir()
    assert [t.concurrency for t in make_site(tmp_path / "default", entry).cctv] == [TARGET_CONCURRENCY]
    assert [t.concurrency for t in make_site(tmp_path / "two", entry + "    concurrency: 2\n").cctv] == [2]
    with pytest.raises(ConfigError) as info:
        make_site(tmp_path / "zero", entry + "    concurrency: 0\n")
    [problem] = [str(p) for p in info.value.problems]
    assert str(tmp_path / "zero") in problem and "concurrency" in problem


def test_on_a_full_disk_held_events_go_from_memory_concurrently_and_in_order_and_are_recorded_once(
        tmp_path: Path, site: Site) -> None:
    """A real full disk: the events wait in memory, the senders still take every stream's head at once, and
    once the disk has space the deliveries are recorded from the worker's ``_sent``, not sent again."""
    gate = Gate()
    with SmallDisk(tmp_path / "disk", "2m") as disk:
        store = Store(disk.path / "refuge.sqlite3")
        outbox = Outbox(store, [gate], concurrency=4, backoff=FAST)
        try:
            truncate_wal(disk.path / "refuge.sqlite3")
            disk.fill()
            calls = [call(site, f"inc-{n}", post=("sutton-market", "bus-station")[n % 2]) for n in range(2)]
            published = [e for events in calls for e in events]
            for event in published:
                outbox.publish(event)
            assert outbox.backlog.status().events == 6 and store.pending_count("hook") == 0  # all in memory
            outbox.start()
            gate.wait_for(lambda: len(gate.inside) == 2, "both heads in flight from memory")
            assert {e.type for e in gate.inside} == {ev.CALL_QUEUED}
            gate.open_all()
            gate.wait_for(lambda: len(gate.accepted) == 6, "all six")
            eventually(lambda: outbox.status()[0].delivered == 6, "six recorded as sent")
            disk.free()
            assert outbox.flush(force=True) == 6
            eventually(lambda: store.delivery_counts() == {"hook": {"delivered": 6}}, "the store to record them")
        finally:
            gate.open_all()
            outbox.close()
            store.close()
    assert gate.peak_per_stream == 1
    assert by_stream(gate.accepted) == by_stream(published)
    assert len(gate.attempts) == 6  # none sent twice
