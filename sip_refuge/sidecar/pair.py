"""The sidecar on a PBX pair: one AMI follower per PBX, one incident log (issue 12.3).

Both Asterisks number their channels alike (``1733...123.45``), so what the secondary reports is made its own
before the call tracker sees it: its ``Uniqueid``/``Linkedid`` and contact URIs get a ``secondary/`` prefix, and
every event says which PBX sent it (``Pbx``). The primary's go through unchanged, so a single-PBX site is exactly
as before. The tracker keeps each call's PBX and, when a post's alarm comes back through the other PBX while the
one that carried it is down, makes it the next leg of the same incident.

:class:`PbxWatch` says which PBX is down as the sidecar sees it: its AMI link lost (Asterisk killed, host gone,
the AMI login refused), or never up within the grace after start. It raises ``pbx.down`` and ``pbx.up`` on every
site: with one PBX nothing follows the calls while it is down, which the control room must hear of as much as of
half a pair. Only a pair's PBXs are listed as down (:meth:`PbxWatch.down`, /healthz's ``pbx``): a single PBX's
outage there is the ``ami`` problem it always was.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from sip_refuge.config.model import PRIMARY, Site
from sip_refuge.sidecar.ami import Snapshot

IDS = ("Uniqueid", "Linkedid", "DestUniqueid", "DestLinkedid")


def own(role: str, value: str) -> str:
    """``value`` (a Uniqueid, a contact URI) as the tracker knows it for the PBX of ``role``."""
    return value if role == PRIMARY or not value else f"{role}/{value}"


def tag_event(event: Mapping[str, str], role: str) -> dict[str, str]:
    """An AMI event of the PBX of ``role``, as the tracker reads it."""
    out = dict(event)
    out["Pbx"] = role
    if role != PRIMARY:
        for key in IDS:
            if out.get(key):
                out[key] = own(role, out[key])
        if out.get("URI"):
            out["URI"] = own(role, out["URI"])
    return out


def tag_snapshot(snap: Snapshot, role: str) -> Snapshot:
    """A resync of the PBX of ``role``, as the tracker reads it."""
    if role == PRIMARY:
        return snap
    return replace(
        snap,
        contact_uris={post: {own(role, uri): status for uri, status in uris.items()}
                      for post, uris in snap.contact_uris.items()},
        channels=None if snap.channels is None else {own(role, uid) for uid in snap.channels},
        queue_entries=[tag_event(e, role) for e in snap.queue_entries],
        alarm_channels=[tag_event(e, role) for e in snap.alarm_channels],
        fresh={own(role, uid) for uid in snap.fresh},
        gone={own(role, uid) for uid in snap.gone},
    )


@dataclass
class _Pbx:
    role: str
    host: str
    up: bool | None = None  # None: its AMI has not been up since start
    since: float = 0.0  # when it went down (or the watch started)
    reported: bool = False  # pbx.down was raised and pbx.up not yet


@dataclass(frozen=True)
class PbxChange:
    """``pbx.down`` or ``pbx.up`` of the PBX of ``role`` at ``host``."""

    type: str
    role: str
    host: str
    reason: str


class PbxWatch:
    """Which PBX of a pair is down. Called under the recorder's lock; times on its clock."""

    def __init__(self, site: Site, now: float, grace: float) -> None:
        pbx = site.pbx
        self.pair = len(pbx.roles) > 1
        self.grace = grace
        self.pbxs = {role: _Pbx(role, pbx.host_of(role), since=now) for role in pbx.roles}

    def link(self, role: str, up: bool, now: float) -> list[PbxChange]:
        p = self.pbxs.get(role)
        if p is None or up == p.up:
            return []
        was, p.up = p.up, up
        if up:
            if p.reported:
                p.reported = False
                return [PbxChange("pbx.up", role, p.host, "AMI connected again")]
            return []
        p.since = now
        if was:  # it was up: its link dropping is the PBX going (kill -9 drops it at once)
            p.reported = True
            return [PbxChange("pbx.down", role, p.host, "AMI connection lost")]
        return []

    def tick(self, now: float) -> list[PbxChange]:
        """``pbx.down`` for a PBX whose AMI never came up within the grace after start."""
        out = []
        for p in self.pbxs.values():
            if not p.up and not p.reported and now - p.since >= self.grace:
                p.reported = True
                out.append(PbxChange("pbx.down", p.role, p.host, f"AMI not connected for {self.grace:g} s"))
        return out

    def next_deadline(self) -> float | None:
        due = [p.since + self.grace for p in self.pbxs.values() if not p.up and not p.reported]
        return min(due) if due else None

    def down(self) -> dict[str, float]:
        """Roles of PBXs down now (their link lost, or never up), with since when (the watch's clock)."""
        return {p.role: p.since for p in self.pbxs.values() if self.pair and not p.up}
