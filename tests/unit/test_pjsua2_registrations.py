"""The pjsua2 backend's watch over its registration with each PBX of a pair (issue 12.2): pjsua waits 32 s (timer F)
for a REGISTER nobody answers and reports no start of its own refreshes, so the backend works out when each
refresh is due and takes a PBX whose refresh is 4 s overdue for gone. Driven with explicit times (the module's
clock replaced) on the real backend class; no pjsua library is started: the callbacks are called as pjsua would."""

from __future__ import annotations

import pytest

import sip_refuge.post.sip.pjsua2_register as pjsua2_register
from sip_refuge.post.events import Event, Registered, Unregistered
from sip_refuge.post.sip.pjsua2 import MIN_REFRESH, REGISTER_TIMEOUT, Backend

A, B = "127.0.0.1", "127.0.0.2"
REFRESH = 5  # pbx.register_interval of the test sites: account_config makes it delayBeforeRefreshSec 55 of 60


class Clock:
    """The module's ``time``: ``monotonic()`` is whatever the test set."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class Account:
    """Stands in for a pjsua2 Account: the watch only ever asks it to register again."""

    def __init__(self) -> None:
        self.asked = 0

    def setRegistration(self, renew: bool) -> None:  # noqa: N802 - pjsua2's name
        self.asked += 1


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(pjsua2_register, "time", c)
    return c


def backend(events: list[Event]) -> Backend:
    b = Backend()
    b._emit = events.append
    b._before_expiry = 60 - REFRESH
    return b


def gone(events: list[Event]) -> list[str]:
    return [e.host for e in events if isinstance(e, Unregistered)]


def at(b: Backend, clock: Clock, now: float, *hosts: str) -> None:
    """The owner thread's timer tick at ``now``."""
    clock.now = now
    for host in hosts:
        b._watch_registration(host, Account(), now)


def answered(b: Backend, clock: Clock, now: float, host: str, granted: int = 60) -> None:
    clock.now = now
    b._on_reg_state(200, "OK", granted, host=host)


def test_a_refresh_unanswered_4_s_past_its_due_time_is_the_pbx_gone_once(clock: Clock) -> None:
    events: list[Event] = []
    b = backend(events)
    answered(b, clock, 1000.0, A)
    assert events == [Registered(A)]
    at(b, clock, 1000.0 + REFRESH + REGISTER_TIMEOUT - 0.5, A)
    assert gone(events) == []
    at(b, clock, 1000.0 + REFRESH + REGISTER_TIMEOUT + 0.5, A)
    at(b, clock, 1000.0 + REFRESH + REGISTER_TIMEOUT + 1.0, A)
    assert gone(events) == [A]
    answered(b, clock, 1020.0, A)  # pjsua's retransmission answered after all
    assert events[-1] == Registered(A)


def test_refreshes_answered_in_time_keep_the_pbx(clock: Clock) -> None:
    events: list[Event] = []
    b = backend(events)
    answered(b, clock, 1000.0, A)
    for n in range(1, 4):
        at(b, clock, 1000.0 + n * REFRESH + 1.0, A)
        answered(b, clock, 1000.0 + n * REFRESH + 1.5, A)  # the refresh of round n, answered 1.5 s late
    at(b, clock, 1000.0 + 3 * REFRESH + 1.5 + REFRESH + REGISTER_TIMEOUT - 0.1, A)
    assert gone(events) == [] and events.count(Registered(A)) == 4


def test_each_pbx_of_the_pair_is_watched_on_its_own(clock: Clock) -> None:
    events: list[Event] = []
    b = backend(events)
    answered(b, clock, 1000.0, A)
    answered(b, clock, 1000.0, B)
    answered(b, clock, 1000.0 + REFRESH, B)  # B answers its refresh; A never does (kill -9)
    at(b, clock, 1000.0 + REFRESH + REGISTER_TIMEOUT + 0.5, A, B)
    assert gone(events) == [A]


def test_a_short_grant_is_refreshed_no_sooner_than_pjsip_does(clock: Clock) -> None:
    events: list[Event] = []
    b = backend(events)
    answered(b, clock, 1000.0, A, granted=30)  # less than asked: pjsip refreshes at max(5, 30 - 55) s
    at(b, clock, 1000.0 + MIN_REFRESH + REGISTER_TIMEOUT - 0.5, A)
    assert gone(events) == []
    at(b, clock, 1000.0 + MIN_REFRESH + REGISTER_TIMEOUT + 0.5, A)
    assert gone(events) == [A]
