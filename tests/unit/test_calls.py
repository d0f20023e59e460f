"""AMI events -> incidents and post reachability (the pure tracker, explicit times)."""

from __future__ import annotations

from sip_refuge.config import Site
from sip_refuge.sidecar.calls import (
    CALL_OVERFLOW_ANSWERED,
    CALL_OVERFLOWED,
    CALL_REQUEUED,
    CALL_RUNG,
    CallTracker,
    endpoint_of,
)


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
    [rung] = t.handle({"Event": "AgentCalled", "Uniqueid": "1700000000.1", "Interface": "PJSIP/desk-1"}, 100.1)
    assert rung.type == CALL_RUNG and rung.detail == {"desk": "desk-1"}  # the timeline's, not a CCTV event
    [answered] = t.handle({"Event": "AgentConnect", "Uniqueid": "1700000000.1", "Interface": "PJSIP/desk-2",
                           "MemberName": "Operator Desk 2"}, 104.5)
    assert answered.type == "call.answered" and answered.desk is not None and answered.desk.workstation == "ws-2"
    assert answered.incident == queued.incident and answered.detail["wait_seconds"] == 4.5
    [ended] = t.handle({"Event": "AgentComplete", "Uniqueid": "1700000000.1", "Reason": "agent"}, 160.0)
    assert ended.type == "call.ended" and ended.detail["outcome"] == "ended"
    assert t.handle({"Event": "Hangup", "Uniqueid": "1700000000.1"}, 160.1) == []
    assert t.live_calls() == []


# -- event orders as a real Asterisk 22.10.1 sent them --------------------------------------------------------
# Recorded on loopback with the sandbox config (queue.max_wait 6 s, ring_timeout 5 s), two desks, a raw SIP
# post, and AMI events of every class the sidecar's user reads; events of other channels' bookkeeping
# (VarSet, Newexten, RTCP) left out. Times are seconds after the post's INVITE; U is the caller's channel.
U = "1796164945.0"
CALLER = {"Uniqueid": U, "Channel": "PJSIP/sutton-market-00000000", "Queue": "refuge"}


def caller(name: str, kind: str = "alarm", **fields: str) -> dict[str, str]:
    event = {"Event": name, **CALLER, "ChanVariable(REFUGE_POST)": "sutton-market",
             "ChanVariable(REFUGE_KIND)": kind, **fields}
    if not name.startswith(("Queue", "Agent")):
        del event["Queue"]
    return event


def desk_channel(name: str, desk: str, uid: str, **fields: str) -> dict[str, str]:
    return {"Event": name, "Uniqueid": uid, "Channel": f"PJSIP/{desk}-0000000{uid[-1]}",
            "ChanVariable(REFUGE_POST)": "sutton-market", "ChanVariable(REFUGE_KIND)": "alarm", **fields}


