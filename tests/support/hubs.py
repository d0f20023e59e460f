"""The sidecar's hub in-process for unit tests: an in-memory store, no HTTP server, and a scripted CCTV target
that a test can take down and bring back."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from urllib.parse import quote

from sip_refuge.config import Site
from sip_refuge.sidecar import events as ev
from sip_refuge.sidecar.core import Hub
from sip_refuge.sidecar.outbox import Outbox
from sip_refuge.sidecar.store import Store
from sip_refuge.sidecar.targets import Target, TargetError
from tests.support.receivers import CAMERA_PASSWORD


class ScriptedTarget:
    """A real in-process target: fails while ``down`` (or per a script), records what it accepted."""

    def __init__(self, name: str, reveal: bool = False) -> None:
        self.name = name
        self.reveal_credentials = reveal
        self.down = False
        self.accepted: list[ev.Event] = []
        self.attempts: list[str] = []

    def deliver(self, event: ev.Event) -> None:
        self.attempts.append(event.id)
        if self.down:
            # Both forms a password takes: raw (a library echoing it) and URL-encoded inside a URL.
            raise TargetError(f"{self.name}: refused {CAMERA_PASSWORD} at rtsp://viewer:{quote(CAMERA_PASSWORD, safe='')}@x")
        self.accepted.append(event)

    def close(self) -> None:
        pass


@contextmanager
def memory_hub(site: Site, targets: Sequence[Target] = ()) -> Iterator[Hub]:
    """The hub of ``site`` on an in-memory store, delivering to ``targets``; closed (hub, then store) after."""
    store = Store(":memory:")
    hub = Hub(site, store, Outbox(store, targets), base_url="http://127.0.0.1:8080")
    try:
        yield hub
    finally:
        hub.close()
        store.close()
