"""The post's state machine, rule by rule (spec section 4, issue 3), with explicit times and no sleeping."""

from __future__ import annotations

import ast
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest

import sip_refuge.post.machine as machine_module
from sip_refuge.config.model import Ami, Gpio, Location, Pbx, Post, Queue, Secret, SelfTest, Site
from sip_refuge.post import speech
from sip_refuge.post.commands import (
    Answer,
    CheckAudio,
    Command,
    Dial,
    Hangup,
    Light,
    PlayPrompt,
    ProbeCall,
    Reject,
    Report,
    Ring,
    SetLights,
    StopPrompts,
)
from sip_refuge.post.events import (
    AudioHeard,
    ButtonPressed,
    ButtonReleased,
    CallAnswered,
    CallEnded,
    CallFailed,
    CallProbed,
    CallProgress,
    Event,
    IncomingCall,
    MediaResumed,
    MediaStalled,
    Registered,
    RegistrationFailed,
    SelfTestRequested,
    TamperChanged,
    Unregistered,
)
from sip_refuge.post.machine import PostMachine, State

C = TypeVar("C", bound=Command)
DAY = 86400


def make_site(secondary: str | None = None, **post_fields: object) -> Site:
    post = Post(id="sutton-market", name="Sutton Market Place", extension="9001",
                location=Location("Market Place"), secret=Secret(env="X"),
                gpio=Gpio(button=17, yellow=22, green=23, red=24))
    post = replace(post, **post_fields)  # type: ignore[arg-type]
    return Site(path=Path("site.yaml"), name="Test", posts=(post,), desks=(), sidecar=None, cctv=(),
                pbx=Pbx(host="pbx-a", sip_port=5060, transport="udp", secondary_host=secondary,
                        ami=Ami("sidecar", Secret(env="Y"))),
                queue=Queue(name="refuge", extension="7000", ring_timeout=15, max_wait=30, overflow="7001"),
                self_test=SelfTest(extension="7099", interval=DAY))


class Harness:
    """A post machine plus everything it said, so tests read like the story of one post.

    While ``pbx_alive`` is True the PBX answers every INVITE (100 Trying) and every probe (200 to the OPTIONS) at
    once, as a running Asterisk does; set it False and both go unanswered, as after a ``kill -9``."""

    def __init__(self, site: Site | None = None, *, registered: bool = True) -> None:
        self.site = site or make_site()
        self.m = PostMachine(self.site, self.site.posts[0], now=0.0)
        self.out: list[Command] = []
        self.lights = SetLights()
        self.pbx_alive = True
        if registered:
            self.send(Registered("pbx-a"), 0.0)

    def send(self, event: Event, now: float) -> list[Command]:
        return self._record(self.m.handle(event, now), now)

    def tick(self, now: float) -> list[Command]:
        return self._record(self.m.tick(now), now)

    def _record(self, commands: list[Command], now: float) -> list[Command]:
        self.out += commands
        for command in commands:
            if isinstance(command, SetLights):
                self.lights = command
        for dial in of(Dial, commands):
            if self.pbx_alive:
                commands = commands + self.send(CallProgress(dial.call_id, 100), now)
        for probe in of(ProbeCall, commands):
            if self.pbx_alive:
                commands = commands + self.send(CallProbed(probe.call_id, 200), now)
        return commands

    def live_until(self, end: float) -> None:
        """Let time pass up to (not including) ``end``: every timer due before it fires (probes are answered
        while ``pbx_alive``), as the runner would make happen."""
        while (due := self.m.next_deadline()) is not None and due < end:
            self.tick(due)

    def press(self, now: float, release_after: float = 0.2) -> list[Command]:
        out = self.send(ButtonPressed(), now)
        return out + self.send(ButtonReleased(), now + release_after)

    def state(self) -> State:
        # A method, not an attribute: mypy would otherwise narrow the state across handle() calls.
        return self.m.state

    def call_id(self) -> str | None:
        call = self.m.status()["call"]
        return str(call["id"]) if isinstance(call, dict) else None

    def dial(self, commands: list[Command]) -> Dial:
        dials = of(Dial, commands)
        assert len(dials) == 1, commands
        return dials[0]


def of(kind: type[C], commands: list[Command]) -> list[C]:
    return [c for c in commands if isinstance(c, kind)]


def reports(commands: list[Command], kind: str) -> list[Report]:
    return [r for r in of(Report, commands) if r.kind == kind]


def lights(yellow: Light = Light.OFF, green: Light = Light.OFF, red: Light = Light.OFF) -> SetLights:
    return SetLights(yellow, green, red)


