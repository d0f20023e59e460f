"""SIP backends of the post agent, behind one small Protocol chosen per post by ``sip_backend``.

A backend turns commands from the machine into SIP and SIP into machine events. Its library's
callbacks only call ``emit`` (which enqueues); they never touch the machine. Each real library is
imported only inside its own module, so a post on pyVoIP never needs pjsua2 and the other way round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module
from typing import Protocol

from sip_refuge.config.model import Pbx, Post
from sip_refuge.errors import SipError
from sip_refuge.post.events import Event

Emit = Callable[[Event], None]


@dataclass(frozen=True)
class Account:
    """What a backend needs to register: the post's SIP identity and the PBX (spec section 2)."""

    post: Post
    pbx: Pbx
    password: str = field(repr=False)  # never in a log line or a traceback
    local_port: int = 0  # 0 = any free port
    selftest_digits: str = "1379"  # sent on a self-test call; the echo must bring them back


class SipBackend(Protocol):
    """What the runner asks of a SIP stack. Every method returns at once; results come back as events."""

    def start(self, account: Account, emit: Emit) -> None:
        """Create the stack and register to ``account.pbx.host`` (retrying by itself)."""

    def dial(self, call_id: str, extension: str, host: str, selftest: bool) -> None:
        """INVITE ``extension`` at ``host``; report CallProgress / CallAnswered / CallFailed / CallEnded.
        With ``selftest`` also run the echo test once answered and report SelfTestResult, then hang up."""

    def answer(self, call_id: str) -> None:
        """Answer the incoming call ``call_id``."""

    def reject(self, call_id: str, status: int) -> None:
        """Refuse the incoming call ``call_id`` with ``status``."""

    def hangup(self, call_id: str) -> None:
        """End, cancel or refuse ``call_id``; a call the backend no longer knows is a no-op."""

    def send_dtmf(self, call_id: str, digits: str) -> None:
        """Send RFC 4733 DTMF on an established call."""

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
