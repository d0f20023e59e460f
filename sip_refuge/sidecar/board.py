"""The live calls as the recorder recorded them, with their wall-clock times, and the references it gives.

The tracker (``calls.py``) decides what AMI events mean; the board keeps, for each call still live, what a
page opened mid-call needs: when it was queued, answered or overflowed, which desks rang, its reference.
Not thread-safe: the recorder changes it under its lock and hands out copies.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from sip_refuge.sidecar import calls
from sip_refuge.sidecar.calls import Occurrence

LIVE_STATES = ("queued", "answered", "overflowed")


@dataclass(frozen=True)
class LiveCall:
    incident: str
    reference: str | None
    post_id: str
    state: str  # queued | answered | overflowed (the caller is in the overflow route)
    queued_at: str  # ISO UTC; for a call found late (``late``), when it was found
    desk: str | None = None
    rung: tuple[str, ...] = ()
    answered_at: str | None = None
    overflowed_at: str | None = None
    overflow_answered_at: str | None = None  # the overflow route answered the caller
    snapshot_url: str | None = None
    late: bool = False
    acknowledged_at: str | None = None  # an operator acknowledged its alarm (ISO UTC)
    acknowledged_by: str | None = None


class CallBoard:
    def __init__(self) -> None:
        self._calls: dict[str, LiveCall] = {}  # by incident, in the order they were queued

    def get(self, incident: str) -> LiveCall | None:
        return self._calls.get(incident)

    def calls(self) -> tuple[LiveCall, ...]:
        return tuple(self._calls.values())

    def put(self, call: LiveCall) -> None:
        """A call followed again after a restart (from the store)."""
        self._calls[call.incident] = call

    def acknowledge(self, incident: str, at: str, by: str | None) -> None:
        call = self._calls.get(incident)
        if call is not None:
            self._calls[incident] = replace(call, acknowledged_at=at, acknowledged_by=by)

    def apply(self, occ: Occurrence, at: str, *, reference: str | None = None,
              snapshot_url: str | None = None) -> None:
        incident = occ.incident or ""
        if occ.type == "call.queued":
            self._calls[incident] = LiveCall(incident, reference, occ.post.id, "queued", at,
                                             snapshot_url=snapshot_url, late=bool(occ.detail.get("late")))
            return
        call = self._calls.get(incident)
        if call is None:
            return
        if occ.type == calls.CALL_RUNG:
            desk = str(occ.detail.get("desk") or "")
            if desk and desk not in call.rung:
                self._calls[incident] = replace(call, rung=(*call.rung, desk))
        elif occ.type == "call.answered":
            self._calls[incident] = replace(call, state="answered", desk=occ.desk.id if occ.desk else None,
                                            answered_at=at)
        elif occ.type in ("call.unanswered", calls.CALL_OVERFLOWED) and occ.detail.get("outcome") == "overflowed":
            self._calls[incident] = replace(call, state="overflowed", overflowed_at=at)
        elif occ.type == calls.CALL_REQUEUED:
            self._calls[incident] = replace(call, state="queued", overflowed_at=None, overflow_answered_at=None)
        elif occ.type == calls.CALL_OVERFLOW_ANSWERED:
            self._calls[incident] = replace(call, overflow_answered_at=at)
        elif occ.type in ("call.ended", "call.unanswered"):
            del self._calls[incident]  # over: ended, or abandoned


class References:
    """Short human incident references, ``PREFIX-0412``: a sequence over the whole database, counted on in
    memory (so a call still gets its reference while the store cannot write)."""

    def __init__(self, prefix: str, last: int) -> None:
        self.prefix, self.last = prefix, last

    def next(self) -> tuple[str, int]:
        self.last += 1
        return f"{self.prefix}-{self.last:04d}", self.last
