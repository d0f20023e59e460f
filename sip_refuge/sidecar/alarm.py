"""The pages' alarm: which calls sound it, and an operator's acknowledgement that silences it.

A call sounds the alarm on every open page from ``call.queued`` until a desk answers it or an operator
acknowledges it. Neither the overflow route nor the caller hanging up silences it: a call that nobody in the
control room took (overflowed, or abandoned before any desk answered) is a *missed* call and keeps the alarm
on until an operator acknowledges or closes it, for up to MISSED_FOR after it began (the pages list it as
missed after that, silently: an upgrade or a long outage must not sound for last week's calls).

The rules, kept apart from HTTP and the store so they are tested alone:
- only a call no desk answered can be acknowledged, once (409 otherwise: answered, acknowledged or closed);
- the body is empty, or ``{"desk": ID}`` naming the desk whose console acknowledged (422 otherwise).

An acknowledgement goes to the pages as ``incident.acknowledged`` and never to CCTV targets: it changes
nothing for the caller or the call, the CCTV system has its own alarm handling, and the record keeps it
(the incident's timeline and fields, the audit log, the export).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sip_refuge.config.model import Desk, Site
from sip_refuge.errors import SidecarError
from sip_refuge.sidecar.board import LiveCall
from sip_refuge.sidecar.events import Event, iso_utc, new_event_id
from sip_refuge.sidecar.records import Incident

MISSED_FOR = 12 * 3600  # seconds after it began that a missed call keeps the alarm on: one shift
ACKNOWLEDGED = "incident.acknowledged"  # the pages' event (never sent to CCTV targets)
FIELDS = ("desk",)


class AcknowledgeRefused(SidecarError):
    """An acknowledgement the sidecar will not record; ``status`` is the HTTP answer (404, 409 or 422)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def sounding(call: LiveCall) -> bool:
    """A live call sounds the alarm while no desk has answered it and nobody has acknowledged it."""
    return call.desk is None and call.acknowledged_at is None


def parse(body: object, desks: Sequence[Desk]) -> str | None:
    """The desk named by a request body (None for an empty body or ``{}``)."""
    if body is None:
        return None
    if not isinstance(body, dict):
        raise AcknowledgeRefused(422, "body: must be a JSON object {desk} or empty")
    unknown = sorted(str(k) for k in body if k not in FIELDS)
    if unknown:
        raise AcknowledgeRefused(422, f"{unknown[0]}: unknown field (known: {', '.join(FIELDS)})")
    desk = body.get("desk")
    if desk is None:
        return None
    ids = [d.id for d in desks]
    if not isinstance(desk, str) or desk not in ids:
        raise AcknowledgeRefused(422, f"desk: {desk!r} is not one of the site's desks ({', '.join(ids)})")
    return desk


def check_live(call: LiveCall) -> None:
    """Refuse to acknowledge a live call that is not sounding the alarm."""
    name = call.reference or call.incident
    if call.desk is not None:
        raise AcknowledgeRefused(409, f"incident {name}: answered by {call.desk}, there is no alarm to acknowledge")
    if call.acknowledged_at is not None:
        raise AcknowledgeRefused(409, f"incident {name} is already acknowledged "
                                      f"({call.acknowledged_by}, {call.acknowledged_at})")


def check_over(incident: Incident | None, incident_id: str) -> Incident:
    """The ended incident to acknowledge (a missed call), or AcknowledgeRefused saying why not."""
    if incident is None:
        raise AcknowledgeRefused(404, f"no incident {incident_id!r}")
    name = incident.reference or incident_id
    if incident.acknowledged_at is not None:
        raise AcknowledgeRefused(409, f"incident {name} is already acknowledged "
                                      f"({incident.acknowledged_by}, {incident.acknowledged_at})")
    if incident.answered_by is not None:
        raise AcknowledgeRefused(409, f"incident {name}: answered by {incident.answered_by}, there is no alarm "
                                      "to acknowledge")
    if incident.closed_at is not None:
        raise AcknowledgeRefused(409, f"incident {name} is closed, which ended its alarm")
    if incident.state != "ended":
        # Live in the store but not on the board: a call this process no longer follows (the resync ends it).
        raise AcknowledgeRefused(409, f"incident {name} is not a call the sidecar follows now (state "
                                      f"{incident.state}); try again in a moment")
    return incident


def acknowledged_event(site: Site, *, incident: str, reference: str | None, post_id: str, at: datetime,
                       by: str | None, desk: str | None) -> Event:
    """``incident.acknowledged`` for the pages: every open console silences that call's alarm."""
    post = site.post(post_id)
    timestamp = iso_utc(at)
    body = {"type": ACKNOWLEDGED, "timestamp": timestamp,
            "data": {"incident": incident, "reference": reference, "post": {"id": post.id, "name": post.name},
                     "acknowledged_at": timestamp, "acknowledged_by": by, "desk": desk}}
    return Event(new_event_id(), ACKNOWLEDGED, timestamp, incident, post.id, body)

