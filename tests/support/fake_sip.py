"""A fake SIP backend for the runner's unit tests: the whole :class:`~sip_refuge.post.sip.SipBackend` Protocol,
recording what it was asked and answering only what a test tells it to (through :meth:`FakeBackend.emit`).

It plays no PBX by itself: the test says what the PBX did, as events, in the order it wants. Unlike the real
backends it runs no thread, so a test steps the runner by hand and sees every command at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sip_refuge.errors import SipError
from sip_refuge.post.events import Event
from sip_refuge.post.sip import Account, Emit, Health


@dataclass
class FakeBackend:
    asked: list[tuple[object, ...]] = field(default_factory=list)  # (method, *arguments), in order
    fail: set[str] = field(default_factory=set)  # methods that raise, as a broken stack would
    started: Account | None = None
    _emit: Emit | None = None

    def _ask(self, method: str, *args: object) -> None:
        self.asked.append((method, *args))
        if method in self.fail:
            raise SipError(f"fake backend: {method} fails")

    def emit(self, event: Event) -> None:
        """What the fake PBX (the test) says happened, through the runner's own ``emit``."""
        assert self._emit is not None, "the runner has not started the backend"
        self._emit(event)

    def called(self, method: str) -> list[tuple[object, ...]]:
        return [a[1:] for a in self.asked if a[0] == method]

    # -- SipBackend ------------------------------------------------------------------------------------
    def start(self, account: Account, emit: Emit) -> None:
        self._ask("start")
        self.started, self._emit = account, emit

    def dial(self, call_id: str, extension: str, host: str, selftest: bool) -> None:
        self._ask("dial", call_id, extension, host, selftest)

    def answer(self, call_id: str) -> None:
        self._ask("answer", call_id)

    def reject(self, call_id: str, status: int) -> None:
        self._ask("reject", call_id, status)

    def hangup(self, call_id: str) -> None:
        self._ask("hangup", call_id)

    def send_dtmf(self, call_id: str, digits: str) -> None:
        self._ask("send_dtmf", call_id, digits)

    def play_prompt(self, name: str) -> None:
        self._ask("play_prompt", name)

    def stop_prompts(self) -> None:
        self._ask("stop_prompts")

    def check_audio(self, check_id: str, path: str, call_id: str | None, seconds: float) -> None:
        self._ask("check_audio", check_id, path, call_id, seconds)

    def probe(self, call_id: str) -> None:
        self._ask("probe", call_id)

    def health(self) -> Health:
        return Health(True, "", {})

    def stop(self) -> None:
        self._ask("stop")
