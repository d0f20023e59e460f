"""The machine's vocabulary: its states, the SIP answers it judges by, its timings, what it remembers of a
call, an alarm and a self-test, and the pure rules derived from them (the lights, the next PBX, the backoff).

Nothing here keeps state or does I/O; :mod:`.core` and its rooms hold the state and call these.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from sip_refuge.post.commands import Light, SetLights


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
class Call:
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
class SelfTestRun:
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
class Alarm:
    since: float
    attempts: int = 0
    registered: bool = False  # the PBX had it (18x): yellow until the alarm ends
    retry_at: float | None = None


def pick_host(hosts: Sequence[str], reach: Mapping[str, bool], attempt: int) -> str:
    """The PBX for an alarm's ``attempt`` (0 first): the hosts in turn, starting with the primary, so a PBX
    that failed a call is not asked twice in a row; but a PBX the post is registered with before one it is
    not, so the first INVITE after a PBX died goes to the live one at once."""
    order = [hosts[(attempt + i) % len(hosts)] for i in range(len(hosts))]
    return next((h for h in order if reach[h]), order[0])


def retry_delay(settings: Settings, attempts: int) -> float:
    """How long a failed alarm waits before it is re-sent: doubling from ``retry_first``, capped at ``retry_cap``."""
    return float(min(settings.retry_cap, settings.retry_first * 2 ** (attempts - 1)))


def lights(state: State, alarm: Alarm | None, faults: set[str]) -> SetLights:
    """The three lights, derived from the state, the alarm and the faults (the machine sends them on change)."""
    yellow = Light.ON if alarm is not None and alarm.registered else Light.OFF
    green = {State.CONNECTED: Light.ON, State.RINGING: Light.BLINK}.get(state, Light.OFF)
    retrying = alarm is not None and alarm.attempts > 1 and state is State.CALLING
    if state is State.FAULT or retrying or faults & STOPPING_FAULTS:
        red = Light.ON  # cannot reach the control room (or not registered, or the SIP stack is dead)
    elif faults:
        red = Light.BLINK  # calls work, but the post needs a visit (stuck, tamper, failed self-test)
    else:
        red = Light.OFF
    return SetLights(yellow, green, red)
