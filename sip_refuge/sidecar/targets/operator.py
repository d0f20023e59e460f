"""The built-in operator pop-up (``/operator?desk=ID``), for control rooms whose CCTV software has no API.

Delivery is local: the event is already in the store (the page can read it from there), and ``publish`` hands
it to the web app's live feed in-process. It never carries the camera password: the page shows the camera
through the sidecar, not by opening the RTSP URL in the browser.
"""

from __future__ import annotations

import logging

from sip_refuge.config.model import CctvTarget
from sip_refuge.sidecar.events import Event
from sip_refuge.sidecar.targets import DEFAULT_TIMEOUT, Publish

log = logging.getLogger(__name__)


class OperatorTarget:
    reveal_credentials = False

    def __init__(self, name: str, publish: Publish | None = None) -> None:
        self.name = name
        self.publish = publish
        self.last: Event | None = None

    def deliver(self, event: Event) -> None:
        self.last = event
        if self.publish is None:
            return
        try:
            self.publish(event)
        except Exception as exc:  # noqa: BLE001 - a broken page feed must not stall the outbox
            # Delivery stays successful: retrying would replay the pop-up late, and the page also reads the
            # store, so the operator still sees the call.
            log.warning("%s: publishing %s %s to the operator page failed: %s", self.name, event.type,
                        event.post_id, exc)

    def close(self) -> None:
        pass


def from_config(config: CctvTarget, *, timeout: float = DEFAULT_TIMEOUT,
                publish: Publish | None = None) -> OperatorTarget:
    return OperatorTarget(config.name, publish)
