"""What the sidecar knows about its AMI link to Asterisk, for ``/healthz`` and ``/metrics``.

The AMI follower reports into it from its own thread; the web app reads it from request threads.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from sip_refuge.sidecar.events import iso_utc


@dataclass(frozen=True)
class LinkStatus:
    connected: bool = False
    since: str | None = None  # when it last went up or down (ISO UTC)
    last_error: str | None = None  # why the last AMI login or resync failed; None once it works
    last_error_at: str | None = None
    resynced_at: str | None = None  # when live state was last read back from Asterisk


class AmiLink:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._status = LinkStatus()

    def status(self) -> LinkStatus:
        with self._lock:
            return self._status

    @property
    def connected(self) -> bool:
        return self.status().connected

    def on_link(self, up: bool) -> None:
        with self._lock:
            self._status = replace(self._status, connected=up, since=_now())

    def on_error(self, error: str | None) -> None:
        """The AMI follower's latest failure (a refused login, a failed resync); None once it works again."""
        with self._lock:
            self._status = replace(self._status, last_error=error, last_error_at=None if error is None else _now())

    def resynced(self) -> None:
        with self._lock:
            self._status = replace(self._status, resynced_at=_now())


def _now() -> str:
    return iso_utc(datetime.now(UTC))