def connect(h: Harness, now: float) -> str:
    """Press, queue, answer: returns the call id of the connected alarm call."""
    cid = h.dial(h.press(now)).call_id
    h.send(CallProgress(cid, 180), now + 0.3)
    h.send(CallAnswered(cid), now + 5)
    assert h.state() is State.CONNECTED
    return cid


# ------------------------------------------------------------------------------------------------ start


def test_registration_makes_the_post_idle_with_all_lights_off() -> None:
    h = Harness(registered=False)
    assert h.state() is State.STARTING
    h.send(Registered("pbx-a"), 1.0)
    assert h.state() is State.IDLE and h.m.registered
    assert h.lights == lights()
    assert reports(h.out, "registration")[0].detail["registered"] is True


def test_registration_failure_shows_fault_red() -> None:
    h = Harness(registered=False)
    h.send(RegistrationFailed("408 timeout", 408), 1.0)
    assert h.state() is State.FAULT
    assert h.lights == lights(red=Light.ON)
    assert "unregistered" in h.m.faults()


def test_no_registration_within_the_grace_is_fault() -> None:
    h = Harness(registered=False)
    assert h.m.next_deadline() == h.m.settings.startup_grace
    h.tick(h.m.settings.startup_grace)
    assert h.state() is State.FAULT


def test_registration_lost_while_idle_is_fault_and_regained_is_idle() -> None:
    h = Harness()
    h.send(Unregistered("transport closed"), 10.0)
    assert h.state() is State.FAULT and h.lights.red is Light.ON
    h.send(Registered("pbx-a"), 20.0)
    assert h.state() is State.IDLE and h.lights == lights()
    assert [r.detail["registered"] for r in reports(h.out, "registration")] == [True, False, True]


# ------------------------------------------------------------------------------------------------ alarm


def test_press_dials_the_queue_first_then_plays_connecting() -> None:
    h = Harness()
    out = h.press(10.0)
    assert isinstance(out[0], Dial)  # the latency-critical command comes first
    assert out[0] == Dial(out[0].call_id, "queue", "7000", "pbx-a")
    assert PlayPrompt("connecting") in out
    assert h.state() is State.CALLING
    assert h.lights == lights()  # yellow waits for the PBX to register the alarm


def test_yellow_means_the_pbx_registered_the_alarm() -> None:
    h = Harness()
    cid = h.dial(h.press(10.0)).call_id
    h.send(CallProgress(cid, 100), 10.1)
    assert h.state() is State.CALLING and h.lights.yellow is Light.OFF
    h.send(CallProgress(cid, 183), 10.2)
    assert h.state() is State.QUEUED and h.lights == lights(yellow=Light.ON)


def test_green_means_an_operator_answered_and_yellow_stays_until_the_call_ends() -> None:
    h = Harness()
    cid = connect(h, 10.0)
    assert h.lights == lights(yellow=Light.ON, green=Light.ON)
    h.send(CallEnded(cid, "BYE"), 60.0)
    assert h.state() is State.IDLE and h.lights == lights()


def test_call_ends_when_the_far_end_hangs_up() -> None:
    h = Harness()
    cid = connect(h, 10.0)
    out = h.send(CallEnded(cid, "BYE"), 70.0)
    assert h.state() is State.IDLE
    assert not of(Hangup, out)  # the far end already hung up
    ended = [r for r in reports(out, "call") if r.detail["event"] == "ended"]
    assert ended and ended[0].detail["duration"] == pytest.approx(55.0)


def test_after_a_call_the_post_is_fault_when_not_registered() -> None:
    h = Harness()
    cid = connect(h, 10.0)
    h.send(Unregistered("registrar gone"), 20.0)
    assert h.state() is State.CONNECTED  # the call is still up: do not disturb it
    h.send(CallEnded(cid), 30.0)
    assert h.state() is State.FAULT and h.lights.red is Light.ON


def test_press_during_a_call_never_hangs_it_up() -> None:
    h = Harness()
    cid = h.dial(h.press(10.0)).call_id
    h.press(10.5)
    h.send(CallProgress(cid, 180), 11.0)
    h.press(12.0)
    h.send(CallAnswered(cid), 15.0)
    h.press(20.0)
    assert h.state() is State.CONNECTED
    assert not of(Hangup, h.out) and len(of(Dial, h.out)) == 1


def test_press_burst_gives_one_call() -> None:
    h = Harness()
    # Contact bounce (edges a millisecond apart), then a child pressing ten times, then 50 presses in 1 s.
    for i in range(5):
        h.send(ButtonPressed(), 10.0 + i * 0.001)
        h.send(ButtonReleased(), 10.0005 + i * 0.001)
    for i in range(10):
        h.press(11.0 + i * 0.4, release_after=0.1)
    for i in range(50):
        h.press(20.0 + i * 0.02, release_after=0.01)
    assert len(of(Dial, h.out)) == 1


