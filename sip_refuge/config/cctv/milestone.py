"""``cctv[type=milestone]``: an XProtect Generic Event string over TCP (``sip_refuge.sidecar.targets.milestone``)."""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sip_refuge.config.model import Secret, TargetOptions
from sip_refuge.config.reader import Reader
from sip_refuge.errors import RefugeError

if TYPE_CHECKING:
    from sip_refuge.config.cctv import ReadContext

KIND = "milestone"
HOST = r"[A-Za-z0-9.:\[\]-]{1,253}"
DEFAULT_PORT = 1234
DEFAULT_TEMPLATE = "{type} {post_id}"
# What a template may name; the target fills each from the event (empty when the event has no such thing).
FIELDS = ("type", "post_id", "post_name", "incident", "reference", "desk_id", "desk_name", "workstation",
          "timestamp", "event_id", "reason", "snapshot_url")


@dataclass(frozen=True)
class MilestoneOptions(TargetOptions):
    host: str
    port: int = DEFAULT_PORT
    template: str = DEFAULT_TEMPLATE
    echo: bool = True  # the "Compatible" data source echoes what it received: wait for it


def check_template(template: str) -> None:
    """Reject unknown fields, so a typo is found by ``config check``, not on the first emergency call."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise RefugeError(f"milestone template {template!r}: {exc}") from None
    unknown = names - set(FIELDS)
    if unknown:
        raise RefugeError(f"milestone template {template!r}: unknown fields {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(FIELDS)})")


def read(r: Reader, ctx: ReadContext) -> tuple[MilestoneOptions | None, Secret | None]:
    host = r.text("host", required=True, pattern=HOST, hint="is not a host name or address")
    port = r.integer("port", DEFAULT_PORT, low=1, high=65535) or DEFAULT_PORT
    template = r.text("template", DEFAULT_TEMPLATE) or DEFAULT_TEMPLATE
    try:
        check_template(template)
    except RefugeError as exc:
        r.fail("template", str(exc))
    echo = r.flag("echo", True)
    return (MilestoneOptions(host, port, template, echo) if host else None), None
