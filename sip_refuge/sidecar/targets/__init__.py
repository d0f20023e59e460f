"""CCTV/VMS targets: where events go. One small Protocol, one module per kind, chosen by the site file.

A target's ``deliver`` either returns (the target accepted the event) or raises :class:`TargetError`; the
outbox does the retrying. Every network call has a timeout, so a dead target costs its own worker a bounded
wait and nothing else. Modules are imported lazily: a site without Nx never imports the Nx code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Protocol

from sip_refuge.config.model import CctvTarget
from sip_refuge.errors import RefugeError, SidecarError
from sip_refuge.sidecar.events import Event

DEFAULT_TIMEOUT = 5.0  # seconds per network call; a VMS on the control room LAN answers in milliseconds


class TargetError(SidecarError):
    """A target did not accept an event; the outbox will try again later. Messages never hold secrets."""


class Target(Protocol):
    name: str
    # True when the target must get the camera password inside the RTSP URL (it opens the stream itself).
    reveal_credentials: bool

    def deliver(self, event: Event) -> None: ...

    def close(self) -> None: ...


Publish = Callable[[Event], None]

KINDS = ("webhook", "milestone", "nx", "vlc", "operator")  # each a module here with ``from_config``


def read_secret(config: CctvTarget) -> str:
    """The target's secret, with a message naming the target when it is missing."""
    if config.secret is None:
        raise SidecarError(f"cctv target {config.name}: a secret_file or secret_env is required")
    try:
        return config.secret.read()
    except RefugeError as exc:
        raise SidecarError(f"cctv target {config.name}: {exc}") from None


def make_target(config: CctvTarget, *, timeout: float = DEFAULT_TIMEOUT, publish: Publish | None = None) -> Target:
    """Build the target a site file entry describes. ``publish`` feeds the operator pop-up (in-process)."""
    if config.type not in KINDS:
        raise SidecarError(f"cctv target {config.name}: unknown type {config.type!r}")
    module = importlib.import_module(f"{__name__}.{config.type}")
    factory = module.from_config
    target: Target = factory(config, timeout=timeout, publish=publish)
    return target
