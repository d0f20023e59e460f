"""The post's state machine against issue 8: the call-back policy on every path, who may end a pending alarm,
dead calls found by probing, and a dead SIP stack. Explicit times, no sleeping (same harness as test_machine)."""

from __future__ import annotations

import pytest

from sip_refuge.post.commands import Answer, Dial, Hangup, Light, ProbeCall, Reject, Ring
from sip_refuge.post.events import (
    CallAnswered,
    CallEnded,
    CallFailed,
    CallProbed,
    CallProgress,
    IncomingCall,
    SelfTestRequested,
    SipStackFailed,
    SipStackRecovered,
)
from sip_refuge.post.machine import State
from tests.unit.test_machine import Harness, connect, lights, make_site, of, reports

WINDOW = 600


def harness(policy: str, secondary: str | None = None) -> Harness:
    return Harness(make_site(secondary=secondary, auto_answer=policy, auto_answer_window=WINDOW))


def waiting_to_resend(h: Harness, now: float) -> str:
    """Press while the PBX does not answer: the alarm waits to be re-sent (fault, red)."""
    cid = h.dial(h.press(now)).call_id
    h.send(CallFailed(cid, None, "no answer from the PBX"), now + 4)
    assert h.state() is State.FAULT and h.m.status()["alarm"] is not None
    return cid


def acknowledged_alarm(h: Harness, now: float) -> None:
    """An alarm a desk answered, ended normally at ``now + 30``."""
    cid = connect(h, now)
    h.send(CallEnded(cid, "BYE"), now + 30)
    assert h.state() is State.IDLE and h.m.status()["alarm"] is None


# ------------------------------------------------------------------------------------------- policy, every path

# (policy, path) -> answered without a press?
POLICY = {
    ("always", "standby"): True, ("after_alarm", "standby"): False, ("never", "standby"): False,
    ("always", "resend"): True, ("after_alarm", "resend"): True, ("never", "resend"): False,
    ("always", "window"): True, ("after_alarm", "window"): True, ("never", "window"): False,
    ("always", "late"): True, ("after_alarm", "late"): False, ("never", "late"): False,
}


@pytest.mark.parametrize(("policy", "path"), sorted(POLICY))
def test_call_back_policy_holds_on_every_path(policy: str, path: str) -> None:
    h = harness(policy)
    now = 100.0
    if path == "resend":
        waiting_to_resend(h, now)
        now += 4.5  # before the retry is due (1 s backoff after 104.0)
    elif path == "window":
        acknowledged_alarm(h, now)
        now += 30 + WINDOW  # the last second of the window
    elif path == "late":
        acknowledged_alarm(h, now)
        now += 30 + WINDOW + 1
    out = h.send(IncomingCall("in-1", "2001"), now)
    if POLICY[(policy, path)]:
        assert out[0] == Answer("in-1") and h.state() is State.CONNECTED
        assert h.lights.green is Light.ON
    else:
        assert Ring("in-1") in out and not of(Answer, out) and h.state() is State.RINGING
        assert h.lights.green is Light.BLINK
        out = h.send(CallAnswered("in-1"), now + 1)  # nothing is answered by the PBX's events alone
        assert not of(Answer, out) and h.state() is State.RINGING
        out = h.press(now + 2)  # a press answers it: it raises no alarm of its own
        assert out[0] == Answer("in-1") and not of(Dial, out) and h.state() is State.CONNECTED


@pytest.mark.parametrize("policy", ["always", "after_alarm", "never"])
def test_call_back_during_an_alarm_call_is_refused_whatever_the_policy(policy: str) -> None:
    h = harness(policy)
    cid = h.dial(h.press(10.0)).call_id
    assert Reject("in-1", 486) in h.send(IncomingCall("in-1", "2001"), 10.1)  # calling
    h.send(CallProgress(cid, 183), 10.2)
    assert Reject("in-2", 486) in h.send(IncomingCall("in-2", "2001"), 11.0)  # queued
    h.send(CallAnswered(cid), 12.0)
    assert Reject("in-3", 486) in h.send(IncomingCall("in-3", "2001"), 13.0)  # connected
    assert h.call_id() == cid and h.state() is State.CONNECTED


@pytest.mark.parametrize("policy", ["after_alarm", "never"])
def test_call_back_during_a_self_test_aborts_it_and_rings_by_policy(policy: str) -> None:
    h = harness(policy)
    test_call = h.dial(h.send(SelfTestRequested(), 100.0)).call_id
    out = h.send(IncomingCall("in-1", "2001"), 101.0)
    assert Hangup(test_call, "self-test aborted") in out
    assert Ring("in-1") in out and not of(Answer, out) and h.state() is State.RINGING


# ------------------------------------------------------------------------------------------- who ends an alarm

def test_a_call_back_that_ends_before_the_pbx_confirmed_it_leaves_the_alarm_to_be_resent() -> None:
    h = harness("after_alarm")
    waiting_to_resend(h, 100.0)
    assert h.send(IncomingCall("in-1", "2001"), 104.5)[0] == Answer("in-1")
    out = h.send(CallEnded("in-1", "BYE"), 106.0)  # hung up before any ACK: nobody talked to the post
    assert h.m.status()["alarm"] is not None
    assert h.dial(out).target == "queue" and h.state() is State.CALLING  # the retry was due: sent at once


def test_a_ringing_call_back_that_gives_up_leaves_the_alarm() -> None:
    h = harness("never")
    waiting_to_resend(h, 100.0)
    h.send(IncomingCall("in-1", "2001"), 104.5)
    out = h.send(CallEnded("in-1", "CANCEL"), 110.0)
    assert h.m.status()["alarm"] is not None and h.dial(out).target == "queue"
    assert reports(out, "call")[0].detail["event"] == "missed"


