"""``cctv[type=vlc]``: VLC's HTTP interface plays the calling post's camera (``sip_refuge.sidecar.targets.vlc``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sip_refuge.config.model import Secret, TargetOptions
from sip_refuge.config.reader import Reader

if TYPE_CHECKING:
    from sip_refuge.config.cctv import ReadContext

KIND = "vlc"


@dataclass(frozen=True)
class VlcOptions(TargetOptions):
    url: str  # http://HOST:PORT of VLC's HTTP interface


def read(r: Reader, ctx: ReadContext) -> tuple[VlcOptions | None, Secret | None]:
    url = ctx.url(r, "url", ("http",))
    secret = ctx.secret(r, "password")
    return (VlcOptions(url) if url else None), secret
