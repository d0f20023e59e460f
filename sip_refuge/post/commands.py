"""What the post must do: the outputs of :class:`sip_refuge.post.machine.PostMachine`.

The runner executes them in list order, so the machine puts the latency-critical one (``Dial``,
``Answer``) first. Every command is safe to execute twice or late: ``Hangup`` of a call the backend no
longer knows is a no-op, ``SetLights`` is absolute rather than a delta.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

# Telemetry values stay JSON-able so the outbox can store them as they are.
Json = str | int | float | bool | None | list["Json"] | dict[str, "Json"]


class Light(StrEnum):
    """How one LED shows; the panel maps the blink patterns to on/off times."""

    OFF = "off"
    ON = "on"
    BLINK = "blink"  # slow: "something needs attention" (device fault, a call-back ringing)
    FLASH = "flash"  # fast: reserved for urgent states; the panel supports it


@dataclass(frozen=True)
class SetLights:
    """The whole panel at once; yellow/green keep their EN 81-28 meanings, red is ours (faults)."""

    yellow: Light = Light.OFF
    green: Light = Light.OFF
    red: Light = Light.OFF


@dataclass(frozen=True)
class PlayPrompt:
    """Play a short local prompt on the post's speaker: ``connecting``, ``hold``, ``unreachable`` or ``callback``
    (a call-back ringing). Prompts play one after another, in the order asked, until :class:`StopPrompts`."""

    name: str


@dataclass(frozen=True)
class StopPrompts:
    """Silence the prompts, the one playing and the ones waiting (a call is connected, a self-test starts)."""


@dataclass(frozen=True)
class CheckAudio:
    """Play the self-test's chirp (:func:`sip_refuge.post.speech.test_signal`) on one path and record the far end
    of that path for ``seconds``: ``local``: the speaker, recorded by the microphone (before the echo canceller);
    ``call``: into call ``call_id`` (the PBX's echo extension), recorded from what the call brings back. The backend
    answers with :class:`~sip_refuge.post.events.AudioHeard`; the machine judges what was heard."""

    check_id: str
    path: str  # local | call
    call_id: str | None
    seconds: float


@dataclass(frozen=True)
class Dial:
    """Place a call. ``target`` is ``queue`` (an alarm) or ``selftest`` (the PBX's echo extension: its audio is
    not connected to the speaker and microphone; :class:`CheckAudio` uses it). ``host`` is the PBX to send the
    INVITE to."""

    call_id: str
    target: str
    extension: str
    host: str


@dataclass(frozen=True)
class Answer:
    """Answer the incoming call ``call_id``."""

    call_id: str


@dataclass(frozen=True)
class Ring:
    """Ring the post's speaker for the incoming call ``call_id`` (a press will answer it)."""

    call_id: str


@dataclass(frozen=True)
class Reject:
    """Refuse the incoming call ``call_id`` (the post is busy with an alarm)."""

    call_id: str
    status: int = 486


@dataclass(frozen=True)
class Hangup:
    """End (or cancel) the call ``call_id``."""

    call_id: str
    reason: str = ""


@dataclass(frozen=True)
class ProbeCall:
    """Ask the PBX whether it still holds call ``call_id`` (an OPTIONS inside the call's dialog); the backend
    answers with :class:`~sip_refuge.post.events.CallProbed`. How often, and how long to wait, is the
    machine's business (``Settings.probe_interval``, ``probe_timeout``)."""

    call_id: str


@dataclass(frozen=True)
class Report:
    """Telemetry for the sidecar. ``kind``: state | call | selftest | fault | registration.
    ``at`` is the machine's clock; the runner maps it to wall time."""

    kind: str
    at: float
    detail: dict[str, Json] = field(default_factory=dict)


Command = (SetLights | PlayPrompt | StopPrompts | CheckAudio | Dial | Answer | Ring | Reject | Hangup | ProbeCall
           | Report)