def test_press_burst_while_the_call_keeps_failing_gives_one_alarm() -> None:
    h = Harness()
    cid = h.dial(h.press(10.0)).call_id
    h.send(CallFailed(cid, 503), 10.05)
    for i in range(50):
        h.press(10.1 + i * 0.018, release_after=0.005)
    # The first press of the burst re-sends the waiting alarm at once; the rest find it in flight.
    dials = of(Dial, h.out)
    assert len(dials) == 2 and h.state() is State.CALLING
    assert h.m.status()["alarm"]["attempts"] == 2  # type: ignore[index]
    h.tick(11.05)
    assert len(of(Dial, h.out)) == 2  # no second attempt while one is in flight


def test_press_while_unreachable_shows_fault_and_retries_with_backoff_until_through() -> None:
    h = Harness()
    now = 10.0
    cid = h.dial(h.press(now)).call_id
    delays = []
    for status in (None, 408, 503, None, 408, 503, None, 504):
        h.send(CallFailed(cid, status, "no route"), now)
        assert h.state() is State.FAULT and h.lights.red is Light.ON and "unreachable" in h.m.faults()
        deadline = h.m.next_deadline()
        assert deadline is not None
        delays.append(deadline - now)
        now = deadline
        cid = h.dial(h.tick(now)).call_id
        assert h.state() is State.CALLING and h.lights.red is Light.ON
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]
    h.send(CallProgress(cid, 180), now + 0.1)  # it went through: no second press was needed
    assert h.state() is State.QUEUED and h.lights == lights(yellow=Light.ON)
    assert h.m.faults() == []


def test_unreachable_plays_call_999_and_retries_play_please_hold() -> None:
    h = Harness()
    cid = h.dial(h.press(10.0)).call_id
    out = h.send(CallFailed(cid, 503), 10.1)
    assert PlayPrompt("unreachable") in out
    out = h.tick(11.1)
    assert PlayPrompt("hold") in out
    prompts = []
    now = 11.1
    for _ in range(6):  # repeats are spaced out, never one per attempt
        cid = of(Dial, h.out)[-1].call_id
        prompts += of(PlayPrompt, h.send(CallFailed(cid, None), now))
        now = h.m.next_deadline() or now
        prompts += of(PlayPrompt, h.tick(now))
    assert 1 <= len(prompts) <= 6 and all(p.name in ("unreachable", "hold") for p in prompts)


def test_retries_alternate_to_the_secondary_pbx() -> None:
    h = Harness(make_site(secondary="pbx-b"))
    first = h.dial(h.press(10.0))
    assert first.host == "pbx-a"
    h.send(CallFailed(first.call_id, 408), 10.5)
    second = h.dial(h.tick(11.5))
    assert second.host == "pbx-b"
    h.send(CallFailed(second.call_id, None), 12.0)
    third = h.dial(h.tick(14.0))
    assert third.host == "pbx-a"


def test_rejected_or_busy_call_is_retried_with_please_hold() -> None:
    h = Harness()
    cid = h.dial(h.press(10.0)).call_id
    out = h.send(CallFailed(cid, 486, "Busy Here"), 10.2)
    assert PlayPrompt("hold") in out and PlayPrompt("unreachable") not in out
    assert h.state() is State.FAULT
    assert len(of(Dial, h.tick(11.2))) == 1


def test_queue_dropping_the_alarm_unanswered_is_retried_and_yellow_stays() -> None:
    h = Harness()
    cid = h.dial(h.press(10.0)).call_id
    h.send(CallProgress(cid, 180), 10.2)
    h.send(CallEnded(cid, "overflow failed"), 45.0)
    assert h.state() is State.FAULT
    assert h.lights == lights(yellow=Light.ON, red=Light.ON)  # the alarm stays registered
    retry = h.dial(h.tick(46.0))
    h.send(CallProgress(retry.call_id, 180), 46.1)
    h.send(CallAnswered(retry.call_id), 50.0)
    assert h.lights == lights(yellow=Light.ON, green=Light.ON)


def test_no_ringing_from_a_pbx_that_only_said_trying_times_out_and_retries() -> None:
    h = Harness()
    cid = h.dial(h.press(10.0)).call_id  # 100 Trying, then nothing
    assert h.m.next_deadline() == 10.0 + h.m.settings.dial_timeout
    out = h.tick(10.0 + h.m.settings.dial_timeout)
    assert Hangup(cid, "timeout") in out and PlayPrompt("unreachable") in out
    assert h.state() is State.FAULT


