"""The machine's call room: what the PBX says about the current call (progress, answer, end, probes, silence),
call-backs from the control room, and a call's own deadlines.

**Dead media** (the rule, written down): while connected, RTP silence alone never ends a call, because a desk
with silence suppression sends none. Silence (:class:`~sip_refuge.post.events.MediaStalled`) makes the machine
probe the PBX at once: a PBX that no longer has the call ends it (lost, the alarm re-sent). A PBX that still has
it keeps it; if the silence lasts ``media_timeout`` the post raises the ``media_stalled`` fault (red blinking,
telemetry, dashboard): someone must look at a call the post cannot hear, while the caller, who may still be
heard, is not cut off. The fault clears when audio returns or the call ends.
"""

from __future__ import annotations

from sip_refuge.post.commands import Answer, Hangup, Reject, Ring, StopPrompts
from sip_refuge.post.machine.alarm import Alarming
from sip_refuge.post.machine.rules import PROBE_LOST, Call, State


class Calls(Alarming):
    """Follows the one call the post has at a time, whichever its kind (alarm, self-test, call-back)."""


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
        call = Call(cid, "in", "callback", "", now, now + self.settings.callback_ring)
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

    def _answer(self, call: Call, now: float) -> None:
        call.answered_at = now
        call.deadline = now + self.post.max_call
        self._probe_later(call, now)
        self._emit(Answer(call.id))
        self._emit(StopPrompts())
        self._report("call", now, event="answered", call=call.id)
        self._set_state(State.CONNECTED, now, "call-back answered")

    def _call_timeout(self, call: Call, now: float) -> None:
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
