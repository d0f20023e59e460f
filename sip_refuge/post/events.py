"""What can happen to a post: the inputs of :class:`sip_refuge.post.machine.PostMachine`.

Panel callbacks and SIP backends only build one of these and enqueue it; the runner feeds them to the
machine together with the time it read from its own monotonic clock. Events carry no timestamps so the
machine has exactly one notion of time (the ``now`` it is given).

``call_id`` ties call events to the call: for outgoing calls it is the id the machine put in its
:class:`~sip_refuge.post.commands.Dial` command, for incoming calls the id the backend chose in
:class:`IncomingCall`. Events for a call the machine no longer follows are ignored (or hung up), so a late
``200 OK`` can never resurrect an abandoned attempt.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ButtonPressed:
    """The help button went down (an edge, not a level)."""


@dataclass(frozen=True)
class ButtonReleased:
    """The help button came back up."""


@dataclass(frozen=True)
class TamperChanged:
    """The tamper input changed: ``active`` is True while the housing is open or the loop is cut."""

    active: bool


@dataclass(frozen=True)
class Registered:
    """The PBX accepted (or refreshed) the post's registration."""

    host: str = ""


@dataclass(frozen=True)
class RegistrationFailed:
    """A registration attempt failed (timeout, 401 with a wrong secret, transport error...)."""

    reason: str = ""
    status: int | None = None


@dataclass(frozen=True)
class Unregistered:
    """The registration lapsed or the transport to the PBX went away."""

    reason: str = ""


@dataclass(frozen=True)
class CallProgress:
    """A provisional response: 180/183 mean the PBX has the call (the alarm is registered); any other (100 Trying)
    only that the PBX is there. Backends report the first response of each status."""

    call_id: str
    status: int


@dataclass(frozen=True)
class CallAnswered:
    """200 OK on an outgoing call, or the media of an answered incoming call is up."""

    call_id: str


@dataclass(frozen=True)
class CallFailed:
    """The call could not be set up: a final error response, or ``status=None`` for timeout/transport errors."""

    call_id: str
    status: int | None = None
    reason: str = ""


@dataclass(frozen=True)
class CallEnded:
    """The far end hung up (BYE, or CANCEL of an incoming call that was ringing)."""

    call_id: str
    reason: str = ""


@dataclass(frozen=True)
class MediaStalled:
    """No RTP has arrived on a call for a moment (the backend's ``media_gap``, about a second). A fact, not a
    verdict: a desk phone with silence suppression legitimately sends nothing. The machine asks the PBX
    (:class:`~sip_refuge.post.commands.ProbeCall`) and decides how long a silence is dead media."""

    call_id: str


@dataclass(frozen=True)
class MediaResumed:
    """RTP arrives again on a call after :class:`MediaStalled`."""

    call_id: str


@dataclass(frozen=True)
class CallProbed:
    """The PBX's answer to :class:`~sip_refuge.post.commands.ProbeCall`: the status of its response to the
    in-dialog OPTIONS (481 and 408 mean the PBX no longer has the call), or ``None`` when the backend got no
    answer at all or could not send. ``0``: the backend cannot probe at all (a binding without in-dialog
    requests), so there is no verdict. A probe that never gets this event is judged by the machine's own timer."""

    call_id: str
    status: int | None = None


@dataclass(frozen=True)
class SipStackFailed:
    """A thread of the SIP backend died or stopped turning: nothing can be called or answered until the agent
    restarts (the runner stops feeding the systemd watchdog so that systemd does it)."""

    detail: str = ""


@dataclass(frozen=True)
class SipStackRecovered:
    """The SIP backend's threads turn again (a stall that passed)."""


@dataclass(frozen=True)
class IncomingCall:
    """Someone (normally a desk calling back) is calling the post."""

    call_id: str
    caller: str = ""


@dataclass(frozen=True)
class SelfTestRequested:
    """Run the self-test now (control socket, sidecar, or the command line)."""


@dataclass(frozen=True)
class AudioHeard:
    """What the far end of a :class:`~sip_refuge.post.commands.CheckAudio` path heard: 16-bit mono samples at
    ``rate`` (empty when the backend could not play or record, e.g. the call was gone)."""

    check_id: str
    rate: int
    pcm: bytes = field(default=b"", repr=False)


@dataclass(frozen=True)
class Tick:
    """Nothing happened, but time passed: lets timers fire (same as ``PostMachine.tick``)."""


Event = (
    ButtonPressed
    | ButtonReleased
    | TamperChanged
    | Registered
    | RegistrationFailed
    | Unregistered
    | CallProgress
    | CallAnswered
    | CallFailed
    | CallEnded
    | MediaStalled
    | MediaResumed
    | CallProbed
    | SipStackFailed
    | SipStackRecovered
    | IncomingCall
    | SelfTestRequested
    | AudioHeard
    | Tick
)
