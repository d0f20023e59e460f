"""``cctv[type=nx]``: an Nx Witness / DW Spectrum generic event (``sip_refuge.sidecar.targets.nx``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sip_refuge.config.model import Secret, TargetOptions
from sip_refuge.config.reader import Reader

if TYPE_CHECKING:
    from sip_refuge.config.cctv import ReadContext

KIND = "nx"
APIS = ("legacy", "v4")


@dataclass(frozen=True)
class NxOptions(TargetOptions):
    url: str
    username: str
    api: str = "legacy"  # legacy: /api/createEvent with digest auth; v4: /rest/v4/events/generic (6.1+)
    verify: bool | str = True  # TLS: true, false, or the path of the CA that signed the server's certificate
    cameras: dict[str, str] = field(default_factory=dict)  # post id -> Nx camera id


def read(r: Reader, ctx: ReadContext) -> tuple[NxOptions | None, Secret | None]:
    url = ctx.url(r, "url", ("http", "https"))
    username = r.text("username", required=True)
    secret = ctx.secret(r, "password")
    api = r.choice("api", APIS, "legacy") or "legacy"
    # Nx servers ship a self-signed certificate: false, or the path of the CA that signed it.
    verify = r.raw("verify", False)
    if verify is not None and not isinstance(verify, bool | str):
        r.fail("verify", "must be true, false or the path of a CA certificate")
        verify = None
    elif isinstance(verify, str) and not r.clean("verify", verify):
        verify = None
    cameras = ctx.plain_mapping(r.child("cameras"))
    if url is None or username is None:
        return None, secret
    return NxOptions(url, username, api, True if verify is None else verify, cameras), secret
