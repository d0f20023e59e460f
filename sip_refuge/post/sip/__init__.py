"""SIP backends of the post agent, behind one small Protocol chosen per post by ``sip_backend``.

A backend turns commands from the machine into SIP and SIP into machine events, and owns the post's sound card
(call audio, prompts and the self-test's chirp all go through its audio path: nothing else opens the device). It
reports facts (responses, silence on the media, what was heard); every policy (timeouts, verdicts) is the machine's.
Its library's callbacks only call ``emit`` (which enqueues); they never touch the machine. Each real library is
imported only inside its own module, so a post on pyVoIP never needs pjsua2 and the other way round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Protocol

from sip_refuge.config.model import Pbx, Post
from sip_refuge.errors import SipError
from sip_refuge.post.events import Event
from sip_refuge.post.sound import Sound

Emit = Callable[[Event], None]


@dataclass(frozen=True)
class Account:
    """What a backend needs: the post's SIP identity and the PBX (spec section 2), its sound card and prompts."""

    post: Post
    pbx: Pbx
    password: str = field(repr=False)  # never in a log line or a traceback
    local_port: int = 0  # 0 = any free port
    sound: Sound = field(default_factory=Sound)
    prompts_dir: Path | None = None  # the site's own prompts, if it has them


@dataclass(frozen=True)
class Health:
    """A backend's threads and counters. ``alive`` False: a SIP or media thread died or stopped turning, so
    no call can be placed or received until the agent restarts; ``detail`` says which and why.
    ``counters``: requests refused (``refused``: not from the PBX, or not a call-back through the post's
    registration), datagrams that could not be parsed (``malformed``), messages whose handling failed
    (``errors``), and the same for RTP (``rtp_refused``, ``rtp_malformed``)."""

    alive: bool = True
    detail: str = ""
    counters: dict[str, int] = field(default_factory=dict)


class SipBackend(Protocol):
    """What the runner asks of a SIP stack. Every method returns at once; results come back as events."""

    def start(self, account: Account, emit: Emit) -> None:
        """Create the stack and register to ``account.pbx.host`` (retrying by itself)."""

    def dial(self, call_id: str, extension: str, host: str, selftest: bool) -> None:
        """INVITE ``extension`` at ``host``; report CallProgress (the first response of each status, 100 Trying
        included) / CallAnswered / CallFailed / CallEnded. A ``selftest`` call's audio is not connected to the
        card (``check_audio`` uses it); any other call's is, once answered."""

    def answer(self, call_id: str) -> None:
        """Answer the incoming call ``call_id``."""

    def reject(self, call_id: str, status: int) -> None:
        """Refuse the incoming call ``call_id`` with ``status``."""

    def hangup(self, call_id: str) -> None:
        """End, cancel or refuse ``call_id``; a call the backend no longer knows is a no-op."""

    def play_prompt(self, name: str) -> None:
        """Queue prompt ``name`` on the speaker (prompts play one after another)."""

    def stop_prompts(self) -> None:
        """Silence the prompt playing and drop the ones waiting."""

    def check_audio(self, check_id: str, path: str, call_id: str | None, seconds: float) -> None:
        """Play the self-test's chirp on ``path`` (``local``: the speaker; ``call``: into ``call_id``) and record the
        other end of that path (the microphone before the echo canceller; what the call brings back) for
        ``seconds``; report AudioHeard (with no samples if it could not)."""

    def send_dtmf(self, call_id: str, digits: str) -> None:
        """Send RFC 4733 DTMF on an established call."""

    def probe(self, call_id: str) -> None:
        """Ask the PBX whether it still holds ``call_id`` (an OPTIONS inside the call's dialog, early or
        confirmed); report the answer as CallProbed (``status`` None: no answer or transport error). The
        machine decides how often and how long to wait: the backend only reports what came back."""

    def health(self) -> Health:
        """Whether the stack's threads are alive and turning, and its counts of refused and unreadable input.
        Called by the runner on every turn of its loop: must not block."""

    def stop(self) -> None:
        """Hang up everything, unregister and free the stack (threads, sockets)."""


BACKENDS = {"pjsua2": "sip_refuge.post.sip.pjsua2", "pyvoip": "sip_refuge.post.sip.pyvoip"}


def load_backend(name: str) -> SipBackend:
    """The backend class named by the site (``pjsua2`` | ``pyvoip``), imported only now."""
    try:
        module = import_module(BACKENDS[name])
    except ImportError as exc:
        raise SipError(f"the {name} SIP backend cannot be loaded ({exc}); build and install pjproject's Python "
                       "binding with `make venv` (or `python -m sip_refuge.post.sip.pjsua2_build`, then pip install "
                       "the wheel it prints), or set `sip_backend: pyvoip` for this post") from None
    backend: SipBackend = module.Backend()
    return backend
