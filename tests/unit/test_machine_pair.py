"""The post's state machine on a PBX pair (issue 12.2): it follows which PBX has it registered, sends an alarm to
a live one first, and moves to the other when a call shows its PBX gone. Explicit times, no sleeping (the
harness of test_machine)."""

from __future__ import annotations

from sip_refuge.post.commands import Dial, Hangup
from sip_refuge.post.events import (
    CallAnswered,
    CallEnded,
    CallFailed,
    CallProgress,
    Registered,
    RegistrationFailed,
    SelfTestRequested,
    Unregistered,
)
from sip_refuge.post.machine import State
from tests.unit.test_machine import Harness, connect, make_site, of, reports

A, B = "pbx-a", "pbx-b"


def pair(*, b_registered: bool = True) -> Harness:
    h = Harness(make_site(secondary=B))  # registered with A at 0.0
    if b_registered:
        h.send(Registered(B), 0.1)
    return h


def test_both_registered_alarms_go_to_the_primary() -> None:
    h = pair()
    assert h.m.status()["registrations"] == {A: True, B: True}
    assert h.dial(h.press(10.0)).host == A


def test_losing_one_pbx_keeps_the_post_idle_and_the_next_alarm_goes_to_the_other_at_once() -> None:
    h = pair()
    out = h.send(RegistrationFailed("no answer from the PBX", None, host=A), 5.0)
    assert h.state() is State.IDLE and h.m.registered and "unregistered" not in h.m.faults()
    assert h.m.status()["registrations"] == {A: False, B: True}
    assert [(r.detail["host"], r.detail["registered"]) for r in reports(out, "registration")] == [(A, True)]
    first = h.dial(h.press(10.0))
    assert first.host == B  # the first INVITE, not a retry after a timeout


def test_the_primary_registering_again_takes_the_alarms_back() -> None:
    h = pair()
    h.send(Unregistered("transport closed", host=A), 5.0)
    h.send(Registered(A), 20.0)
    assert h.dial(h.press(30.0)).host == A


def test_a_post_only_the_secondary_has_calls_it_first() -> None:
    h = Harness(make_site(secondary=B), registered=False)
    h.send(RegistrationFailed("no answer from the PBX", None, host=A), 1.0)
    h.send(Registered(B), 1.5)
    assert h.state() is State.IDLE
    assert h.dial(h.press(10.0)).host == B


def test_an_unanswered_invite_moves_the_alarm_and_the_next_one_to_the_other_pbx() -> None:
    h = pair()
    first = h.dial(h.press(10.0))
    assert first.host == A  # the post did not know A had died
    h.send(CallFailed(first.call_id, None, "no response from the PBX"), 14.0)
    assert h.m.status()["registrations"] == {A: False, B: True} and h.m.registered
    retry = h.dial(h.tick(15.0))
    assert retry.host == B
    h.send(CallProgress(retry.call_id, 183), 15.1)
    h.send(CallAnswered(retry.call_id), 18.0)
    h.send(CallEnded(retry.call_id, "bye"), 40.0)
    assert h.state() is State.IDLE
    assert h.dial(h.press(60.0)).host == B  # A has not registered the post again yet


def test_a_refused_call_is_tried_on_the_other_pbx_but_its_pbx_stays_in_use() -> None:
    h = pair()
    first = h.dial(h.press(10.0))
    h.send(CallFailed(first.call_id, 486, "Busy Here"), 10.2)
    assert h.m.status()["registrations"] == {A: True, B: True}  # a PBX that answers is alive
    assert h.dial(h.tick(11.2)).host == B  # alternating: another PBX may have a free desk


def test_a_call_lost_with_its_pbx_is_resent_to_the_other_at_once() -> None:
    h = pair()
    cid = connect(h, 10.0)
    h.live_until(20.0)
    h.pbx_alive = False  # kill -9 of A: probes go unanswered
    while Hangup(cid, "no answer to a probe within 4 s") not in h.out:
        due = h.m.next_deadline()
        assert due is not None and due < 40.0
        h.tick(due)
    again = of(Dial, h.out)[-1]
    assert again.host == B and h.state() is State.CALLING
    assert h.m.registered and h.m.status()["registrations"] == {A: False, B: True}
    assert h.m.status()["alarm"]["attempts"] == 2  # type: ignore[index]  # the same alarm, no second press


def test_both_gone_is_a_fault_until_either_registers_the_post() -> None:
    h = pair()
    h.send(Unregistered("gone", host=A), 5.0)
    h.send(Unregistered("gone", host=B), 6.0)
    assert h.state() is State.FAULT and not h.m.registered and "unregistered" in h.m.faults()
    first = h.dial(h.press(10.0))
    h.send(CallFailed(first.call_id, None), 14.0)
    out = h.send(Registered(B), 15.0)  # the backoff is not waited out
    assert h.dial(out).host == B


def test_a_refresh_of_a_registered_pbx_does_not_bypass_the_backoff() -> None:
    h = pair()
    first = h.dial(h.press(10.0))
    h.send(CallFailed(first.call_id, 486), 10.1)
    assert of(Dial, h.send(Registered(B), 10.5)) == []


def test_the_self_test_goes_to_a_live_pbx() -> None:
    h = pair()
    h.send(Unregistered("gone", host=A), 5.0)
    out = h.send(SelfTestRequested(), 10.0)
    test = h.dial(out)
    assert test.target == "selftest" and test.host == B


def test_one_pbx_alone_is_not_marked_down_by_a_failed_call() -> None:
    h = Harness()  # no secondary: behaviour as before the pair
    first = h.dial(h.press(10.0))
    h.send(CallFailed(first.call_id, None), 14.0)
    assert h.m.registered and h.m.status()["registrations"] == {A: True}
    assert h.dial(h.tick(15.0)).host == A