def test_a_pbx_that_answers_nothing_at_all_is_given_up_after_4_s_and_the_alarm_resent() -> None:
    h = Harness(make_site(secondary="pbx-b"))
    h.pbx_alive = False
    first = h.dial(h.press(10.0))
    assert h.m.next_deadline() == 10.0 + h.m.settings.no_response
    out = h.tick(10.0 + h.m.settings.no_response)
    assert out[0] == Hangup(first.call_id, "no response") and PlayPrompt("unreachable") in out
    assert h.state() is State.FAULT
    h.pbx_alive = True
    retry = h.dial(h.tick(10.0 + h.m.settings.no_response + h.m.settings.retry_first))
    assert retry.host != first.host  # straight to the secondary
    h.tick(40.0)
    assert h.state() is State.CALLING  # this one answered (100 Trying): no fast-fail


def test_queued_too_long_is_hung_up_and_sent_again() -> None:
    h = Harness()
    cid = h.dial(h.press(10.0)).call_id
    h.send(CallProgress(cid, 180), 10.0)
    limit = 10.0 + h.site.queue.max_wait + h.m.settings.unanswered_extra
    h.live_until(limit)
    assert h.m.next_deadline() == limit and h.state() is State.QUEUED
    out = h.tick(limit)
    assert Hangup(cid, "timeout") in out and h.state() is State.FAULT
    assert len(of(Dial, h.tick(limit + 1))) == 1


def test_pbx_registering_again_resends_the_alarm_at_once() -> None:
    h = Harness()
    now = 10.0
    cid = h.dial(h.press(now)).call_id
    for _ in range(5):  # backoff grows to 16 s
        h.send(CallFailed(cid, None), now)
        now = h.m.next_deadline() or now
        cid = h.dial(h.tick(now)).call_id
    h.send(CallFailed(cid, None), now)
    h.send(Unregistered(), now)
    out = h.send(Registered("pbx-a"), now + 2)
    assert len(of(Dial, out)) == 1 and h.state() is State.CALLING


def test_registration_refresh_does_not_bypass_the_backoff() -> None:
    h = Harness()
    cid = h.dial(h.press(10.0)).call_id
    h.send(CallFailed(cid, 486), 10.1)
    assert of(Dial, h.send(Registered("pbx-a"), 10.5)) == []  # still registered: just a refresh
    assert h.m.next_deadline() == pytest.approx(11.1)


def test_press_while_not_registered_still_calls() -> None:
    h = Harness(registered=False)
    h.send(RegistrationFailed("timeout"), 1.0)
    cid = h.dial(h.press(5.0)).call_id
    h.send(CallProgress(cid, 180), 5.1)
    h.send(CallAnswered(cid), 8.0)
    assert h.state() is State.CONNECTED
    h.send(CallEnded(cid), 20.0)
    assert h.state() is State.FAULT


def test_maximum_call_duration_ends_the_call() -> None:
    h = Harness(make_site(max_call=600))
    cid = connect(h, 10.0)
    h.live_until(615.0)
    assert h.m.next_deadline() == 15.0 + 600
    out = h.tick(615.0)
    assert Hangup(cid, "maximum call duration") in out and h.state() is State.IDLE


def test_media_silence_alone_does_not_end_a_call_the_pbx_still_has() -> None:
    h = Harness()
    cid = connect(h, 10.0)
    h.live_until(100.0)
    out = h.send(MediaStalled(cid), 100.0)  # the desk's phone suppresses silence
    assert ProbeCall(cid) in out and not of(Hangup, out)  # asked at once, not at the next probe
    assert h.state() is State.CONNECTED and h.lights == lights(yellow=Light.ON, green=Light.ON)
    h.send(MediaResumed(cid), 103.0)
    h.live_until(200.0)
    assert h.m.faults() == [] and h.state() is State.CONNECTED


def test_dead_media_on_a_call_the_pbx_still_has_raises_a_fault_and_keeps_the_call() -> None:
    h = Harness()
    cid = connect(h, 10.0)
    h.send(MediaStalled(cid), 100.0)
    h.live_until(100.0 + h.m.settings.media_timeout)
    assert h.m.faults() == []  # not yet: silence suppression looks the same for a while
    out = h.tick(100.0 + h.m.settings.media_timeout)
    assert {"fault": "media_stalled", "active": True}.items() <= reports(out, "fault")[0].detail.items()
    assert reports(out, "call")[0].detail["event"] == "media_stalled"
    assert not of(Hangup, out) and h.state() is State.CONNECTED  # the caller may still be heard: not cut off
    assert h.lights == lights(yellow=Light.ON, green=Light.ON, red=Light.BLINK)
    out = h.send(MediaResumed(cid), 130.0)
    assert {"fault": "media_stalled", "active": False}.items() <= reports(out, "fault")[0].detail.items()
    h.send(MediaStalled(cid), 140.0)
    h.live_until(200.0)
    h.send(CallEnded(cid), 200.0)  # the fault belongs to the call: it ends with it
    assert h.m.faults() == [] and h.lights == lights()


