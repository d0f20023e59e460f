"""The sidecar on a PBX pair (issue 12.3): both AMIs into one incident log, the PBX of each call, a re-sent alarm
as the next leg of the same incident, pbx.down / pbx.up, the /healthz problem and the /metrics gauge. The tracker
and the watch with explicit times; the hub with an in-memory store and the Flask test client."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from flask.testing import FlaskClient

from sip_refuge.config import Site, load_site
from sip_refuge.config.model import PRIMARY, SECONDARY
from sip_refuge.config.secrets import init_secrets
from sip_refuge.sidecar.ami import Snapshot
from sip_refuge.sidecar.calls import CALL_MOVED, CallTracker
from sip_refuge.sidecar.core import Hub
from sip_refuge.sidecar.events import Event
from sip_refuge.sidecar.pair import PbxWatch, tag_event, tag_snapshot
from sip_refuge.sidecar.web import create_app
from tests.support.metrics import Scrape

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "site.example.yaml"
TOKEN = "t0ken-for-the-pair-tests-0123456789abc"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
UID = "1700000000.1"  # both Asterisks number channels alike: the same Uniqueid on each


def write(folder: Path, *, pair: bool) -> Site:
    path = folder / "site.yaml"
    shutil.copy(EXAMPLE, path)
    if pair:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        data["pbx"]["secondary_host"] = "127.0.0.2"
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    init_secrets(load_site(path, check_secrets=False))
    return load_site(path)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    return write(tmp_path_factory.mktemp("pair"), pair=True)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Site:
    return write(tmp_path_factory.mktemp("single"), pair=False)


def join(role: str, uid: str = UID, post: str = "sutton-market") -> dict[str, str]:
    return tag_event({"Event": "QueueCallerJoin", "Queue": "refuge", "Channel": f"PJSIP/{post}-0000001a",
                      "Uniqueid": uid, "Position": "1"}, role)


def event(role: str, name: str, **fields: str) -> dict[str, str]:
    return tag_event({"Event": name, "Uniqueid": UID, **fields}, role)


def test_the_same_uniqueid_on_each_pbx_is_two_calls_each_saying_its_pbx(site: Site) -> None:
    t = CallTracker(site)
    [a] = t.handle(join(PRIMARY), 1.0)
    [b] = t.handle(join(SECONDARY, post="idlewells"), 1.1)
    assert a.incident != b.incident and (a.detail["pbx"], b.detail["pbx"]) == (PRIMARY, SECONDARY)
    [ended] = t.handle(event(SECONDARY, "Hangup", **{"Cause-txt": "Normal Clearing"}), 5.0)
    assert ended.incident == b.incident and ended.detail["pbx"] == SECONDARY
    assert [c.incident for c in t.live_calls()] == [a.incident]  # the primary's call is not touched


def test_an_alarm_back_through_the_secondary_while_the_primary_is_down_is_the_next_leg_of_its_incident(
        site: Site) -> None:
    t = CallTracker(site)
    [queued] = t.handle(join(PRIMARY), 1.0)
    t.handle(event(PRIMARY, "AgentConnect", Interface="PJSIP/desk-1"), 3.0)
    t.pbx_link(PRIMARY, False)  # kill -9: the AMI link drops, no Hangup will ever come
    [moved] = t.handle(join(SECONDARY, uid="1700000050.7"), 12.0)
    assert moved.type == CALL_MOVED and moved.incident == queued.incident
    assert moved.detail == {"from": PRIMARY, "leg_uniqueid": "secondary/1700000050.7", "was_answered_by": "desk-1",
                            "pbx": SECONDARY}
    [answered] = t.handle(tag_event({"Event": "AgentConnect", "Uniqueid": "1700000050.7",
                                     "Interface": "PJSIP/desk-2"}, SECONDARY), 14.0)
    assert answered.type == "call.answered" and answered.incident == queued.incident
    assert answered.desk is not None and answered.desk.id == "desk-2" and answered.detail["pbx"] == SECONDARY
    [call] = t.live_calls()
    assert call.pbx == SECONDARY and call.queued_at == 1.0  # one incident, from the first press


def test_while_both_pbxs_are_up_a_second_call_is_its_own_incident(site: Site) -> None:
    t = CallTracker(site)
    [first] = t.handle(join(PRIMARY), 1.0)
    [second] = t.handle(join(SECONDARY, uid="1700000050.7"), 2.0)
    assert second.type == "call.queued" and second.incident != first.incident


def test_a_resync_of_one_pbx_judges_only_its_own_calls_and_contacts(site: Site) -> None:
    t = CallTracker(site)
    [a] = t.handle(join(PRIMARY), 1.0)
    t.handle(join(SECONDARY, uid="1700000050.7", post="idlewells"), 1.0)
    snap = tag_snapshot(Snapshot(contacts={"sutton-market": "Reachable"},
                                 contact_uris={"sutton-market": {"sip:sutton-market@127.0.0.1:5070": "Reachable"}},
                                 channels=set(), restarted=True), SECONDARY)
    out = t.resync(5.0, snap.contacts, snap.channels, snap.queue_entries, restarted=True,
                   contact_uris=snap.contact_uris, pbx=SECONDARY)
    assert [(o.type, o.detail.get("pbx")) for o in out] == [("call.unanswered", SECONDARY)]  # the secondary's
    assert [c.incident for c in t.live_calls()] == [a.incident]
    t.handle(tag_event({"Event": "ContactStatus", "AOR": "sutton-market", "URI": "sip:sutton-market@127.0.0.1:5070",
                        "ContactStatus": "Unreachable"}, PRIMARY), 6.0)
    assert t.is_online("sutton-market") is True  # still reachable through the secondary


def test_a_single_pbx_site_tracks_calls_as_before_and_still_says_its_pbx_is_down(single: Site) -> None:
    """One PBX: calls carry no ``pbx``, and /healthz lists no pair; but the PBX going is still pbx.down (nothing
    follows the calls while it is down), once, and pbx.up when it is back."""
    t = CallTracker(single)
    [queued] = t.handle({"Event": "QueueCallerJoin", "Queue": "refuge", "Channel": "PJSIP/sutton-market-0000001a",
                         "Uniqueid": UID, "Position": "1"}, 1.0)
    assert "pbx" not in queued.detail
    watch = PbxWatch(single, 0.0, 30.0)
    assert watch.link(PRIMARY, True, 1.0) == []
    [down] = watch.link(PRIMARY, False, 2.0)
    assert (down.type, down.role, down.host) == ("pbx.down", PRIMARY, single.pbx.host)
    assert watch.tick(100.0) == [] and watch.down() == {}
    [up] = watch.link(PRIMARY, True, 101.0)
    assert up.type == "pbx.up"


def test_pbx_down_when_its_link_drops_up_when_it_is_back_and_down_when_it_never_came(site: Site) -> None:
    watch = PbxWatch(site, 0.0, 30.0)
    assert watch.link(PRIMARY, True, 1.0) == []
    [down] = watch.link(PRIMARY, False, 10.0)
    assert (down.type, down.role, down.host, down.reason) == ("pbx.down", PRIMARY, site.pbx.host, "AMI connection lost")
    assert watch.link(PRIMARY, False, 11.0) == []  # once
    assert watch.next_deadline() == 30.0  # the secondary never came up
    [never] = watch.tick(30.0)
    assert (never.type, never.role) == ("pbx.down", SECONDARY)
    [up] = watch.link(PRIMARY, True, 40.0)
    assert (up.type, up.role) == ("pbx.up", PRIMARY) and set(watch.down()) == {SECONDARY}


@pytest.fixture()
def client(hub: Hub) -> FlaskClient:
    return create_app(hub, token=TOKEN).test_client()


def events(hub: Hub) -> list[Event]:
    return [e for _, e in hub.store.events_since(0, 1000)]


def link(hub: Hub, role: str, up: bool) -> None:
    """What the runner does when a follower's link goes up or down."""
    hub.links[role].on_link(up)
    hub.recorder.on_pbx_link(role, up)


