"""The sidecar's rooms, each on its own: the recorder (inputs to the record), the fan-out (live pages), the read
model (what the web shows, with a page's real times) and the references they hand out."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from sip_refuge.config import Site, load_site
from sip_refuge.sidecar.core import Hub
from sip_refuge.sidecar.events import Event, iso_utc
from sip_refuge.sidecar.fanout import Fanout
from sip_refuge.sidecar.outbox import Outbox
from sip_refuge.sidecar.store import Store
from sip_refuge.sidecar.views import ReadModel
from sip_refuge.sidecar.web import create_app
from tests.support.sites import example_copy
from tests.support.telemetry import message

TOKEN = "t0ken-for-the-rooms-tests-0123456789"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    return load_site(example_copy(tmp_path_factory.mktemp("site"), lambda text: text.replace(
        "  name: Ashfield Refuge Points", "  name: Ashfield Refuge Points\n  reference_prefix: KIR", 1)))


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "sidecar.sqlite3") as opened:
        yield opened


@pytest.fixture()
def hub(site: Site, store: Store) -> Iterator[Hub]:
    made = Hub(site, store, Outbox(store, []), base_url="http://127.0.0.1:8080")
    yield made
    made.close()


def join(hub: Hub, uid: str, post: str = "sutton-market") -> None:
    hub.recorder.on_ami_event({"Event": "QueueCallerJoin", "Queue": "refuge", "Channel": f"PJSIP/{post}-0000001a",
                               "Uniqueid": uid, "Position": "1"})


def drain(page: queue.Queue[Event | None]) -> list[str]:
    out: list[str] = []
    while True:
        try:
            event = page.get_nowait()
        except queue.Empty:
            return out
        out.append("END" if event is None else event.type)


# -- the recorder and the fan-out ------------------------------------------------------------------------

def test_pages_get_each_recorded_event_once_it_is_stored(hub: Hub, store: Store) -> None:
    page = hub.fanout.subscribe()
    join(hub, "1.1")
    [(_, stored)] = store.events_since(0)
    assert drain(page) == ["call.queued"] and stored.type == "call.queued"
    # A ring is the timeline's, not an event: nothing for the CCTV targets, a hint for the pages (who read
    # the call again: "rang 2 desks").
    hub.recorder.on_ami_event({"Event": "AgentCalled", "Uniqueid": "1.1", "Interface": "PJSIP/desk-1"})
    assert drain(page) == ["call.updated"] and len(store.events_since(0)) == 1
    hub.recorder.on_telemetry("idlewells", message("idlewells", state="ringing"))
    assert drain(page) == ["post.status"]  # telemetry changes a post, but is no CCTV event
    hub.fanout.unsubscribe(page)
    join(hub, "1.2", "idlewells")
    assert drain(page) == []


def test_a_page_that_stops_reading_is_dropped_and_told_so() -> None:
    fanout = Fanout(backlog=3)
    woken: list[int] = []
    slow, fast = fanout.subscribe(), fanout.subscribe(wake=lambda: woken.append(1))
    events = [Event(f"e{i}", "post.online", "t", None, "idlewells", {}) for i in range(3)]
    fanout.publish(events[:2])
    assert drain(fast) == ["post.online", "post.online"] and len(woken) == 2
    fanout.publish(events[2:])
    assert drain(fast) == ["post.online"]
    fanout.publish(events[:1])  # the slow page's queue was full: it is dropped with an end of stream
    assert drain(slow) == ["END"] and len(fanout) == 1
    fanout.close()
    assert drain(fast) == ["post.online", "END"] and len(fanout) == 0


def test_a_failed_write_that_is_no_storage_fault_reaches_no_page(hub: Hub) -> None:
    page = hub.fanout.subscribe()

    def broken(store: Store) -> None:
        store.update_incident("x", colour="red")

    with pytest.raises(Exception, match="unknown incident fields"):
        hub.recorder._record(broken, [Event("e1", "post.online", "t", None, "idlewells", {})])
    assert drain(page) == []


# -- references ----------------------------------------------------------------------------------------------

def test_references_count_on_across_restarts_and_reach_the_record_and_the_events(site: Site, store: Store) -> None:
    first = Hub(site, store, Outbox(store, []), base_url="http://x")
    join(first, "2.1")
    join(first, "2.2", "idlewells")
    restarted = Hub(site, store, Outbox(store, []), base_url="http://x")
    join(restarted, "2.3", "kirkby-bus-station")
    by_post = {i.post_id: i.reference for i in store.incidents()}
    assert by_post == {"sutton-market": "KIR-0001", "idlewells": "KIR-0002", "kirkby-bus-station": "KIR-0003"}
    assert [e.body["data"]["reference"] for _, e in store.events_since(0)] == ["KIR-0001", "KIR-0002", "KIR-0003"]
    live = {c["post"]: c["reference"] for c in restarted.views.live_calls()}
    assert live == {"kirkby-bus-station": "KIR-0003"}  # the first hub's calls belong to its (gone) process


# -- the read model: real times, camera status, the overflow --------------------------------------------------

def test_a_page_opened_mid_call_gets_the_real_times_and_the_wait(hub: Hub, site: Site) -> None:
    join(hub, "3.1")
    [call] = hub.views.live_calls()
    queued_at = datetime.fromisoformat(call["queued_at"])
    views = ReadModel(site, hub.store, hub.recorder, now=lambda: queued_at + timedelta(seconds=12.34))
    [waiting] = views.live_calls()
    assert waiting["state"] == "queued" and waiting["wait_seconds"] == 12.3 and waiting["answered_at"] is None
    hub.recorder.on_ami_event({"Event": "AgentConnect", "Uniqueid": "3.1", "Interface": "PJSIP/desk-2"})
    [answered] = views.live_calls()
    assert answered["state"] == "answered" and answered["desk"] == "desk-2"
    answered_at = datetime.fromisoformat(answered["answered_at"])
    assert answered["wait_seconds"] == round((answered_at - queued_at).total_seconds(), 1)  # stops at the answer
    overview = views.overview()
    assert overview["now"] == iso_utc(queued_at + timedelta(seconds=12.34))
    card = next(p for p in overview["posts"] if p["id"] == "sutton-market")["call"]
    assert card["queued_at"] == answered["queued_at"] and card["answered_at"] == answered["answered_at"]


def test_a_camera_fault_shows_on_the_calling_posts_call(hub: Hub) -> None:
    join(hub, "4.1")
    assert hub.views.live_calls()[0]["camera"] == {"ok": None, "reason": None}  # not checked yet
    hub.recorder.on_camera_change("sutton-market", False, "black")
    [call] = hub.views.live_calls()
    assert call["camera"] == {"ok": False, "reason": "black"} and call["post"] == "sutton-market"


def test_live_calls_list_the_longest_waiting_first(hub: Hub) -> None:
    for uid, post in (("5.1", "idlewells"), ("5.2", "sutton-market"), ("5.3", "kirkby-bus-station")):
        join(hub, uid, post)
    assert [c["post"] for c in hub.views.live_calls()] == ["idlewells", "sutton-market", "kirkby-bus-station"]


def test_an_overflowed_call_is_live_in_the_api_until_its_caller_hangs_up(hub: Hub, store: Store) -> None:
    client: FlaskClient = create_app(hub, token=TOKEN).test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {TOKEN}"  # reads need a login or the token
    join(hub, "6.1")
    hub.recorder.on_ami_event({"Event": "QueueCallerAbandon", "Queue": "refuge", "Uniqueid": "6.1"})
    hub.recorder.on_ami_event({"Event": "QueueCallerLeave", "Queue": "refuge", "Uniqueid": "6.1"})
    body = client.get("/api/v1/posts").get_json()
    [call] = body["calls"]
    assert call["state"] == "overflowed" and call["overflowed_at"] and call["reference"].startswith("KIR-")
    assert next(p for p in body["posts"] if p["id"] == "sutton-market")["call"]["state"] == "overflowed"
    [incident] = store.incidents()
    assert (incident.state, incident.outcome, incident.ended) == ("overflowed", None, None)
    assert client.get("/").status_code == 200 and b"on the overflow route" in client.get("/").data
    hub.recorder.on_ami_event({"Event": "Hangup", "Uniqueid": "6.1", "Cause-txt": "Normal Clearing"})
    assert client.get("/api/v1/posts").get_json()["calls"] == []
    [incident] = store.incidents()
    assert (incident.state, incident.outcome) == ("ended", "overflowed")
    assert [e.type for _, e in store.events_since(0)] == ["call.queued", "call.unanswered", "call.ended"]
    assert [e.body["data"].get("outcome") for _, e in store.events_since(0)][2] == "overflowed"


def test_a_restarted_sidecar_follows_an_overflowed_call_again(site: Site, store: Store) -> None:
    first = Hub(site, store, Outbox(store, []), base_url="http://x")
    join(first, "7.1")
    first.recorder.on_ami_event({"Event": "QueueCallerLeave", "Queue": "refuge", "Uniqueid": "7.1"})
    from sip_refuge.sidecar.ami import Snapshot

    restarted = Hub(site, store, Outbox(store, []), base_url="http://x")
    restarted.recorder.on_resync(Snapshot(contacts=None, channels={"7.1"}))
    [call] = restarted.views.live_calls()
    assert (call["state"], call["reference"]) == ("overflowed", "KIR-0001") and call["overflowed_at"]
    restarted.recorder.on_resync(Snapshot(contacts=None, channels=set()))  # its caller has gone meanwhile
    assert restarted.views.live_calls() == []
    [incident] = store.incidents()
    assert (incident.state, incident.outcome) == ("ended", "overflowed")
    assert restarted.link.status().resynced_at is not None