RINGING_DESKS = [
    (0.008, caller("QueueCallerJoin", Position="1")),
    (0.010, caller("AgentCalled", Interface="PJSIP/desk-2", DestChannel="PJSIP/desk-2-00000001")),
    (0.010, caller("DialBegin", DestChannel="PJSIP/desk-2-00000001")),
    (0.013, caller("AgentCalled", Interface="PJSIP/desk-1", DestChannel="PJSIP/desk-1-00000002")),
    (0.013, caller("DialBegin", DestChannel="PJSIP/desk-1-00000002")),
    (0.013, desk_channel("Newstate", "desk-1", "1796164945.2", ChannelState="5")),
    (0.014, desk_channel("Newstate", "desk-2", "1796164945.1", ChannelState="5")),
]
# Nobody answers: after ring_timeout each desk stops ringing, and at max_wait the caller leaves the queue with
# an *abandon* (app_queue's record_abandoned() on a timeout) and goes on, still connected, to the overflow route.
NOT_ANSWERED = [
    (5.016, caller("AgentRingNoAnswer", Interface="PJSIP/desk-2")),
    (5.016, caller("AgentRingNoAnswer", Interface="PJSIP/desk-1")),
    (5.016, caller("DialEnd", DestChannel="PJSIP/desk-2-00000001", DialStatus="NOANSWER")),
    (5.016, caller("DialEnd", DestChannel="PJSIP/desk-1-00000002", DialStatus="NOANSWER")),
    (5.018, desk_channel("Hangup", "desk-2", "1796164945.1", **{"Cause-txt": "Unknown"})),
    (5.018, desk_channel("Hangup", "desk-1", "1796164945.2", **{"Cause-txt": "Unknown"})),
    (7.018, caller("QueueCallerAbandon", Position="1", HoldTime="7")),
    (7.020, caller("QueueCallerLeave", Position="1")),
]
# The overflow route dials a backup centre: it rings, then answers; later the post hangs up.
OVERFLOW_DIALS = [
    (7.020, caller("DialBegin", "overflow", DestChannel="PJSIP/overflow-centre-00000003")),
    (7.022, {"Event": "Newstate", "Uniqueid": "1796164945.3", "Channel": "PJSIP/overflow-centre-00000003",
             "ChannelState": "5", "ChanVariable(REFUGE_KIND)": "overflow"}),
    (9.028, caller("DialEnd", "overflow", DestChannel="PJSIP/overflow-centre-00000003", DialStatus="ANSWER")),
    (9.028, caller("Newstate", "overflow", ChannelState="6", ChannelStateDesc="Up")),
]
CALLER_HANGS_UP_IN_OVERFLOW = [
    (11.034, caller("HangupRequest", "overflow")),
    (11.035, caller("SoftHangupRequest", "overflow")),
    (11.035, caller("Hangup", "overflow", **{"Cause-txt": "Normal Clearing"})),
]
# The post hangs up (CANCEL) while the desks ring: the hang-up request comes first, then the same abandon and
# leave as a timeout, then the caller's channel is gone.
CALLER_HANGS_UP_QUEUED = [
    (2.003, caller("HangupRequest")),
    (2.004, caller("DialEnd", DestChannel="PJSIP/desk-2-00000001", DialStatus="CANCEL")),
    (2.004, caller("DialEnd", DestChannel="PJSIP/desk-1-00000002", DialStatus="CANCEL")),
    (2.006, caller("QueueCallerAbandon", Position="1", HoldTime="2")),
    (2.007, caller("QueueCallerLeave", Position="1")),
    (2.007, caller("SoftHangupRequest")),
    (2.008, caller("Hangup", **{"Cause-txt": "Interworking, unspecified"})),
    (2.010, desk_channel("Hangup", "desk-1", "1796164945.2", **{"Cause-txt": "Unknown"})),
]
# A desk answers: DialEnd ANSWER, the leave, then AgentConnect; the post hangs up later.
DESK_ANSWERS = [
    (0.022, caller("DialEnd", DestChannel="PJSIP/desk-1-00000002", DialStatus="ANSWER")),
    (0.022, caller("DialEnd", DestChannel="PJSIP/desk-2-00000001", DialStatus="CANCEL")),
    (0.022, desk_channel("Hangup", "desk-2", "1796164945.1", **{"Cause-txt": "Answered elsewhere"})),
    (0.022, caller("QueueCallerLeave", Position="1")),
    (0.025, caller("AgentConnect", Interface="PJSIP/desk-1", MemberName="Operator Desk 1", HoldTime="0")),
    (0.025, caller("Newstate", ChannelState="6", ChannelStateDesc="Up")),
    (1.029, caller("HangupRequest")),
    (1.030, caller("AgentComplete", Interface="PJSIP/desk-1", Reason="caller")),
    (1.031, caller("SoftHangupRequest")),
    (1.033, desk_channel("Hangup", "desk-1", "1796164945.2", **{"Cause-txt": "Normal Clearing"})),
    (1.034, caller("Hangup", **{"Cause-txt": "Normal Clearing"})),
]


def replay(t: CallTracker, events: list[tuple[float, dict[str, str]]]) -> list[tuple[str, dict[str, object]]]:
    """Feed ``events`` in order; the occurrences they raise (internal steps too) as (type, detail)."""
    return [(o.type, o.detail) for at, event in events for o in t.handle(event, at)]