def test_media_silence_and_an_unanswered_probe_end_the_call_and_resend_the_alarm() -> None:
    h = Harness()
    cid = connect(h, 10.0)
    h.live_until(100.0)
    h.pbx_alive = False
    out = h.send(MediaStalled(cid), 100.0)
    assert ProbeCall(cid) in out and h.state() is State.CONNECTED
    assert h.m.next_deadline() == 100.0 + h.m.settings.probe_timeout
    out = h.tick(100.0 + h.m.settings.probe_timeout)
    assert out[0] == Hangup(cid, "no answer to a probe within 4 s")
    assert h.dial(out).target == "queue"  # the caller may still be there: the alarm goes out again at once
    assert h.state() is State.CALLING and h.m.status()["alarm"]["attempts"] == 2  # type: ignore[index]


def test_late_answer_of_an_abandoned_attempt_is_hung_up() -> None:
    h = Harness()
    old = h.dial(h.press(10.0)).call_id
    h.tick(10.0 + h.m.settings.dial_timeout)
    new = h.dial(h.tick(43.0)).call_id
    out = h.send(CallAnswered(old), 43.5)
    assert out[0] == Hangup(old, "stale call") and h.state() is State.CALLING
    h.send(CallFailed(old, 503), 43.6)  # also stale: must not end the new attempt
    assert h.state() is State.CALLING and h.call_id() == new


# ------------------------------------------------------------------------------------------------ button


def test_button_held_over_30_s_is_reported_stuck_and_visible() -> None:
    h = Harness()
    cid = h.dial(h.send(ButtonPressed(), 10.0)).call_id
    h.send(CallProgress(cid, 180), 10.1)
    h.send(CallAnswered(cid), 12.0)
    h.live_until(40.0)
    assert h.m.next_deadline() == 40.0
    out = h.tick(40.0)
    assert [r.detail["fault"] for r in reports(out, "fault")] == ["button_stuck"]
    h.send(CallEnded(cid), 50.0)
    assert h.lights.red is Light.BLINK and "button_stuck" in h.m.faults()


def test_stuck_button_released_is_normal_again_and_calls() -> None:
    h = Harness()
    h.send(ButtonPressed(), 10.0)  # starts an alarm, then the button sticks
    cid = of(Dial, h.out)[0].call_id
    h.send(CallProgress(cid, 180), 10.1)
    h.send(CallAnswered(cid), 11.0)
    h.tick(45.0)
    h.send(CallEnded(cid), 60.0)
    assert h.state() is State.IDLE and "button_stuck" in h.m.faults()
    h.send(ButtonReleased(), 100.0)
    assert h.m.faults() == [] and h.lights == lights()
    assert len(of(Dial, h.press(101.0))) == 1


def test_press_edge_after_a_missed_release_clears_stuck_and_calls() -> None:
    h = Harness()
    h.send(ButtonPressed(), 10.0)
    cid = of(Dial, h.out)[0].call_id
    h.send(CallFailed(cid, 486), 10.1)
    h.send(CallFailed(h.dial(h.tick(11.1)).call_id, 486), 11.2)
    cid = h.dial(h.tick(13.2)).call_id
    h.send(CallAnswered(cid), 14.0)
    h.tick(41.0)
    h.send(CallEnded(cid), 42.0)
    out = h.send(ButtonPressed(), 50.0)  # the release edge was lost on a long cable
    assert len(of(Dial, out)) == 1 and "button_stuck" not in h.m.faults()


# ------------------------------------------------------------------------------------------------ self-test


RATE = 8000


def chirp(gain: float = 1.0, delay: float = 0.05, noise: float = 0.0, seconds: float = 3.0) -> bytes:
    """What a check records when the chirp comes back at ``gain`` after ``delay`` (seconds), over ``noise``."""
    heard = np.random.default_rng(7).standard_normal(int(seconds * RATE)) * noise
    signal = speech.test_signal(RATE) * gain
    start = int(delay * RATE)
    heard[start:start + len(signal)] += signal[: len(heard) - start]
    return speech.pcm16(heard)


