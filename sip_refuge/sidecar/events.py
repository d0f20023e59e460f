"""The events the sidecar sends to CCTV targets (spec section 6), built from the site model.

An :class:`Event` carries the body exactly as a target receives it, except for one thing: the camera URL in
the stored body never holds the camera password. The password is put in only on the way out to a CCTV
target (:class:`Revealer`), so the database, the logs, the SSE feed and the operator page never see it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from sip_refuge.config.model import Camera, Post, Site
from sip_refuge.config.secrets import mask_url
from sip_refuge.errors import RefugeError, SidecarError

CALL_QUEUED = "call.queued"
CALL_ANSWERED = "call.answered"
CALL_ENDED = "call.ended"
CALL_UNANSWERED = "call.unanswered"
POST_OFFLINE = "post.offline"
POST_ONLINE = "post.online"
CAMERA_FAULT = "camera.fault"
CAMERA_OK = "camera.ok"
SELFTEST_FAILED = "selftest.failed"
POST_FAULT = "post.fault"
POST_OK = "post.ok"
INCIDENT_CLOSED = "incident.closed"
PBX_DOWN = "pbx.down"
PBX_UP = "pbx.up"

EVENT_TYPES = (
    CALL_QUEUED, CALL_ANSWERED, CALL_ENDED, CALL_UNANSWERED,
    POST_OFFLINE, POST_ONLINE, CAMERA_FAULT, CAMERA_OK, SELFTEST_FAILED, INCIDENT_CLOSED, PBX_DOWN, PBX_UP,
    POST_FAULT, POST_OK,
)
# A post agent's faults that raise post.fault. The others have events of their own: selftest_failed
# (selftest.failed) and the derived unregistered and unreachable (post.offline, from Asterisk's qualify).
DEVICE_FAULTS = frozenset({"button_stuck", "tamper", "media_stalled", "sip_stack"})


@dataclass(frozen=True)
class Event:
    """One event as stored and sent. ``body`` is the Standard Webhooks payload {type, timestamp, data}."""

    id: str
    type: str
    timestamp: str
    incident: str | None
    post_id: str | None
    body: Mapping[str, Any]

    @property
    def stream(self) -> str:
        """Events of one stream reach each target in order: one incident, or one post's state changes."""
        if self.incident:
            return f"incident:{self.incident}"
        if self.post_id:
            return f"post:{self.post_id}"
        return "site"

    def to_json(self) -> str:
        # Compact and deterministic, so a retry sends (and signs) the very same bytes.
        return json.dumps(self.body, separators=(",", ":"), ensure_ascii=False)


def new_event_id() -> str:
    """A unique id; it is the ``webhook-id`` idempotency key, so it never changes across retries."""
    return "evt_" + uuid.uuid4().hex


