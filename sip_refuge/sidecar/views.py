"""The read model: what the web app shows (posts, live calls, incidents), built from the recorder's live state
and the store. No locks of its own and no writes: every answer is built from one consistent copy.

A live call carries its real times (ISO UTC) and how long its caller waited, so a page opened mid-call shows
them; its post's camera status, so a page can show a camera fault on a calling post; and whether it sounds
the pages' alarm (:mod:`alarm`), beside the missed calls that still do.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from sip_refuge.config.model import Site
from sip_refuge.sidecar import alarm, export
from sip_refuge.sidecar.board import LiveCall
from sip_refuge.sidecar.events import iso_utc
from sip_refuge.sidecar.recorder import LiveState, Recorder
from sip_refuge.sidecar.records import CameraStatus, Incident
from sip_refuge.sidecar.snapshots import SnapshotCache
from sip_refuge.sidecar.store import Store, StoreError
from sip_refuge.telemetry import shown_status

log = logging.getLogger(__name__)


class ReadModel:
    def __init__(self, site: Site, store: Store, recorder: Recorder, snapshots: SnapshotCache | None = None,
                 *, now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.site, self.store, self.recorder, self.snapshots, self.now = site, store, recorder, snapshots, now

    # -- posts and live calls ----------------------------------------------------------------------
    def posts(self) -> list[dict[str, Any]]:
        state, now = self.recorder.state(), self.now()
        return [self._post(p.id, state, now) for p in self.site.posts]

    def post(self, post_id: str) -> dict[str, Any]:
        """One post's view; RefugeError for a post the site does not have."""
        self.site.post(post_id)
        return self._post(post_id, self.recorder.state(), self.now())

    def live_calls(self) -> list[dict[str, Any]]:
        """Every live call, longest waiting first."""
        state, now = self.recorder.state(), self.now()
        return [self._call(c, state.cameras, now) for c in sorted(state.calls, key=lambda c: c.queued_at)]

    def overview(self) -> dict[str, Any]:
        """``/api/v1/posts``: the posts and live calls from one copy, the missed calls still sounding the
        alarm, and the time they were read (a page counts waiting times on from it, whatever its own clock
        says)."""
        state, now = self.recorder.state(), self.now()
        return {"now": iso_utc(now), "posts": [self._post(p.id, state, now) for p in self.site.posts],
                "calls": [self._call(c, state.cameras, now) for c in sorted(state.calls, key=lambda c: c.queued_at)],
                "missed": self.missed(now)}

    def missed(self, now: datetime) -> list[dict[str, Any]]:
        """Calls over that no desk answered and nobody acknowledged or closed yet (:mod:`alarm`), newest
        first. Read from the store: while it cannot be read the pages still get the live calls."""
        try:
            incidents = self.store.missed_incidents(now - timedelta(seconds=alarm.MISSED_FOR))
        except StoreError as exc:  # /healthz and /metrics report the store's fault; this is asked per page
            log.debug("missed calls could not be read: %s", exc)
            return []
        names = {p.id: p.name for p in self.site.posts}
        return [{"incident": i.id, "reference": i.reference, "post": i.post_id,
                 "post_name": names.get(i.post_id, i.post_id), "queued_at": i.created, "ended": i.ended,
                 "outcome": i.outcome, "alarm": True} for i in incidents]

    def _call(self, call: LiveCall, cameras: Mapping[str, CameraStatus], now: datetime) -> dict[str, Any]:
        post = self.site.post(call.post_id)
        camera = cameras.get(call.post_id)
        return {
            "incident": call.incident, "reference": call.reference, "post": post.id, "post_name": post.name,
            "desk": call.desk, "state": call.state, "rung": list(call.rung),
            "queued_at": call.queued_at, "answered_at": call.answered_at, "overflowed_at": call.overflowed_at,
            "overflow_answered_at": call.overflow_answered_at, "wait_seconds": wait_seconds(call, now),
            "late": call.late, "snapshot_url": call.snapshot_url, "alarm": alarm.sounding(call),
            "acknowledged_at": call.acknowledged_at, "acknowledged_by": call.acknowledged_by,
            "camera": None if post.camera is None else {
                "ok": camera.ok if camera else None, "reason": camera.reason if camera else None},
        }

    def _post(self, post_id: str, state: LiveState, now: datetime) -> dict[str, Any]:
        post = self.site.post(post_id)
        status, camera = state.posts.get(post_id), state.cameras.get(post_id)
        call = next((c for c in state.calls if c.post_id == post_id), None)
        shown = shown_status(status.state, status.detail) if status else shown_status(None, None)
        return {
            "id": post.id, "name": post.name, "extension": post.extension,
            "location": {"address": post.location.address, "lat": post.location.lat, "lon": post.location.lon},
            "online": state.online.get(post_id), "state": shown["state"],
            "registered": shown["registered"], "last_self_test": shown["last_self_test"],
            "faults": shown["faults"], "sip_backend": post.sip_backend, "mock_gpio": shown["mock_gpio"],
            "sip_counters": shown["sip_counters"],
            "camera": None if post.camera is None else {
                "ok": camera.ok if camera else None, "reason": camera.reason if camera else None},
            "call": None if call is None else {
                "incident": call.incident, "reference": call.reference, "state": call.state, "desk": call.desk,
                "queued_at": call.queued_at, "answered_at": call.answered_at, "overflowed_at": call.overflowed_at,
                "wait_seconds": wait_seconds(call, now), "alarm": alarm.sounding(call)},
        }

    # -- incidents ---------------------------------------------------------------------------------
    def incidents(self, limit: int | None = 100, post_id: str | None = None) -> list[Incident]:
        return self.store.incidents(limit, post_id)

    def incident(self, incident_id: str) -> Incident | None:
        return self.store.incident(incident_id)

    def export_csv(self, limit: int | None = None) -> str:
        out = io.StringIO()
        export.write_csv(self.store.incidents(limit), out)
        return out.getvalue()

    def export_json(self, limit: int | None = None) -> str:
        out = io.StringIO()
        export.write_json(self.store.incidents(limit), out)
        return out.getvalue()

    def snapshot(self, incident: str, wait: float = 0.0) -> bytes | None:
        return self.snapshots.get(incident, wait) if self.snapshots is not None else None

    def close_reasons(self) -> list[dict[str, str]]:
        return [{"id": r.id, "label": r.label} for r in self.site.close_reasons]


def wait_seconds(call: LiveCall, now: datetime) -> float:
    """How long the caller waited for a desk: until one answered, until the call overflowed, or until ``now``
    while it still waits."""
    until = call.answered_at or call.overflowed_at
    end = datetime.fromisoformat(until) if until else now
    return round(max(0.0, (end - datetime.fromisoformat(call.queued_at)).total_seconds()), 1)
