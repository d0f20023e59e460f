"""What every room of the machine shares: its state, and the ways out (state changes, faults, prompts,
reports, commands), each logged once with the post id. Also the steps every kind of call takes: dialling,
probing, ending.
"""

from __future__ import annotations

import logging

from sip_refuge.config.model import Post, Site
from sip_refuge.post.commands import Command, Dial, Json, PlayPrompt, ProbeCall, Report, SetLights
from sip_refuge.post.machine.rules import STOPPING_FAULTS, Alarm, Call, SelfTestRun, Settings, State, lights

log = logging.getLogger(__name__)


class MachineBase:
    """One post's state and its outputs; the rooms built on it add the rules (:class:`.core.PostMachine`)."""

    def __init__(self, site: Site, post: Post, *, now: float, settings: Settings | None = None) -> None:
        self.site = site
        self.post = post
        self.settings = settings or Settings()
        self.state = State.STARTING
        self.registered = False
        self.last_self_test: dict[str, Json] | None = None
        self._hosts = [site.pbx.host] + ([site.pbx.secondary_host] if site.pbx.secondary_host else [])
        # Which PBX of the pair has the post registered now (and lost no call of it since): where alarms go.
        self._reach: dict[str, bool] = dict.fromkeys(self._hosts, False)
        self._started = now
        self._call: Call | None = None
        self._alarm: Alarm | None = None
        self._faults: set[str] = set()  # device faults; registration faults are derived in faults()
        self._seq = 0
        self._out: list[Command] = []
        self._lights: SetLights | None = None
        self._button_down: float | None = None
        self._last_press: float | None = None
        self._last_alarm_end: float | None = None
        self._last_prompt: dict[str, float] = {}
        self._test: SelfTestRun | None = None
        first = self.settings.first_self_test
        self._self_test_due = now + (site.self_test.interval if first is None else first)

    # ----------------------------------------------------------------- calls

    def _dial(self, target: str, extension: str, host: str, now: float, guard: float) -> None:
        self._seq += 1
        cid = f"{self.post.id}-{self._seq}"
        self._call = Call(cid, "out", target, host, now, now + guard)
        self._emit(Dial(cid, target, extension, host))
        self._report("call", now, event="dial", call=cid, target=target, host=host)

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

    def _probe_later(self, call: Call, now: float) -> None:
        call.probe_sent, call.probe_due = None, now + self.settings.probe_interval

    def _probe(self, call: Call, now: float) -> None:
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
        lit = lights(self.state, self._alarm, self._faults)
        if lit != self._lights:
            self._lights = lit
            self._emit(lit)
        out, self._out = self._out, []
        return out