def test_a_timeout_is_an_overflow_that_stays_live_until_the_caller_hangs_up(site: Site) -> None:
    t = CallTracker(site)
    assert [k for k, _ in replay(t, RINGING_DESKS)] == ["call.queued", CALL_RUNG, CALL_RUNG]
    # QueueCallerAbandon first, as Asterisk 22 sends it on a timeout: not an abandon, the caller is still there.
    [(kind, detail)] = replay(t, NOT_ANSWERED)
    assert kind == "call.unanswered" and detail["outcome"] == "overflowed" and detail["duration_seconds"] == 7.01
    [live] = t.live_calls()
    assert live.state == "overflowed"
    # The backup centre rings (still live), then answers: the caller talks to it, still live.
    assert replay(t, OVERFLOW_DIALS) == [(CALL_OVERFLOW_ANSWERED, {})]
    assert [c.state for c in t.live_calls()] == ["overflowed"]
    # Only the caller's hang-up ends it.
    [(kind, detail)] = replay(t, CALLER_HANGS_UP_IN_OVERFLOW)
    assert kind == "call.ended" and detail["outcome"] == "overflowed" and detail["cause"] == "Normal Clearing"
    assert t.live_calls() == [] and t.calls == {}


def test_a_caller_who_hangs_up_while_queued_is_abandoned_not_overflowed(site: Site) -> None:
    t = CallTracker(site)
    replay(t, RINGING_DESKS)
    [(kind, detail)] = replay(t, CALLER_HANGS_UP_QUEUED)
    assert kind == "call.unanswered" and detail["outcome"] == "abandoned"
    assert t.live_calls() == [] and t.calls == {}


def test_a_desk_answering_is_not_an_overflow(site: Site) -> None:
    t = CallTracker(site)
    replay(t, RINGING_DESKS)
    out = replay(t, DESK_ANSWERS)
    assert [k for k, _ in out] == ["call.answered", "call.ended"]
    assert out[1][1]["outcome"] == "ended" and out[1][1]["reason"] == "caller"


def test_an_overflowed_call_back_in_the_queue_can_still_be_answered(site: Site) -> None:
    """A site without an overflow route: the dialplan puts the alarm back in the queue after ring_timeout."""
    t = CallTracker(site)
    replay(t, RINGING_DESKS + NOT_ANSWERED)
    assert replay(t, [(12.0, caller("QueueCallerJoin", Position="1"))]) == [(CALL_REQUEUED, {})]
    assert [c.state for c in t.live_calls()] == ["queued"]
    # It times out again: recorded in the timeline, but call.unanswered went to the CCTV targets once.
    assert [k for k, _ in replay(t, [(18.0, caller("QueueCallerAbandon")), (18.0, caller("QueueCallerLeave"))])] \
        == [CALL_OVERFLOWED]
    replay(t, [(30.0, caller("QueueCallerJoin"))])
    out = replay(t, [(31.0, caller("AgentConnect", Interface="PJSIP/desk-1"))])
    assert [k for k, _ in out] == ["call.answered"] and out[0][1]["wait_seconds"] == 30.992


def test_queue_events_of_another_queue_are_not_ours(site: Site) -> None:
    """An overflow route that is a backup queue: its members are not our desks, its leave is no overflow."""
    t = CallTracker(site)
    replay(t, RINGING_DESKS + NOT_ANSWERED)
    backup = [(8.0, {**caller("QueueCallerJoin", "overflow"), "Queue": "backup"}),
              (9.0, {**caller("AgentConnect", "overflow", Interface="PJSIP/desk-1"), "Queue": "backup"}),
              (20.0, {**caller("QueueCallerLeave", "overflow"), "Queue": "backup"})]
    assert replay(t, backup) == []
    assert [c.state for c in t.live_calls()] == ["overflowed"]


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
    assert ("call.unanswered", "sutton-market") in kinds  # its channel is gone: abandoned (nobody answered)
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
