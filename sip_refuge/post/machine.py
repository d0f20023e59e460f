"""The post's behaviour as a pure state machine (sans-I/O, in the manner of aioquic).

``PostMachine.handle(event, now)`` returns the commands to execute; ``next_deadline()`` says when the runner
must call ``tick(now)`` if nothing else happens. There are no threads, sleeps, clocks or I/O in here, so
every rule of spec section 4 is tested with explicit times.

Vocabulary: an *alarm* starts with a press and lasts until a call carrying it is answered by a desk and
then ends normally. It survives failed attempts and calls lost with the PBX (EN 81-28: the alarm is re-sent
until acknowledged), which is also what makes a burst of presses one call: while an alarm exists a press has
nothing left to do.

Backends report facts (a response, a probe's answer, silence on the media, what a microphone heard); every
timing decision and every verdict is here, in :class:`Settings`: how often an established call is probed, how
long the PBX may take to answer, how long a silence is dead media, what a self-test must hear.

**The self-test** (as 2N, Commend and Zenitel do it) has two checks, each judged by :func:`speech.match` on what
the backend recorded (:class:`~sip_refuge.post.commands.CheckAudio`, :class:`~sip_refuge.post.events.AudioHeard`):

* ``pbx``: a call to the PBX's echo extension; a chirp sent into the call must come back (network, PBX, media).
  A call that fails, is not answered or drops counts as this part failing.
* ``local``: the chirp played on the post's own speaker must reach its microphone (speaker, microphone, wiring).
  It runs after the first, with or without the call, so a dead PBX does not hide a dead speaker.

The result names the failed part (``last_self_test.part``): ``local`` or ``pbx``. When both fail it says ``local``,
since only this post's own self-test can show a dead speaker or microphone, while a dead PBX shows everywhere
(registrations, every post's self-test); the detail names both.

**Dead media** (the rule, written down): while connected, RTP silence alone never ends a call, because a desk
with silence suppression sends none. Silence (:class:`~sip_refuge.post.events.MediaStalled`) makes the machine
probe the PBX at once: a PBX that no longer has the call ends it (lost, the alarm re-sent). A PBX that still has
it keeps it; if the silence lasts ``media_timeout`` the post raises the ``media_stalled`` fault (red blinking,
telemetry, dashboard): someone must look at a call the post cannot hear, while the caller, who may still be
heard, is not cut off. The fault clears when audio returns or the call ends.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import StrEnum

from sip_refuge.config.model import Post, Site
from sip_refuge.post import speech
from sip_refuge.post.commands import (
    Answer,
    CheckAudio,
    Command,
    Dial,
    Hangup,
    Json,
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
    SipStackFailed,
    SipStackRecovered,
    TamperChanged,
    Tick,
    Unregistered,
)

log = logging.getLogger(__name__)


class State(StrEnum):
    STARTING = "starting"  # no registration result yet; not worth a red light during boot
    IDLE = "idle"
    CALLING = "calling"
    QUEUED = "queued"
    CONNECTED = "connected"
    FAULT = "fault"
    SELFTEST = "selftest"
    RINGING = "ringing"


# Final responses that mean "no PBX answered" rather than "the PBX said no"; None is a timeout or a
# transport error. They get the "call 999" prompt, the others "please hold".
UNREACHABLE = frozenset({None, 408, 500, 502, 503, 504})
# Answers to a probe that mean the PBX no longer has the call (481: no such dialog, 408: nobody answered).
PROBE_LOST = frozenset({None, 408, 481})
# Faults that stop every call (red on, state fault), unlike device faults a visit fixes (red blinking).
STOPPING_FAULTS = frozenset({"sip_stack"})


@dataclass(frozen=True)
class Settings:
    """Timings of the machine. Defaults follow the standards and the field notes; tests shorten nothing."""

    debounce: float = 0.05  # press edges closer than this are contact bounce
    stuck_after: float = 30.0  # Talkaphone-style stuck button report
    dial_timeout: float = 32.0  # SIP timer B: no provisional response at all means the PBX is not there
    unanswered_extra: float = 120.0  # queued longer than queue.max_wait + this: hang up and re-send
    retry_first: float = 1.0
    retry_cap: float = 30.0  # keeps failover to the secondary PBX within 30 s (Code Blue)
    startup_grace: float = 15.0
    callback_ring: float = 120.0  # a call-back nobody answers and nobody cancels still ends
    self_test_timeout: float = 60.0
    self_test_retry: float = 600.0  # 2N retries a failed audio test after 10 minutes
    first_self_test: float | None = None  # seconds after start; None means one interval
    prompt_gap: float = 20.0  # the same prompt at most this often, so retries do not babble
    # A PBX killed mid-call sends no BYE, and a desk with silence suppression may send no RTP: the post asks.
    probe_interval: float = 5.0  # a queued or connected call is probed (OPTIONS in its dialog) this often
    probe_timeout: float = 4.0  # unanswered this long (4 sends over UDP), the PBX and the call with it are gone
    # pjsip would wait 32 s (timer B) for a PBX that answers nothing at all; Asterisk sends 100 Trying within
    # milliseconds, so a silent PBX is given up early and the alarm goes to the secondary.
    no_response: float = 4.0
    media_timeout: float = 20.0  # RTP silent this long on a connected call the PBX still has: fault media_stalled
    check_seconds: float = 3.0  # a self-test check records this long: the 1 s chirp, the echo's delay, jitter
    check_grace: float = 10.0  # no recording within check_seconds + this: the backend could not check
    check_correlation: float = 0.5  # the chirp is heard when the normalised correlation reaches this ...
    check_gain_db: float = -30.0  # ... and its copy is at least this loud relative to the chirp played


@dataclass
class _Call:
    id: str
    direction: str  # out | in
    target: str  # queue | selftest | callback
    host: str
    since: float
    deadline: float  # setup guard, ring guard or maximum duration, whichever applies now
    answered_at: float | None = None
    confirmed: bool = False  # the backend saw the dialog established (200 OK / ACK): a desk really answered
    probe_due: float | None = None
    probe_sent: float | None = None
    responded: bool = False  # any response to our INVITE (100 Trying too): the PBX is there
    media_stalled_at: float | None = None


@dataclass
class _SelfTest:
    """One run of the self-test; ``pbx``/``local``: None until judged, "" when passed, else what failed."""

    since: float
    call_id: str | None = None
    pbx: str | None = None
    local: str | None = None
    check: str | None = None  # the CheckAudio being waited for
    check_path: str = ""
    check_deadline: float | None = None
    heard: list[str] = field(default_factory=list)


@dataclass
class _Alarm:
    since: float
    attempts: int = 0
    registered: bool = False  # the PBX had it (18x): yellow until the alarm ends
    retry_at: float | None = None


class PostMachine:
    def __init__(self, site: Site, post: Post, *, now: float, settings: Settings | None = None) -> None:
        self.site = site
        self.post = post
        self.settings = settings or Settings()
        self.state = State.STARTING
        self.registered = False
        self.last_self_test: dict[str, Json] | None = None
        self._hosts = [site.pbx.host] + ([site.pbx.secondary_host] if site.pbx.secondary_host else [])
        self._started = now
        self._call: _Call | None = None
        self._alarm: _Alarm | None = None
        self._faults: set[str] = set()  # device faults; registration faults are derived in faults()
        self._seq = 0
        self._out: list[Command] = []
        self._lights: SetLights | None = None
        self._button_down: float | None = None
        self._last_press: float | None = None
        self._last_alarm_end: float | None = None
        self._last_prompt: dict[str, float] = {}
        self._test: _SelfTest | None = None
        first = self.settings.first_self_test
        self._self_test_due = now + (site.self_test.interval if first is None else first)

    # ----------------------------------------------------------------- driving

    def handle(self, event: Event, now: float) -> list[Command]:
        # Timers first: an event arriving after a deadline must see the world the deadline made.
        self._fire_timers(now)
        match event:
            case ButtonPressed():
                self._on_press(now)
            case ButtonReleased():
                self._button_down = None
                self._clear_fault("button_stuck", now)
            case TamperChanged(active=active):
                if active:
                    self._raise_fault("tamper", now)
                else:
                    self._clear_fault("tamper", now)
            case Registered(host=host):
                self._on_registered(host, now)
            case RegistrationFailed(reason=reason) | Unregistered(reason=reason):
                self._on_unregistered(reason, now)
            case CallProgress(call_id=cid, status=status):
                self._on_progress(cid, status, now)
            case CallAnswered(call_id=cid):
                self._on_answered(cid, now)
            case CallFailed(call_id=cid, status=status, reason=reason):
                if self._is_current(cid):
                    self._call_failed(now, status in UNREACHABLE, f"{status or ''} {reason}".strip())
            case CallEnded(call_id=cid, reason=reason):
                if self._is_current(cid):
                    self._on_ended(now, reason or "far end hung up")
            case MediaStalled(call_id=cid):
                self._on_media_stalled(cid, now)
            case MediaResumed(call_id=cid):
                self._on_media_resumed(cid, now)
            case CallProbed(call_id=cid, status=status):
                self._on_probed(cid, status, now)
            case SipStackFailed(detail=detail):
                self._on_stack_failed(detail, now)
            case SipStackRecovered():
                self._clear_fault("sip_stack", now)
                if self._call is None and self._alarm is None:
                    self._set_state(self._rest_state(now), now, "SIP stack recovered")
            case IncomingCall(call_id=cid, caller=caller):
                self._on_incoming(cid, caller, now)
            case SelfTestRequested():
                self._self_test_due = now
            case AudioHeard(check_id=check_id, rate=rate, pcm=pcm):
                self._on_heard(check_id, rate, pcm, now)
            case Tick():
                pass
        self._fire_timers(now)  # the event may have made something due at once (e.g. a retry)
        if self.state is State.IDLE and now >= self._self_test_due:
            self._start_self_test(now)
        return self._flush()

    def tick(self, now: float) -> list[Command]:
        return self.handle(Tick(), now)

    def next_deadline(self) -> float | None:
        """When ``tick`` must be called at the latest, or None if only an event can change anything."""
        due: list[float] = []
        if self.state is State.STARTING:
            due.append(self._started + self.settings.startup_grace)
        if self._button_down is not None and "button_stuck" not in self._faults:
            due.append(self._button_down + self.settings.stuck_after)
        call = self._call
        if call is not None:
            due.append(call.deadline)
            if call.direction == "out" and not call.responded:
                due.append(call.since + self.settings.no_response)
            if call.answered_at is not None and call.media_stalled_at is not None \
                    and "media_stalled" not in self._faults:
                due.append(call.media_stalled_at + self.settings.media_timeout)
            if call.probe_due is not None:
                due.append(call.probe_due)
            if call.probe_sent is not None:
                due.append(call.probe_sent + self.settings.probe_timeout)
        if self._alarm is not None and self._alarm.retry_at is not None:
            due.append(self._alarm.retry_at)
        if self.state is State.IDLE:
            due.append(self._self_test_due)
        if self._test is not None and self._test.check_deadline is not None:
            due.append(self._test.check_deadline)
        return min(due) if due else None

    def faults(self) -> list[str]:
        found = set(self._faults)
        if not self.registered and self.state is not State.STARTING:
            found.add("unregistered")
        if self._alarm is not None and self._alarm.retry_at is not None:
            found.add("unreachable")
        return sorted(found)

    def status(self, wall_offset: float = 0.0) -> dict[str, Json]:
        """JSON-able state for ``sip-refuge status``; ``wall_offset`` maps machine times to wall-clock times."""

        def at(t: float | None) -> float | None:
            return None if t is None else t + wall_offset

        call: dict[str, Json] | None = None
        if self._call is not None:
            c = self._call
            call = {"id": c.id, "direction": c.direction, "target": c.target, "host": c.host,
                    "since": at(c.since), "answered_at": at(c.answered_at)}
        alarm: dict[str, Json] | None = None
        if self._alarm is not None:
            a = self._alarm
            alarm = {"since": at(a.since), "attempts": a.attempts, "registered": a.registered,
                     "retry_at": at(a.retry_at)}
        last: dict[str, Json] | None = None
        if self.last_self_test is not None:
            last = dict(self.last_self_test)
            raw = last["at"]
            last["at"] = at(raw) if isinstance(raw, float | int) else raw
        return {"post": self.post.id, "state": str(self.state), "registered": self.registered,
                "call": call, "alarm": alarm, "last_self_test": last, "faults": list(self.faults())}

    # ----------------------------------------------------------------- events

    def _on_press(self, now: float) -> None:
        bounce = self._last_press is not None and now - self._last_press < self.settings.debounce
        self._last_press = now
        self._button_down = now
        # A press edge proves the button moved, so a stuck report (missed release) is over.
        self._clear_fault("button_stuck", now)
        if bounce:
            self._debug("press at %.3f is contact bounce", now)
        elif self.state is State.RINGING and self._call is not None:
            self._answer(self._call, now)
        elif self._test is not None:
            self._abort_self_test(now)
            self._start_alarm(now)
        elif self._alarm is not None and self._alarm.retry_at is not None and self._call is None:
            # Fault, waiting to re-send: someone is still there and pressing, so re-send now rather
            # than make them wait out the backoff (one attempt at a time: a burst still makes one).
            self._dial_alarm(now)
        elif self._alarm is not None or self._call is not None:
            # Spec section 4: a press during a call never hangs it up, and a pending alarm is already
            # being re-sent, so there is nothing for this press to do.
            self._debug("press ignored in %s", self.state)
        else:
            self._start_alarm(now)

    def _on_registered(self, host: str, now: float) -> None:
        regained = not self.registered
        if regained:
            self.registered = True
            self._report("registration", now, registered=True, host=host)
        if self._alarm is not None and self._alarm.retry_at is not None:
            if regained:  # the PBX is back: re-send the alarm without waiting out the backoff
                self._alarm.retry_at = now
        elif self._call is None and self.state in (State.STARTING, State.FAULT) \
                and not self._faults & STOPPING_FAULTS:
            self._set_state(State.IDLE, now, "registered")

    def _on_unregistered(self, reason: str, now: float) -> None:
        if self.registered or self.state is State.STARTING:
            self._report("registration", now, registered=False, reason=reason)
        self.registered = False
        if self.state in (State.IDLE, State.STARTING):
            self._set_state(State.FAULT, now, reason or "not registered")

    def _on_progress(self, cid: str, status: int, now: float) -> None:
        call = self._call
        if not self._is_current(cid) or call is None:
            return
        call.responded = True
        if not 180 <= status <= 189:
            return
        if call.target == "queue" and self.state is State.CALLING and self._alarm is not None:
            self._alarm.registered = True
            call.deadline = now + self.site.queue.max_wait + self.settings.unanswered_extra
            self._probe_later(call, now)
            self._report("call", now, event="queued", call=cid, host=call.host)
            self._prompt("hold", now)  # after "connecting": the PBX has the alarm, someone will answer
            self._set_state(State.QUEUED, now, f"{status}")

    def _on_answered(self, cid: str, now: float) -> None:
        call = self._call
        if call is None or call.id != cid:
            # A late 200 for an attempt we gave up on: hang it up, or it would be an open line nobody follows.
            self._emit(Hangup(cid, "stale call"))
            return
        call.responded = True
        if call.direction == "in" and call.answered_at is not None:
            call.confirmed = True  # the ACK of the PBX for our answer: the desk that called back is there
        if call.target == "queue" and call.answered_at is None:
            call.answered_at = now
            call.confirmed = True
            call.deadline = now + self.post.max_call
            self._probe_later(call, now)
            self._emit(StopPrompts())  # the operator speaks now
            self._report("call", now, event="answered", call=cid, host=call.host)
            self._set_state(State.CONNECTED, now, "200 OK")
        elif call.target == "selftest" and call.answered_at is None and self._test is not None:
            call.answered_at = now
            call.deadline = now + self.settings.self_test_timeout
            self._check("call", call.id, now)

    def _on_ended(self, now: float, reason: str) -> None:
        call = self._call
        assert call is not None
        if call.answered_at is not None:
            self._end_call(now, reason)
        elif call.target == "queue":
            # The PBX dropped the alarm before anyone answered (overflow failed): re-send it.
            self._call_failed(now, False, reason)
        elif call.target == "selftest":
            self._pbx_failed(now, f"the echo call ended before it was answered: {reason}", hangup=False)
        else:
            self._call = None  # the caller gave up ringing
            self._report("call", now, event="missed", call=call.id)
            self._set_state(self._rest_state(now), now, reason)

    def _on_incoming(self, cid: str, caller: str, now: float) -> None:
        if self._test is not None:
            self._abort_self_test(now)  # a person calling beats a test call
        if self._call is not None:
            self._emit(Reject(cid))
            self._report("call", now, event="rejected", call=cid, caller=caller)
            return
        call = _Call(cid, "in", "callback", "", now, now + self.settings.callback_ring)
        self._call = call
        # The backend let this through only from the PBX, aimed at the post's registered contact; the
        # policy decides the rest, on every path (waiting to re-send an alarm included).
        if self._auto_answer(now):
            self._answer(call, now)
        else:
            self._emit(Ring(cid))
            self._set_state(State.RINGING, now, f"call from {caller}")
        self._report("call", now, event="incoming", call=cid, caller=caller)

    def _auto_answer(self, now: float) -> bool:
        """Whether a call-back is answered without a press.

        ``always``: yes. ``never``: no, not even while an alarm is pending (a press answers it).
        ``after_alarm`` (EN 81-28: no auto-answer in standby): yes while the post's own alarm is pending
        (pressed and not yet acknowledged by a desk, e.g. waiting to re-send while the PBX was down: the
        control room calling back is the answer the person asked for), and for ``auto_answer_window``
        seconds after the call that acknowledged the alarm ended; otherwise it rings.
        """
        policy = self.post.auto_answer
        if policy == "always":
            return True
        if policy == "after_alarm":
            if self._alarm is not None:
                return True
            end = self._last_alarm_end
            return end is not None and now - end <= self.post.auto_answer_window
        return False

    def _on_media_stalled(self, cid: str, now: float) -> None:
        call = self._call
        if call is None or call.id != cid:
            return
        if call.media_stalled_at is None:
            call.media_stalled_at = now
        # Silence is no verdict (silence suppression): ask the PBX now rather than at the next probe.
        if call.probe_sent is None and call.target != "selftest" \
                and (call.answered_at is not None or self.state is State.QUEUED):
            self._probe(call, now)

    def _on_media_resumed(self, cid: str, now: float) -> None:
        call = self._call
        if call is not None and call.id == cid:
            call.media_stalled_at = None
            self._clear_fault("media_stalled", now)

    def _on_probed(self, cid: str, status: int | None, now: float) -> None:
        call = self._call
        if call is None or call.id != cid or call.probe_sent is None:
            return
        if status in PROBE_LOST:
            self._call_lost(call, now, "no answer to a probe" if status is None else f"probe answered {status}")
        else:
            self._probe_later(call, now)

    def _on_stack_failed(self, detail: str, now: float) -> None:
        self._raise_fault("sip_stack", now, detail)
        if self._call is not None:
            self._call_lost(self._call, now, "SIP stack failed")
        else:
            self._set_state(State.FAULT, now, f"SIP stack failed: {detail}")

    # ----------------------------------------------------------------- calls

    def _start_alarm(self, now: float) -> None:
        self._alarm = _Alarm(since=now)
        self._dial_alarm(now)
        self._prompt("connecting", now)

    def _dial_alarm(self, now: float) -> None:
        alarm = self._alarm
        assert alarm is not None
        # Alternate servers so a dead primary costs one backoff step, not the whole alarm.
        host = self._hosts[alarm.attempts % len(self._hosts)]
        alarm.attempts += 1
        alarm.retry_at = None
        self._dial("queue", self.site.queue.extension, host, now, self.settings.dial_timeout)
        self._set_state(State.CALLING, now, f"attempt {alarm.attempts} via {host}")

    def _dial(self, target: str, extension: str, host: str, now: float, guard: float) -> None:
        self._seq += 1
        cid = f"{self.post.id}-{self._seq}"
        self._call = _Call(cid, "out", target, host, now, now + guard)
        self._emit(Dial(cid, target, extension, host))
        self._report("call", now, event="dial", call=cid, target=target, host=host)

    def _call_failed(self, now: float, unreachable: bool, reason: str) -> None:
        call = self._call
        assert call is not None
        if call.target == "selftest":
            self._pbx_failed(now, f"the echo call failed: {reason}", hangup=False)
            return
        if call.direction == "in":
            self._end_call(now, reason)
            return
        alarm = self._alarm
        assert alarm is not None
        self._call = None
        delay = min(self.settings.retry_cap, self.settings.retry_first * 2 ** (alarm.attempts - 1))
        alarm.retry_at = now + delay
        self._report("call", now, event="failed", call=call.id, host=call.host, reason=reason,
                     retry_in=delay)
        self._prompt("unreachable" if unreachable else "hold", now)
        self._set_state(State.FAULT, now, f"call failed ({reason}), retry in {delay:g} s")

    def _answer(self, call: _Call, now: float) -> None:
        call.answered_at = now
        call.deadline = now + self.post.max_call
        self._probe_later(call, now)
        self._emit(Answer(call.id))
        self._emit(StopPrompts())
        self._report("call", now, event="answered", call=call.id)
        self._set_state(State.CONNECTED, now, "call-back answered")

    def _end_call(self, now: float, reason: str) -> None:
        call = self._call
        assert call is not None
        self._call = None
        self._clear_fault("media_stalled", now)
        if self._alarm is not None and call.confirmed:
            # A call a desk really answered acknowledges the alarm; from now on call-backs may be
            # auto-answered. Any other end (a hang-up before the ACK) leaves the alarm to be re-sent.
            self._alarm = None
            self._last_alarm_end = now
        since = call.answered_at if call.answered_at is not None else call.since
        self._report("call", now, event="ended", call=call.id, reason=reason, duration=now - since)
        self._set_state(self._rest_state(now), now, reason)

    def _call_lost(self, call: _Call, now: float, reason: str) -> None:
        """The PBX stopped answering during the call: it is gone and the call with it (no BYE will come)."""
        if call.target == "selftest":
            self._pbx_failed(now, f"the echo call was lost: {reason}", hangup=True)
            return
        self._emit(Hangup(call.id, reason))
        self._call = None
        self._clear_fault("media_stalled", now)
        self._report("call", now, event="lost", call=call.id, host=call.host, reason=reason)
        if self.registered:  # until the PBX accepts a registration again
            self.registered = False
            self._report("registration", now, registered=False, reason=f"call lost: {reason}")
        alarm = self._alarm
        if alarm is not None:
            # Whoever pressed may still be there: send the alarm again at once (to the other PBX if any).
            alarm.registered = False
            alarm.retry_at = now
            self._prompt("hold", now)
        self._set_state(State.FAULT, now, f"call lost ({reason})")

    def _probe_later(self, call: _Call, now: float) -> None:
        call.probe_sent, call.probe_due = None, now + self.settings.probe_interval

    def _probe(self, call: _Call, now: float) -> None:
        call.probe_sent, call.probe_due = now, None
        self._emit(ProbeCall(call.id))

    def _rest_state(self, now: float) -> State:
        if self._alarm is not None or self._faults & STOPPING_FAULTS:
            return State.FAULT
        if self.registered:
            return State.IDLE
        if self.state is State.STARTING or now < self._started + self.settings.startup_grace:
            return State.STARTING
        return State.FAULT

    # ----------------------------------------------------------------- self-test

    def _start_self_test(self, now: float) -> None:
        self._test = _SelfTest(now)
        self._emit(StopPrompts())
        self._dial("selftest", self.site.self_test.extension, self._hosts[0], now,
                   self.settings.self_test_timeout)
        assert self._call is not None
        self._test.call_id = self._call.id
        self._set_state(State.SELFTEST, now, "self-test due")

    def _check(self, path: str, call_id: str | None, now: float) -> None:
        test = self._test
        assert test is not None
        s = self.settings
        test.check = f"{test.call_id or self.post.id}-{path}"
        test.check_path = path
        test.check_deadline = now + s.check_seconds + s.check_grace
        self._emit(CheckAudio(test.check, path, call_id, s.check_seconds))

    def _on_heard(self, check_id: str, rate: int, pcm: bytes, now: float) -> None:
        test = self._test
        if test is None or test.check != check_id:
            return  # the check of an aborted test, or a late one: nobody waits for it
        path = test.check_path
        if not rate:
            self._check_done(path, "the post could not play and record the chirp", now)
            return
        found = speech.match(speech.test_signal(rate), speech.samples(pcm), rate, segment=speech.CHECK_SEGMENT) \
            if pcm else None
        s = self.settings
        if found is not None and found.correlation >= s.check_correlation and found.gain_db >= s.check_gain_db:
            test.heard.append(f"{'pbx' if path == 'call' else path}: chirp heard ({found.describe()})")
            self._check_done(path, "", now)
        else:
            what = "the echo extension returned no chirp" if path == "call" else "the microphone did not hear the speaker"
            self._check_done(path, f"{what} ({found.describe() if found else 'no audio came back'})", now)

    def _check_done(self, path: str, failure: str, now: float) -> None:
        test = self._test
        assert test is not None
        test.check, test.check_deadline = None, None
        if path == "call":
            call = self._call
            if call is not None and call.target == "selftest":
                self._emit(Hangup(call.id, "self-test: echo checked"))
                self._call = None
            test.pbx = failure
            self._check("local", None, now)
        else:
            test.local = failure
            self._self_test_done(now)

    def _pbx_failed(self, now: float, reason: str, *, hangup: bool) -> None:
        """The echo call could not be made or kept: the pbx part failed; the local check still runs."""
        test, call = self._test, self._call
        if call is not None and call.target == "selftest":
            if hangup:
                self._emit(Hangup(call.id, reason))
            self._call = None
        if test is None or test.pbx is not None:
            return
        test.pbx = reason
        test.check, test.check_deadline = None, None
        self._check("local", None, now)

    def _abort_self_test(self, now: float) -> None:
        call, test = self._call, self._test
        self._test = None
        if call is not None and call.target == "selftest":
            self._emit(Hangup(call.id, "self-test aborted"))
            self._call = None
        self._self_test_due = now + self.settings.self_test_retry
        self._report("selftest", now, result="aborted", call=test.call_id if test else None)

    def _self_test_done(self, now: float) -> None:
        test = self._test
        assert test is not None
        self._test = None
        failed = [part for part, why in (("local", test.local), ("pbx", test.pbx)) if why]
        passed = not failed
        part = "" if passed else failed[0]  # local first: see the module's docstring
        detail = "; ".join([f"{p}: {why}" for p, why in (("pbx", test.pbx), ("local", test.local)) if why]
                           + ([] if failed else test.heard)) or "passed"
        self.last_self_test = {"at": now, "passed": passed, "detail": detail, "part": part}
        self._report("selftest", now, result="pass" if passed else "fail", detail=detail, part=part,
                     call=test.call_id)
        if passed:
            self._clear_fault("selftest_failed", now)
            self._self_test_due = now + self.site.self_test.interval
        else:
            self._raise_fault("selftest_failed", now, f"{part}: {detail}")
            self._self_test_due = now + self.settings.self_test_retry
        if self._call is None:
            self._set_state(self._rest_state(now), now, "self-test " + ("passed" if passed else f"failed ({part})"))

    # ----------------------------------------------------------------- timers

    def _fire_timers(self, now: float) -> None:
        s = self.settings
        if self.state is State.STARTING and now >= self._started + s.startup_grace:
            self._set_state(State.FAULT, now, "no registration")
        if self._button_down is not None and now - self._button_down >= s.stuck_after:
            self._raise_fault("button_stuck", now, f"held since {self._button_down:.3f}")
        call = self._call
        if call is not None and now >= call.deadline:
            self._call_timeout(call, now)
        call = self._call
        if call is not None and call.direction == "out" and not call.responded \
                and now >= call.since + s.no_response:
            self._emit(Hangup(call.id, "no response"))
            self._call_failed(now, True, f"no response from the PBX within {s.no_response:g} s")
        call = self._call
        if call is not None and call.answered_at is not None and call.media_stalled_at is not None \
                and now >= call.media_stalled_at + s.media_timeout and "media_stalled" not in self._faults:
            self._raise_fault("media_stalled", now, f"no audio from the PBX on call {call.id} for "
                                                     f"{now - call.media_stalled_at:.0f} s")
            self._report("call", now, event="media_stalled", call=call.id, host=call.host)
        test = self._test
        if test is not None and test.check_deadline is not None and now >= test.check_deadline:
            self._check_done(test.check_path, "the backend recorded nothing in time", now)
        call = self._call
        if call is not None and call.probe_sent is not None and now >= call.probe_sent + s.probe_timeout:
            self._call_lost(call, now, f"no answer to a probe within {s.probe_timeout:g} s")
        elif call is not None and call.probe_due is not None and now >= call.probe_due:
            self._probe(call, now)
        alarm = self._alarm
        if alarm is not None and alarm.retry_at is not None and now >= alarm.retry_at and self._call is None:
            self._dial_alarm(now)
            self._prompt("hold", now)

    def _call_timeout(self, call: _Call, now: float) -> None:
        if call.target == "selftest":
            self._pbx_failed(now, "the echo call timed out", hangup=True)
        elif call.answered_at is not None:
            self._emit(Hangup(call.id, "maximum call duration"))
            self._end_call(now, "maximum call duration")
        elif call.direction == "in":
            self._emit(Reject(call.id, 480))
            self._on_ended(now, "nobody answered the call-back")
        else:
            self._emit(Hangup(call.id, "timeout"))
            # No provisional response at all means no PBX; a queue that never answers is a refusal.
            self._call_failed(now, self.state is State.CALLING, "timeout")

    # ----------------------------------------------------------------- output

    def _set_state(self, state: State, now: float, reason: str) -> None:
        if state is self.state:
            return
        log.info("post %s: %s -> %s (%s) at %.3f", self.post.id, self.state, state, reason, now)
        self._report("state", now, previous=str(self.state), state=str(state), reason=reason)
        self.state = state

    def _raise_fault(self, name: str, now: float, detail: str = "") -> None:
        if name not in self._faults:
            self._faults.add(name)
            log.warning("post %s: fault %s %s", self.post.id, name, detail)
            self._report("fault", now, fault=name, active=True, detail=detail)

    def _clear_fault(self, name: str, now: float) -> None:
        if name in self._faults:
            self._faults.discard(name)
            log.info("post %s: fault %s cleared", self.post.id, name)
            self._report("fault", now, fault=name, active=False)

    def _prompt(self, name: str, now: float) -> None:
        last = self._last_prompt.get(name)
        if last is None or now - last >= self.settings.prompt_gap:
            self._last_prompt[name] = now
            self._emit(PlayPrompt(name))

    def _report(self, kind: str, now: float, **detail: Json) -> None:
        self._emit(Report(kind, now, {"post": self.post.id, **detail}))

    def _emit(self, command: Command) -> None:
        self._out.append(command)

    def _is_current(self, cid: str) -> bool:
        return self._call is not None and self._call.id == cid

    def _debug(self, msg: str, *args: object) -> None:
        log.debug("post %s: " + msg, self.post.id, *args)

    def _flush(self) -> list[Command]:
        lights = self._compute_lights()
        if lights != self._lights:
            self._lights = lights
            self._emit(lights)
        out, self._out = self._out, []
        return out

    def _compute_lights(self) -> SetLights:
        alarm = self._alarm
        yellow = Light.ON if alarm is not None and alarm.registered else Light.OFF
        green = {State.CONNECTED: Light.ON, State.RINGING: Light.BLINK}.get(self.state, Light.OFF)
        retrying = alarm is not None and alarm.attempts > 1 and self.state is State.CALLING
        if self.state is State.FAULT or retrying or self._faults & STOPPING_FAULTS:
            red = Light.ON  # cannot reach the control room (or not registered, or the SIP stack is dead)
        elif self._faults:
            red = Light.BLINK  # calls work, but the post needs a visit (stuck, tamper, failed self-test)
        else:
            red = Light.OFF
        return SetLights(yellow, green, red)