def test_only_a_confirmed_call_back_acknowledges_the_alarm_and_opens_the_window() -> None:
    h = harness("after_alarm")
    waiting_to_resend(h, 100.0)
    h.send(IncomingCall("in-1", "2001"), 104.5)
    h.send(CallAnswered("in-1"), 104.6)
    h.send(CallEnded("in-1", "BYE"), 130.0)
    assert h.m.status()["alarm"] is None and h.state() is State.IDLE
    assert h.send(IncomingCall("in-2", "2001"), 130.0 + WINDOW)[0] == Answer("in-2")


def test_an_alarm_call_dropped_before_an_answer_keeps_the_alarm() -> None:
    h = harness("after_alarm")
    cid = h.dial(h.press(10.0)).call_id
    h.send(CallProgress(cid, 183), 10.1)
    h.send(CallEnded(cid, "BYE"), 12.0)  # not answered: the queue (or whoever) dropped it
    assert h.m.status()["alarm"] is not None and h.state() is State.FAULT
    # And it is not "after an alarm" yet for the window: still pending, so a call-back is answered ...
    assert h.send(IncomingCall("in-1", "2001"), 12.5)[0] == Answer("in-1")


# ------------------------------------------------------------------------------------------- dead calls

def test_a_queued_call_is_probed_and_resent_to_the_secondary_when_the_pbx_is_gone() -> None:
    h = harness("after_alarm", secondary="pbx-b")
    first = h.dial(h.press(10.0))
    h.send(CallProgress(first.call_id, 183), 10.1)
    assert h.m.next_deadline() == 10.1 + h.m.settings.probe_interval
    h.pbx_alive = False
    out = h.tick(15.1)
    assert out == [ProbeCall(first.call_id)]
    out = h.tick(15.1 + h.m.settings.probe_timeout)
    assert out[0] == Hangup(first.call_id, "no answer to a probe within 4 s")
    again = h.dial(out)
    assert again.host == "pbx-b" and h.state() is State.CALLING
    assert h.lights == lights(red=Light.ON)  # yellow off: no PBX has the alarm now; red: re-sending
    assert [r.detail["event"] for r in reports(out, "call")] == ["lost", "dial"]


def test_a_connected_call_the_pbx_no_longer_knows_is_lost_and_the_alarm_resent() -> None:
    h = harness("after_alarm")
    cid = connect(h, 10.0)
    h.live_until(25.0)
    h.pbx_alive = False
    probe = h.tick(25.0)
    assert probe == [ProbeCall(cid)]
    out = h.send(CallProbed(cid, 481), 25.01)  # Asterisk restarted: no such dialog
    assert out[0] == Hangup(cid, "probe answered 481")
    assert h.dial(out).target == "queue" and h.m.status()["alarm"]["attempts"] == 2  # type: ignore[index]
    assert h.lights.green is Light.OFF


def test_probe_answers_keep_the_call_and_schedule_the_next() -> None:
    h = harness("after_alarm")
    cid = connect(h, 10.0)
    h.pbx_alive = False
    assert h.tick(20.0) == [ProbeCall(cid)]
    assert h.send(CallProbed(cid, 405), 21.0) == []  # any answer but 481/408: the PBX has the call
    assert h.m.next_deadline() == 26.0 and h.state() is State.CONNECTED
    assert h.send(CallProbed("old-call", None), 22.0) == []  # a stale answer changes nothing
    assert h.tick(26.0) == [ProbeCall(cid)]
    assert h.send(CallProbed(cid, 0), 26.1) == []  # a backend that cannot probe: no verdict, the call stays
    assert h.state() is State.CONNECTED and h.m.next_deadline() == 31.1


def test_calls_are_not_probed_before_the_pbx_has_them_or_while_ringing() -> None:
    h = harness("never")
    h.dial(h.press(10.0))
    h.tick(10.0 + h.m.settings.probe_interval + 1)
    assert not of(ProbeCall, h.out)  # calling: the dial timeout governs
    h2 = harness("never")
    h2.send(IncomingCall("in-1", "2001"), 10.0)
    h2.tick(30.0)
    assert not of(ProbeCall, h2.out) and h2.state() is State.RINGING


# ------------------------------------------------------------------------------------------- a dead SIP stack

def test_a_dead_sip_stack_is_a_fault_shown_red_until_it_recovers() -> None:
    h = harness("after_alarm")
    out = h.send(SipStackFailed("thread pyvoip-x died"), 50.0)
    assert h.state() is State.FAULT and h.lights == lights(red=Light.ON)
    assert "sip_stack" in h.m.faults()
    assert {"fault": "sip_stack", "active": True}.items() <= reports(out, "fault")[0].detail.items()
    h.send(CallProbed("x", 200), 51.0)
    h.send(IncomingCall("in-1", "2001"), 52.0)  # whatever still trickles in does not make it look fine
    h.send(CallEnded("in-1", "CANCEL"), 53.0)
    assert h.state() is State.FAULT and h.lights.red is Light.ON
    h.send(SipStackRecovered(), 60.0)
    assert h.state() is State.IDLE and h.lights == lights() and h.m.faults() == []


def test_a_sip_stack_dying_mid_call_loses_the_call_and_keeps_the_alarm() -> None:
    h = harness("after_alarm")
    cid = connect(h, 10.0)
    out = h.send(SipStackFailed("stalled for 12 s"), 18.0)
    assert Hangup(cid, "SIP stack failed") in out
    assert h.m.status()["alarm"] is not None and h.lights.green is Light.OFF and h.lights.red is Light.ON
