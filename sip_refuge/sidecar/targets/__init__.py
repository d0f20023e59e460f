"""CCTV/VMS targets: where events go. One small Protocol, one module per kind, chosen by the site file.

A target's ``deliver`` either returns (the target accepted the event) or raises :class:`TargetError`; the
outbox does the retrying. Every network call has a timeout, so a dead target costs its own worker a bounded
wait and nothing else. Modules are imported lazily: a site without Nx never imports the Nx code.

Each module here declares its ``KIND``, its ``Options`` dataclass and its site-file ``read``er, taken from
:mod:`sip_refuge.config.cctv` (which holds the registry, so that reading a site never imports the sidecar),
and builds its target with ``from_config``.
"""

from __future__ import annotations

import importlib
from typing import Protocol

from sip_refuge.config import cctv
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


def read_secret(config: CctvTarget) -> str:
    """The target's secret, with a message naming the target when it is missing."""
    if config.secret is None:
        raise SidecarError(f"cctv target {config.name}: a secret_file or secret_env is required")
    try:
        return config.secret.read()
    except RefugeError as exc:
        raise SidecarError(f"cctv target {config.name}: {exc}") from None


def make_target(config: CctvTarget, *, timeout: float = DEFAULT_TIMEOUT) -> Target:
    """Build the target a site file entry describes (its kind's module is imported now)."""
    if cctv.kind(config.type) is None:
        raise SidecarError(f"cctv target {config.name}: unknown type {config.type!r}")
    module = importlib.import_module(f"{__name__}.{config.type}")
    if not isinstance(config.options, module.Options):
        raise SidecarError(f"cctv target {config.name}: {type(config.options).__name__} are not {config.type} options")
    target: Target = module.from_config(config, timeout=timeout)
    return target