def iso_utc(when: datetime) -> str:
    """``2026-11-26T21:04:05.123Z``: UTC with milliseconds, as spec section 6 shows."""
    if when.tzinfo is None:
        raise SidecarError("event timestamps must be timezone-aware")
    when = when.astimezone(UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def camera_url(camera: Camera, *, reveal: bool) -> str:
    """The camera's RTSP URL; with ``reveal`` the user name and password are put into it.

    Without ``reveal`` the user name stays (it helps an operator) and any inline password is masked.
    """
    parts = urlsplit(camera.rtsp_url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal needs its brackets back
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = camera.username if camera.username is not None else parts.username
    password: str | None = parts.password
    if reveal and camera.password is not None:
        try:
            password = camera.password.read()
        except RefugeError:
            password = None  # `config check` reports it; a URL without the password still shows the post
    if user is None:
        return camera.rtsp_url if reveal else mask_url(camera.rtsp_url)
    userinfo = quote(user, safe="")
    if password is not None:
        userinfo += ":" + (quote(password, safe="") if reveal else "***")
    return urlunsplit((parts.scheme, f"{userinfo}@{host}", parts.path, parts.query, parts.fragment))


def _post_data(post: Post) -> dict[str, Any]:
    loc = post.location
    return {"id": post.id, "name": post.name,
            "location": {"address": loc.address, "lat": loc.lat, "lon": loc.lon}}


def build_event(
    type_: str,
    site: Site,
    *,
    post_id: str,
    now: datetime,
    incident: str | None = None,
    reference: str | None = None,
    desk_id: str | None = None,
    snapshot_url: str | None = None,
    reason: str | None = None,
    extra: Mapping[str, Any] | None = None,
    event_id: str | None = None,
) -> Event:
    """Build one event of ``type_`` about ``post_id``; raises SidecarError for an unknown type, post or desk.

    ``reference`` is the incident's short human reference (``KIR-0412``) beside its id. ``reason``
    (camera.fault, selftest.failed, call.unanswered: "overflowed" or "abandoned", incident.closed: the close-out
    reason's id) and ``extra`` are added to ``data`` beside the fields the spec names; receivers ignore what
    they do not know.
    """
    if type_ not in EVENT_TYPES:
        raise SidecarError(f"unknown event type {type_!r} (known: {', '.join(EVENT_TYPES)})")
    try:
        post = site.post(post_id)
        desk = site.desk(desk_id) if desk_id is not None else None
    except RefugeError as exc:
        raise SidecarError(str(exc)) from None
    timestamp = iso_utc(now)
    data: dict[str, Any] = {
        "incident": incident,
        "reference": reference,
        "post": _post_data(post),
        "camera": {"rtsp_url": camera_url(post.camera, reveal=False) if post.camera else None},
        "desk": None if desk is None else {
            "id": desk.id, "name": desk.name, "extension": desk.extension, "workstation": desk.workstation},
        "snapshot_url": snapshot_url,
    }
    if reason is not None:
        data["reason"] = reason
    if extra:
        data.update({k: v for k, v in extra.items() if k not in data})
    body = {"type": type_, "timestamp": timestamp, "data": data}
    return Event(event_id or new_event_id(), type_, timestamp, incident, post.id, body)


def closed_event(site: Site, *, incident: str, reference: str | None, post_id: str, now: datetime,
                 reason: str, label: str, note: str | None, outcome: str | None, closed_by: str | None,
                 desk_id: str | None = None) -> Event:
    """``incident.closed``: an operator closed the incident with a close-out reason (its id in ``reason``, its
    words in ``reason_label``) and an optional note. ``outcome`` is how the call itself ended (ended,
    overflowed, abandoned); ``desk`` the desk that answered it, if one did."""
    return build_event(INCIDENT_CLOSED, site, post_id=post_id, now=now, incident=incident, reference=reference,
                       desk_id=desk_id, reason=reason,
                       extra={"reason_label": label, "note": note, "outcome": outcome, "closed_by": closed_by})


def pbx_event(type_: str, site: Site, *, role: str, host: str, now: datetime, reason: str) -> Event:
    """``pbx.down`` / ``pbx.up``: a PBX of the pair (``role`` primary or secondary, at ``host``) went down or came
    back, as the sidecar sees it through its AMI. About no post: ``post`` is null, the stream is the site's."""
    if type_ not in (PBX_DOWN, PBX_UP):
        raise SidecarError(f"not a PBX event: {type_!r}")
    timestamp = iso_utc(now)
    data: dict[str, Any] = {"incident": None, "reference": None, "post": None, "camera": None, "desk": None,
                            "snapshot_url": None, "site": site.name, "pbx": {"role": role, "host": host},
                            "reason": reason}
    return Event(new_event_id(), type_, timestamp, None, None, {"type": type_, "timestamp": timestamp, "data": data})


def event_from_json(event_id: str, incident: str | None, post_id: str | None, body_json: str) -> Event:
    """Rebuild an event read back from the store."""
    body = json.loads(body_json)
    return Event(event_id, str(body["type"]), str(body["timestamp"]), incident, post_id, body)


class Revealer:
    """Puts the camera password into an event's RTSP URL, for CCTV targets only.

    It reads the site as it is now, so a camera password changed since the event was stored is honoured.
    """

    def __init__(self, site: Site) -> None:
        self._cameras = {p.id: p.camera for p in site.posts if p.camera is not None}

    def __call__(self, event: Event) -> Event:
        camera = self._cameras.get(event.post_id or "")
        data = event.body.get("data")
        if camera is None or not isinstance(data, Mapping):
            return event
        body = dict(event.body)
        body["data"] = {**data, "camera": {**data.get("camera", {}), "rtsp_url": camera_url(camera, reveal=True)}}
        return replace(event, body=body)


def unrevealed(event: Event) -> Event:
    """The identity :class:`Revealer` stand-in, for sites without camera secrets and for tests."""
    return event
