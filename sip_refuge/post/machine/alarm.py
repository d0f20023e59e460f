"""The machine's alarm room: an alarm's attempts, their retry and failover across the PBX pair, and the
registrations that say which PBX of the pair may have the next attempt.

An *alarm* starts with a press and lasts until a call carrying it is answered by a desk and then ends normally.
It survives failed attempts and calls lost with the PBX (EN 81-28: the alarm is re-sent until acknowledged),
with a backoff (:func:`.rules.retry_delay`) and each attempt to the PBX the post is registered with
(:func:`.rules.pick_host`).
"""

from __future__ import annotations

from sip_refuge.post.commands import Hangup
from sip_refuge.post.machine.rules import STOPPING_FAULTS, Alarm, Call, State, pick_host, retry_delay
from sip_refuge.post.machine.selftest import SelfTesting


class Alarming(SelfTesting):
    """Sends the alarm, re-sends it after a failed or lost call, and follows which PBX has the post."""

    def _start_alarm(self, now: float) -> None:
        self._alarm = Alarm(since=now)
        self._dial_alarm(now)
        self._prompt("connecting", now)

    def _dial_alarm(self, now: float) -> None:
        alarm = self._alarm
        assert alarm is not None
        host = pick_host(self._hosts, self._reach, alarm.attempts)
        alarm.attempts += 1
        alarm.retry_at = None
        self._dial("queue", self.site.queue.extension, host, now, self.settings.dial_timeout)
        self._set_state(State.CALLING, now, f"attempt {alarm.attempts} via {host}")

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
        if unreachable and len(self._hosts) > 1:  # the next attempt goes to the other PBX if it has the post
            self._host_lost(call.host, now, reason)
        delay = retry_delay(self.settings, alarm.attempts)
        alarm.retry_at = now + delay
        self._report("call", now, event="failed", call=call.id, host=call.host, reason=reason,
                     retry_in=delay)
        self._prompt("unreachable" if unreachable else "hold", now)
        self._set_state(State.FAULT, now, f"call failed ({reason}), retry in {delay:g} s")

    def _call_lost(self, call: Call, now: float, reason: str) -> None:
        """The PBX stopped answering during the call: it is gone and the call with it (no BYE will come)."""
        if call.target == "selftest":
            self._pbx_failed(now, f"the echo call was lost: {reason}", hangup=True)
            return
        self._emit(Hangup(call.id, reason))
        self._call = None
        self._clear_fault("media_stalled", now)
        self._report("call", now, event="lost", call=call.id, host=call.host, reason=reason)
        self._host_lost(call.host, now, f"call lost: {reason}")  # until the PBX accepts a registration again
        alarm = self._alarm
        if alarm is not None:
            # Whoever pressed may still be there: send the alarm again at once (to the other PBX of a pair).
            alarm.registered = False
            alarm.retry_at = now
            self._prompt("hold", now)
        self._set_state(State.FAULT, now, f"call lost ({reason})")

    # ----------------------------------------------------------------- registrations

    def _on_registered(self, host: str, now: float) -> None:
        host = host if host in self._reach else self._hosts[0]
        back = not self._reach[host]
        if back:
            self._reach[host] = True
            self.registered = True
            self._report("registration", now, registered=True, host=host)
        if self._alarm is not None and self._alarm.retry_at is not None:
            if back:  # a PBX is back: re-send the alarm without waiting out the backoff
                self._alarm.retry_at = now
        elif self._call is None and self.state in (State.STARTING, State.FAULT) \
                and not self._faults & STOPPING_FAULTS:
            self._set_state(State.IDLE, now, "registered")

    def _on_unregistered(self, reason: str, host: str, now: float) -> None:
        # "" (the SIP stack would not start) is every PBX; a host is one PBX of the pair.
        lost = [h for h in ([host] if host in self._reach else self._hosts) if self._reach[h]]
        for h in lost:
            self._reach[h] = False
        self.registered = any(self._reach.values())
        if lost or self.state is State.STARTING:
            where = {"host": host} if host in self._reach else {}
            self._report("registration", now, registered=self.registered, reason=reason, **where)
        if not self.registered and self.state in (State.IDLE, State.STARTING):
            self._set_state(State.FAULT, now, reason or "not registered")

    def _host_lost(self, host: str, now: float, reason: str) -> None:
        """A call showed the PBX at ``host`` gone: alarms go to the other one until it registers the post again.
        (``host`` "" is an incoming call's: the PBX is known only when the post has one.)"""
        if host not in self._reach and len(self._hosts) == 1:
            host = self._hosts[0]
        if self._reach.get(host):
            self._reach[host] = False
            self.registered = any(self._reach.values())
            self._report("registration", now, registered=self.registered, host=host, reason=reason)
