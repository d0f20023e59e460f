"""What each kind of CCTV target is configured with: its options dataclass and the reader of its site-file keys.

The registry lives here, in ``config``, not beside the delivery code in ``sip_refuge.sidecar.targets``: the
site file is read by every part (``config check``, the post agent, the renderer), and none of them may pull in
the sidecar or its libraries (requests, Jinja2, standardwebhooks). ``sidecar`` already depends on ``config``,
so a target module takes its options from here and nothing points back. A kind's name is written once, in
:data:`KINDS`; ``sip_refuge.sidecar.targets.KIND`` must declare the same ``KIND`` and ``Options`` (a unit test
holds the two sides together).

A reader checks everything a target would refuse at start (a template with an unknown field, a webhook key
that is no ``whsec_`` key), so ``config check`` finds it rather than the first emergency call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sip_refuge.config.cctv import milestone, nx, vlc, webhook
from sip_refuge.config.model import Secret, TargetOptions
from sip_refuge.config.reader import Reader


class ReadContext(Protocol):
    """What a kind's reader gets from the loader beside its mapping: the shared checks of URLs and secrets."""

    check_secrets: bool

    def url(self, r: Reader, key: str, schemes: tuple[str, ...], *, required: bool = True) -> str | None: ...

    def secret(self, r: Reader, key: str = "secret", kind: str = "password", *,
               required: bool = True) -> Secret | None: ...

    def plain_mapping(self, r: Reader) -> dict[str, str]: ...


# (options or None when a required key is missing or wrong, the target's secret or None)
Read = Callable[[Reader, ReadContext], tuple[TargetOptions | None, Secret | None]]


@dataclass(frozen=True)
class TargetKind:
    name: str
    options: type[TargetOptions]
    read: Read


KINDS: dict[str, TargetKind] = {k.name: k for k in (
    TargetKind(webhook.KIND, webhook.WebhookOptions, webhook.read),
    TargetKind(milestone.KIND, milestone.MilestoneOptions, milestone.read),
    TargetKind(nx.KIND, nx.NxOptions, nx.read),
    TargetKind(vlc.KIND, vlc.VlcOptions, vlc.read),
)}

# Kinds a site file may still name, loaded with a warning and left out: why, and what to do instead.
DEPRECATED = {
    "operator": "the built-in operator page gets every event from the sidecar without a target; "
                "this entry does nothing: remove it",
}


def kind(name: str) -> TargetKind | None:
    return KINDS.get(name)