def checks(h: Harness, commands: list[Command], *, call: bytes, local: bytes, now: float) -> list[Command]:
    """Answer the self-test's echo call and hand the machine what each check heard; everything it said."""
    dial = h.dial(commands)
    out = h.send(CallAnswered(dial.call_id), now)
    check = of(CheckAudio, out)[0]
    assert (check.path, check.call_id) == ("call", dial.call_id)
    out = h.send(AudioHeard(check.check_id, RATE, call), now + 3)
    assert Hangup(dial.call_id, "self-test: echo checked") in out
    check = of(CheckAudio, out)[0]
    assert (check.path, check.call_id) == ("local", None)
    return out + h.send(AudioHeard(check.check_id, RATE, local), now + 6)


def test_self_test_runs_every_interval_and_records_the_result() -> None:
    h = Harness()
    assert h.m.next_deadline() == DAY
    out = h.tick(DAY)
    assert StopPrompts() in out and h.dial(out).target == "selftest" and h.dial(out).extension == "7099"
    assert h.state() is State.SELFTEST
    out = checks(h, out, call=chirp(), local=chirp(gain=0.3, noise=0.05), now=DAY + 0.2)
    assert h.state() is State.IDLE
    last = h.m.status()["last_self_test"]
    assert isinstance(last, dict) and last["passed"] is True and last["part"] == "" and last["at"] == DAY + 6.2
    assert "pbx: chirp heard" in str(last["detail"]) and "local: chirp heard" in str(last["detail"])
    assert reports(out, "selftest")[0].detail["result"] == "pass"
    assert h.m.next_deadline() == 2 * DAY + 6.2


def test_self_test_on_demand() -> None:
    h = Harness()
    out = h.send(SelfTestRequested(), 100.0)
    assert h.dial(out).target == "selftest"


@pytest.mark.parametrize(("call", "local", "part"), [
    (chirp(), bytes(RATE * 6), "local"),  # a dead microphone: digital silence
    (chirp(), chirp(gain=0.3, noise=0.4), "local"),  # the speaker drowned: heard, but not clearly enough
    (chirp(), chirp(gain=0.001), "local"),  # a speaker that whispers
    (bytes(RATE * 6), chirp(gain=0.3), "pbx"),  # the echo returned silence
    (b"", chirp(gain=0.3), "pbx"),  # nothing came back at all
    (np.random.default_rng(1).integers(-8000, 8000, RATE * 3, dtype=np.int16).tobytes(), chirp(gain=0.3), "pbx"),
    (b"", b"", "local"),  # both failed: local, the part only this test can show (the detail names both)
])
def test_self_test_names_the_part_that_failed(call: bytes, local: bytes, part: str) -> None:
    h = Harness()
    out = checks(h, h.send(SelfTestRequested(), 100.0), call=call, local=local, now=100.1)
    last = h.m.status()["last_self_test"]
    assert isinstance(last, dict) and last["passed"] is False and last["part"] == part, last
    report = reports(out, "selftest")[0].detail
    assert report["result"] == "fail" and report["part"] == part
    assert {"fault": "selftest_failed", "active": True}.items() <= reports(out, "fault")[0].detail.items()
    assert h.lights == lights(red=Light.BLINK) and h.state() is State.IDLE


def test_self_test_failure_retries_in_10_minutes_and_a_pass_clears_it() -> None:
    h = Harness()
    checks(h, h.send(SelfTestRequested(), 100.0), call=b"", local=chirp(gain=0.3), now=100.1)
    assert h.m.next_deadline() == 706.1
    checks(h, h.tick(706.1), call=chirp(), local=chirp(gain=0.3), now=706.2)
    assert h.lights == lights() and h.m.faults() == []


def test_self_test_call_that_fails_or_times_out_fails_pbx_and_still_checks_local() -> None:
    h = Harness()
    cid = h.dial(h.send(SelfTestRequested(), 100.0)).call_id
    out = h.send(CallFailed(cid, 404), 100.1)
    check = of(CheckAudio, out)[0]
    assert check.path == "local" and h.state() is State.SELFTEST  # a dead PBX must not hide a dead speaker
    h.send(AudioHeard(check.check_id, RATE, chirp(gain=0.3)), 103.1)
    assert h.m.last_self_test is not None and h.m.last_self_test["part"] == "pbx"
    assert "the echo call failed: 404" in str(h.m.last_self_test["detail"])
    cid = h.dial(h.tick(703.1)).call_id
    out = h.tick(703.1 + h.m.settings.self_test_timeout)
    assert Hangup(cid, "the echo call timed out") in out and of(CheckAudio, out)[0].path == "local"


