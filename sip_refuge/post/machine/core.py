"""The post's behaviour as a pure state machine (sans-I/O, in the manner of aioquic).

``PostMachine.handle(event, now)`` returns the commands to execute; ``next_deadline()`` says when the runner
must call ``tick(now)`` if nothing else happens. There are no threads, sleeps, clocks or I/O in here, so
every rule of spec section 4 is tested with explicit times.

Vocabulary: an *alarm* starts with a press and lasts until a call carrying it is answered by a desk and
then ends normally. It survives failed attempts and calls lost with the PBX (EN 81-28: the alarm is re-sent
until acknowledged), which is also what makes a burst of presses one call: while an alarm exists a press has
nothing left to do.

Backends report facts (a response, a probe's answer, silence on the media, what a microphone heard); every
timing decision and every verdict is in the machine, in :class:`~.rules.Settings`: how often an established
call is probed, how long the PBX may take to answer, how long a silence is dead media, what a self-test must
hear.

The machine is one object built in rooms, each holding one part of the rules: :mod:`.rules` (states, timings,
the pure rules), :mod:`.base` (state and outputs), :mod:`.selftest`, :mod:`.alarm` (retry, failover,
registrations), :mod:`.calls` (the call, call-backs, dead media), and this module: the entry point, the
timers and the button.
"""

from __future__ import annotations

from sip_refuge.post.commands import Command, Hangup, Json
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
from sip_refuge.post.machine.calls import Calls
from sip_refuge.post.machine.rules import UNREACHABLE, State


class PostMachine(Calls):
    """One post's rules: ``handle(event, now)`` -> commands, ``next_deadline()``, ``status()``."""

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
            case RegistrationFailed(reason=reason, host=host) | Unregistered(reason=reason, host=host):
                self._on_unregistered(reason, host, now)
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
                "registrations": dict(self._reach), "call": call, "alarm": alarm, "last_self_test": last,
                "faults": list(self.faults())}

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