def test_a_dead_primary_is_a_healthz_problem_a_metrics_gauge_and_a_pbx_down_event(hub: Hub,
                                                                                  client: FlaskClient) -> None:
    link(hub, PRIMARY, True)
    link(hub, SECONDARY, True)
    assert Scrape(client.get("/metrics", headers=AUTH).get_data(as_text=True)).value(
        "refuge_pbx_up", pbx=PRIMARY, host=hub.site.pbx.host) == 1
    link(hub, PRIMARY, False)
    reply = client.get("/healthz", headers=AUTH)
    body = reply.get_json()
    assert reply.status_code == 503 and body["pbx"][PRIMARY]["up"] is False and body["pbx"][SECONDARY]["up"]
    assert any(p.startswith(f"pbx primary ({hub.site.pbx.host}): down since") for p in body["problems"])
    scrape = Scrape(client.get("/metrics", headers=AUTH).get_data(as_text=True))
    assert scrape.value("refuge_pbx_up", pbx=PRIMARY, host=hub.site.pbx.host) == 0
    assert scrape.value("refuge_pbx_up", pbx=SECONDARY, host="127.0.0.2") == 1
    pbx = client.get("/api/v1/posts", headers=AUTH).get_json()["pbx"]
    assert pbx[PRIMARY]["up"] is False and pbx[SECONDARY] == {"host": "127.0.0.2", "up": True,
                                                              "since": pbx[SECONDARY]["since"]}
    [down] = [e for e in events(hub) if e.type == "pbx.down"]
    assert down.body["data"]["pbx"] == {"role": PRIMARY, "host": hub.site.pbx.host} and down.post_id is None
    link(hub, PRIMARY, True)
    assert [e.type for e in events(hub)] == ["pbx.down", "pbx.up"]
    assert client.get("/healthz", headers=AUTH).status_code == 200