def test_a_backend_that_never_reports_what_it_heard_fails_the_check() -> None:
    h = Harness()
    cid = h.dial(h.send(SelfTestRequested(), 100.0)).call_id
    h.send(CallAnswered(cid), 100.2)
    s = h.m.settings
    assert h.m.next_deadline() == 100.2 + s.check_seconds + s.check_grace
    out = h.tick(100.2 + s.check_seconds + s.check_grace)
    assert Hangup(cid, "self-test: echo checked") in out
    h.tick(200.0)  # and the local check too
    assert h.m.last_self_test is not None and h.m.last_self_test["part"] == "local"
    assert str(h.m.last_self_test["detail"]).startswith("pbx: ")
    assert "recorded nothing in time" in str(h.m.last_self_test["detail"])


def test_press_during_self_test_aborts_it_and_calls_at_once() -> None:
    h = Harness()
    test_call = h.dial(h.send(SelfTestRequested(), 100.0)).call_id
    h.send(CallAnswered(test_call), 100.2)
    out = h.send(ButtonPressed(), 101.0)
    assert out[0] == Hangup(test_call, "self-test aborted")
    assert h.dial(out).target == "queue" and h.state() is State.CALLING
    h.send(AudioHeard(f"{test_call}-call", RATE, chirp()), 102.0)  # a late recording of the aborted test
    assert h.m.last_self_test is None and h.state() is State.CALLING
    assert reports(out, "selftest")[0].detail == {"post": h.m.post.id, "result": "aborted", "call": test_call}


def test_press_during_the_local_check_aborts_it_too() -> None:
    h = Harness()
    cid = h.dial(h.send(SelfTestRequested(), 100.0)).call_id
    out = h.send(CallFailed(cid, 503), 100.1)
    assert of(CheckAudio, out)[0].path == "local"
    out = h.send(ButtonPressed(), 101.0)
    assert h.dial(out).target == "queue" and reports(out, "selftest")[0].detail["result"] == "aborted"


def test_self_test_due_during_a_call_waits_for_the_call_to_end() -> None:
    h = Harness()
    cid = connect(h, DAY - 10)
    h.tick(DAY + 1)
    assert len(of(Dial, h.out)) == 1
    out = h.send(CallEnded(cid), DAY + 60)
    assert h.dial(out).target == "selftest"


# ------------------------------------------------------------------------------------------------ call-backs


def test_auto_answer_always_answers_a_call_back() -> None:
    h = Harness(make_site(auto_answer="always"))
    out = h.send(IncomingCall("in-1", "2001"), 100.0)
    assert out[0] == Answer("in-1") and h.state() is State.CONNECTED
    assert h.lights == lights(green=Light.ON)


def test_auto_answer_never_rings_and_a_press_answers() -> None:
    h = Harness(make_site(auto_answer="never"))
    out = h.send(IncomingCall("in-1", "2001"), 100.0)
    assert Ring("in-1") in out and not of(Answer, out) and h.state() is State.RINGING
    assert h.lights == lights(green=Light.BLINK)
    out = h.send(ButtonPressed(), 103.0)
    assert out[0] == Answer("in-1") and not of(Dial, out) and h.state() is State.CONNECTED


def test_after_alarm_answers_only_within_the_window_after_the_last_alarm_call() -> None:
    h = Harness(make_site(auto_answer="after_alarm", auto_answer_window=600))
    h.send(IncomingCall("in-0", "2001"), 5.0)  # standby: EN 81-28 forbids auto-answer
    assert h.state() is State.RINGING
    h.send(CallEnded("in-0", "CANCEL"), 10.0)
    cid = connect(h, 20.0)
    h.send(CallEnded(cid), 100.0)
    out = h.send(IncomingCall("in-1", "2001"), 699.0)
    assert out[0] == Answer("in-1")
    h.send(CallEnded("in-1"), 710.0)
    out = h.send(IncomingCall("in-2", "2001"), 701.0 + 600)
    assert Ring("in-2") in out and h.state() is State.RINGING


def test_call_back_while_the_alarm_waits_for_a_retry_is_answered_after_alarm() -> None:
    h = Harness(make_site(auto_answer="after_alarm"))
    cid = h.dial(h.press(10.0)).call_id
    h.send(CallFailed(cid, 503), 10.2)
    out = h.send(IncomingCall("in-1", "2001"), 10.5)
    assert out[0] == Answer("in-1") and h.state() is State.CONNECTED
    h.send(CallAnswered("in-1"), 10.6)  # the PBX's ACK: the desk that called back is there
    h.send(CallEnded("in-1"), 60.0)
    assert h.state() is State.IDLE and h.m.status()["alarm"] is None  # the alarm was acknowledged
    h.live_until(DAY)
    assert h.m.next_deadline() == DAY and len(of(Dial, h.out)) == 1  # no re-send after the acknowledgement


