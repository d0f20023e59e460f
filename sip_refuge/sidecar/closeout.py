"""Closing an incident: an operator's reason (from ``sidecar.close_reasons``) and an optional note.

The rules, kept apart from HTTP and the store so they are tested alone:
- an incident is closed once; a second close-out is refused (409), the first one stands;
- only once its call is over. While the caller is still connected (queued, answered, or talking to the
  overflow route) the close-out is refused (409): the sidecar follows Asterisk read-only and cannot end the
  call, and a record closed while someone is still on the line would say the matter was dealt with before
  it was, and take the call off the live pages. The operator closes it once the caller has hung up;
- the reason must be one of the site's; the note is plain text of at most NOTE_MAX characters (line breaks
  and tabs allowed, other control characters refused), and no other field is accepted (422).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sip_refuge.config.files import control_character
from sip_refuge.config.model import CloseReason
from sip_refuge.errors import SidecarError
from sip_refuge.sidecar.records import Incident

NOTE_MAX = 2000  # characters: a few sentences for the record, not a report
FIELDS = ("reason", "note")


class CloseRefused(SidecarError):
    """A close-out the sidecar will not record; ``status`` is the HTTP answer (404, 409 or 422)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class CloseOut:
    reason: CloseReason
    note: str | None


def parse(body: object, reasons: Sequence[CloseReason]) -> CloseOut:
    """The close-out a request body asks for: ``{"reason": ID, "note": TEXT}`` (note optional)."""
    if not isinstance(body, dict):
        raise CloseRefused(422, "body: must be a JSON object {reason, note}")
    unknown = sorted(str(k) for k in body if k not in FIELDS)
    if unknown:
        raise CloseRefused(422, f"{unknown[0]}: unknown field (known: {', '.join(FIELDS)})")
    known = {r.id: r for r in reasons}
    reason_id = body.get("reason")
    if not isinstance(reason_id, str) or reason_id not in known:
        raise CloseRefused(422, f"reason: {reason_id!r} is not one of the site's close reasons "
                                f"({', '.join(known)})")
    note = body.get("note")
    if note is not None:
        if not isinstance(note, str):
            raise CloseRefused(422, "note: must be text")
        note = note.replace("\r\n", "\n").strip()
        if len(note) > NOTE_MAX:
            raise CloseRefused(422, f"note: {len(note)} characters; at most {NOTE_MAX}")
        bad = control_character(note, "\n\t")
        if bad:
            raise CloseRefused(422, f"note: holds a control character ({bad})")
    return CloseOut(known[reason_id], note or None)


def check(incident: Incident | None, incident_id: str, *, live: bool, closed: bool = False) -> Incident:
    """The incident to close, or CloseRefused saying why it cannot be closed now. ``live``: its caller is still
    connected; ``closed``: closed already (in memory, while the store has not taken the write yet)."""
    if incident is None:
        raise CloseRefused(404, f"no incident {incident_id!r}")
    if closed or incident.closed_at is not None:
        raise CloseRefused(409, f"incident {incident.reference or incident_id} is already closed"
                                + (f" ({incident.close_reason}, {incident.closed_at})" if incident.closed_at else ""))
    if live:
        raise CloseRefused(409, f"incident {incident.reference or incident_id}: the caller is still connected; "
                                "close it once the call has ended")
    if incident.state != "ended":
        raise CloseRefused(409, f"incident {incident.reference or incident_id} has not ended yet "
                                f"(state {incident.state})")
    return incident
