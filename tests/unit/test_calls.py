"""AMI events -> incidents and post reachability (the pure tracker, explicit times)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sip_refuge.config import Site, load_site
from sip_refuge.config.secrets import init_secrets
from sip_refuge.sidecar.calls import CallTracker, endpoint_of

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "site.example.yaml"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    path = tmp_path_factory.mktemp("site") / "site.yaml"
    shutil.copy(EXAMPLE, path)
    init_secrets(load_site(path, check_secrets=False))
    return load_site(path)


def join(uid: str = "1700000000.1", post: str = "sutton-market") -> dict[str, str]:
    return {"Event": "QueueCallerJoin", "Queue": "refuge", "Channel": f"PJSIP/{post}-0000001a",
            "Uniqueid": uid, "Position": "1", "CallerIDName": "Sutton Market Place"}


def test_endpoint_names_come_from_channels_and_interfaces() -> None:
    assert endpoint_of("PJSIP/sutton-market-0000001a") == "sutton-market"
    assert endpoint_of("PJSIP/desk-1") == "desk-1"
    assert endpoint_of("Local/7000@x-0001;1") is None


def test_answered_call_goes_queued_answered_ended(site: Site) -> None:
    t = CallTracker(site)
    [queued] = t.handle(join(), 100.0)
    assert queued.type == "call.queued" and queued.post.id == "sutton-market" and queued.incident
    assert t.handle({"Event": "AgentCalled", "Uniqueid": "1700000000.1", "Interface": "PJSIP/desk-1"}, 100.1) == []
    [answered] = t.handle({"Event": "AgentConnect", "Uniqueid": "1700000000.1", "Interface": "PJSIP/desk-2",
                           "MemberName": "Operator Desk 2"}, 104.5)
    assert answered.type == "call.answered" and answered.desk is not None and answered.desk.workstation == "ws-2"
    assert answered.incident == queued.incident and answered.detail["wait_seconds"] == 4.5
    [ended] = t.handle({"Event": "AgentComplete", "Uniqueid": "1700000000.1", "Reason": "agent"}, 160.0)
    assert ended.type == "call.ended" and ended.detail["outcome"] == "ended"
    assert t.handle({"Event": "Hangup", "Uniqueid": "1700000000.1"}, 160.1) == []
    assert t.live_calls() == []


def test_timeout_overflows_and_is_reported_once(site: Site) -> None:
    t = CallTracker(site)
    t.handle(join(), 0.0)
    [left] = t.handle({"Event": "QueueCallerLeave", "Uniqueid": "1700000000.1", "Queue": "refuge"}, 30.0)
    assert left.type == "call.unanswered" and left.detail["outcome"] == "overflowed"
    assert t.handle({"Event": "Hangup", "Uniqueid": "1700000000.1"}, 45.0) == []


def test_caller_hanging_up_while_waiting_is_abandoned(site: Site) -> None:
    t = CallTracker(site)
    t.handle(join(), 0.0)
    [gone] = t.handle({"Event": "QueueCallerAbandon", "Uniqueid": "1700000000.1"}, 5.0)
    assert gone.type == "call.unanswered" and gone.detail["outcome"] == "abandoned"


def test_calls_from_unknown_endpoints_or_other_queues_are_ignored(site: Site) -> None:
    t = CallTracker(site)
    assert t.handle(join(post="desk-1"), 0.0) == []
    assert t.handle({**join(), "Queue": "sales"}, 0.0) == []
    assert t.handle({"Event": "AgentConnect", "Uniqueid": "nope"}, 1.0) == []


def test_post_offline_after_grace_and_online_again(site: Site) -> None:
    t = CallTracker(site, offline_grace=30)
    status = {"Event": "ContactStatus", "EndpointName": "idlewells", "AOR": "idlewells"}
    assert t.handle({**status, "ContactStatus": "Reachable"}, 0.0) == []
    assert t.handle({**status, "ContactStatus": "Unreachable"}, 10.0) == []
    assert t.next_deadline() == 40.0
    assert t.tick(39.9) == []
    [offline] = t.tick(40.0)
    assert offline.type == "post.offline" and offline.post.id == "idlewells"
    assert t.tick(100.0) == []  # once
    [online] = t.handle({**status, "ContactStatus": "Reachable"}, 120.0)
    assert online.type == "post.online"


def test_short_blip_within_grace_raises_nothing(site: Site) -> None:
    t = CallTracker(site, offline_grace=30)
    status = {"Event": "ContactStatus", "EndpointName": "idlewells"}
    t.handle({**status, "ContactStatus": "Unreachable"}, 0.0)
    assert t.handle({**status, "ContactStatus": "Reachable"}, 20.0) == []
    assert t.tick(100.0) == []


def test_resync_closes_vanished_calls_adopts_waiting_ones_and_sets_reachability(site: Site) -> None:
    t = CallTracker(site, offline_grace=0)
    t.handle(join("1.1", "sutton-market"), 0.0)
    out = t.resync(50.0, contacts={"sutton-market": "Reachable", "idlewells": "Unreachable"},
                   channels={"2.2"},
                   queue_entries=[{"Event": "QueueEntry", "Channel": "PJSIP/idlewells-00000003", "Uniqueid": "2.2"}])
    kinds = [(o.type, o.post.id) for o in out]
    assert ("call.unanswered", "sutton-market") in kinds  # its channel is gone
    assert ("call.queued", "idlewells") in kinds  # was waiting while we were away
    assert [c.post.id for c in t.live_calls()] == ["idlewells"]
    offline = {o.post.id for o in t.tick(50.0) if o.type == "post.offline"}
    assert offline == {"idlewells", "kirkby-bus-station"}


def test_answered_call_is_not_mistaken_for_an_overflow(site: Site) -> None:
    """Asterisk sends QueueCallerLeave before AgentConnect; the DialEnd ANSWER in between marks it answered."""
    t = CallTracker(site)
    t.handle(join(), 0.0)
    t.handle({"Event": "DialEnd", "Uniqueid": "1700000000.1", "DialStatus": "ANSWER",
              "DestChannel": "PJSIP/desk-1-00000002"}, 3.0)
    assert t.handle({"Event": "QueueCallerLeave", "Uniqueid": "1700000000.1", "Queue": "refuge"}, 3.0) == []
    [answered] = t.handle({"Event": "AgentConnect", "Uniqueid": "1700000000.1", "Interface": "PJSIP/desk-1"}, 3.0)
    assert answered.type == "call.answered"


def test_a_new_contact_before_the_old_ones_removal_keeps_the_post_online(site: Site) -> None:
    t = CallTracker(site, offline_grace=0)
    status = {"Event": "ContactStatus", "EndpointName": "idlewells"}
    t.handle({**status, "ContactStatus": "Reachable", "URI": "sip:idlewells@127.0.0.1:5001"}, 0.0)
    t.handle({**status, "ContactStatus": "Created", "URI": "sip:idlewells@127.0.0.1:5002"}, 1.0)
    t.handle({**status, "ContactStatus": "Removed", "URI": "sip:idlewells@127.0.0.1:5001"}, 1.1)
    assert t.is_online("idlewells") is True and t.tick(10.0) == []


def test_resync_from_device_states_gives_way_to_contact_events(site: Site) -> None:
    """A resync without contact addresses (device states) is replaced by the first real ContactStatus."""
    t = CallTracker(site, offline_grace=0)
    t.resync(0.0, {"idlewells": "Reachable"}, set(), [])
    assert t.is_online("idlewells") is True
    t.handle({"Event": "ContactStatus", "EndpointName": "idlewells", "ContactStatus": "Unreachable",
              "URI": "sip:idlewells@127.0.0.1:5001"}, 5.0)
    assert [o.type for o in t.tick(5.0) if o.post.id == "idlewells"] == ["post.offline"]