def test_incoming_call_during_an_alarm_call_is_rejected() -> None:
    h = Harness(make_site(auto_answer="always"))
    cid = connect(h, 10.0)
    out = h.send(IncomingCall("in-1", "2001"), 20.0)
    assert Reject("in-1", 486) in out and h.call_id() == cid


def test_call_back_during_a_self_test_aborts_the_test() -> None:
    h = Harness(make_site(auto_answer="always"))
    test_call = h.dial(h.send(SelfTestRequested(), 100.0)).call_id
    out = h.send(IncomingCall("in-1", "2001"), 101.0)
    assert Hangup(test_call, "self-test aborted") in out and Answer("in-1") in out


def test_ringing_call_back_ends_when_cancelled_or_unanswered() -> None:
    h = Harness(make_site(auto_answer="never"))
    h.send(IncomingCall("in-1", "2001"), 100.0)
    h.send(CallEnded("in-1", "CANCEL"), 110.0)
    assert h.state() is State.IDLE and h.lights == lights()
    h.send(IncomingCall("in-2", "2001"), 200.0)
    out = h.tick(200.0 + h.m.settings.callback_ring)
    assert Reject("in-2", 480) in out and h.state() is State.IDLE


def test_answered_call_back_has_a_maximum_duration_and_ends_when_the_pbx_is_gone() -> None:
    h = Harness(make_site(auto_answer="always", max_call=300))
    h.send(IncomingCall("in-1", "2001"), 100.0)
    assert Hangup("in-1", "maximum call duration") in h.tick(400.0)
    h.send(IncomingCall("in-2", "2001"), 500.0)
    h.pbx_alive = False
    assert ProbeCall("in-2") in h.send(MediaStalled("in-2"), 510.0)
    assert Hangup("in-2", "no answer to a probe") in h.send(CallProbed("in-2", None), 511.0)
    # No alarm to re-send: the post shows it lost the PBX until a registration succeeds again.
    assert h.state() is State.FAULT and h.lights.red is Light.ON and "unregistered" in h.m.faults()
    h.send(Registered("pbx-a"), 530.0)
    assert h.state() is State.IDLE and h.lights == lights()


# ------------------------------------------------------------------------------------------------ tamper, status, logs


def test_tamper_is_reported_and_shows_fault() -> None:
    h = Harness()
    out = h.send(TamperChanged(active=True), 50.0)
    assert reports(out, "fault")[0].detail["fault"] == "tamper"
    assert h.lights.red is Light.BLINK and "tamper" in h.m.faults()
    h.send(TamperChanged(active=False), 60.0)
    assert h.lights == lights() and h.m.faults() == []
    assert len(of(Dial, h.press(70.0))) == 1  # tamper never blocks an alarm


def test_status_is_json_with_the_spec_keys() -> None:
    h = Harness()
    cid = h.dial(h.press(10.0)).call_id
    h.send(CallProgress(cid, 180), 10.5)
    status = h.m.status(wall_offset=1000.0)
    assert json.loads(json.dumps(status)) == status
    assert status["state"] == "queued" and status["registered"] is True
    assert status["call"] == {"id": cid, "direction": "out", "target": "queue", "host": "pbx-a",
                              "since": 1010.0, "answered_at": None}
    assert status["last_self_test"] is None and status["faults"] == []


def test_every_transition_is_logged_with_the_post_id(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="sip_refuge.post.machine")
    h = Harness()
    connect(h, 10.0)
    states = reports(h.out, "state")
    lines = [r.getMessage() for r in caplog.records]
    assert len(states) == 4  # starting->idle->calling->queued->connected
    for report in states:
        assert any(f"{report.detail['previous']} -> {report.detail['state']}" in line for line in lines)
    assert all("sutton-market" in line for line in lines)


def test_lights_are_sent_only_when_they_change() -> None:
    h = Harness()
    assert of(SetLights, h.tick(5.0)) == []
    h.press(10.0)
    assert len(of(SetLights, h.out)) == 1  # calling looks like idle until the PBX has the alarm


def test_machine_is_pure_no_clock_threads_or_io() -> None:
    rooms = sorted(Path(machine_module.__file__).parent.glob("*.py"))
    assert len(rooms) > 1  # the package's rooms, every one of them, not just its __init__
    for room in rooms:
        tree = ast.parse(room.read_text(encoding="utf-8"))
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not imported & {"time", "threading", "socket", "asyncio", "os", "subprocess", "datetime"}, room.name
