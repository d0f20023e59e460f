"""What the store hands back: deliveries, incidents with their timelines, post and camera status."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sip_refuge.sidecar.events import Event


@dataclass(frozen=True)
class Delivery:
    """One event still owed to one target."""

    seq: int
    target: str
    attempts: int
    next_attempt_at: float
    event: Event


@dataclass(frozen=True)
class TimelineEntry:
    at: str
    kind: str
    detail: dict[str, Any]


@dataclass(frozen=True)
class Incident:
    id: str
    post_id: str
    state: str
    created: str
    answered_by: str | None
    answered_at: str | None
    ended: str | None
    outcome: str | None
    snapshot: str | None
    timeline: tuple[TimelineEntry, ...] = ()
    reference: str | None = None  # PREFIX-NNNN; None for incidents recorded before references existed
    closed_at: str | None = None
    closed_by: str | None = None
    close_reason: str | None = None
    close_note: str | None = None
    acknowledged_at: str | None = None  # an operator acknowledged the alarm of a call no desk had answered
    acknowledged_by: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PostStatus:
    post_id: str
    updated: str
    online: bool | None = None
    state: str | None = None
    contact: str | None = None
    detail: dict[str, Any] | None = None


@dataclass(frozen=True)
class CameraStatus:
    post_id: str
    updated: str
    ok: bool | None = None
    reason: str | None = None
    detail: dict[str, Any] | None = None


@dataclass(frozen=True)
class StoreFault:
    """Why the store last failed: ``kind`` is one of storefile's kinds (full, io, busy, corrupt)."""

    kind: str
    error: str
    since: str  # ISO UTC