def test_one_incident_with_both_legs_in_the_store_and_the_api(hub: Hub, client: FlaskClient) -> None:
    link(hub, PRIMARY, True)
    link(hub, SECONDARY, True)
    r = hub.recorder
    r.on_ami_event({"Event": "QueueCallerJoin", "Queue": "refuge", "Channel": "PJSIP/sutton-market-0000001a",
                    "Uniqueid": UID, "Position": "1"}, PRIMARY)
    r.on_ami_event({"Event": "AgentConnect", "Uniqueid": UID, "Interface": "PJSIP/desk-1"}, PRIMARY)
    link(hub, PRIMARY, False)
    r.on_ami_event({"Event": "QueueCallerJoin", "Queue": "refuge", "Channel": "PJSIP/sutton-market-0000002b",
                    "Uniqueid": UID, "Position": "1"}, SECONDARY)
    assert client.get("/api/v1/posts", headers=AUTH).get_json()["calls"][0]["pbx"] == SECONDARY
    r.on_ami_event({"Event": "AgentConnect", "Uniqueid": UID, "Interface": "PJSIP/desk-2"}, SECONDARY)
    r.on_ami_event({"Event": "Hangup", "Uniqueid": UID, "Cause-txt": "Normal Clearing"}, SECONDARY)
    [incident] = client.get("/api/v1/incidents", headers=AUTH).get_json()["incidents"]
    assert incident["pbx"] == SECONDARY and incident["state"] == "ended" and incident["answered_by"] == "desk-2"
    steps = [(t["kind"], t["detail"].get("pbx")) for t in incident["timeline"]]
    assert steps == [("queued", PRIMARY), ("answered", PRIMARY), ("moved", SECONDARY), ("answered", SECONDARY),
                     ("ended", SECONDARY)]
    calls = [e for e in events(hub) if e.type.startswith("call.")]
    assert [(e.type, e.body["data"]["pbx"]) for e in calls] == [
        ("call.queued", PRIMARY), ("call.answered", PRIMARY), ("call.answered", SECONDARY), ("call.ended", SECONDARY)]
    assert {e.incident for e in calls} == {incident["id"]}
