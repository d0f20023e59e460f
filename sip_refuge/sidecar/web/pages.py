"""The dashboard (``/``) and the operator pop-up page (``/operator?desk=ID``), plus camera images."""

from __future__ import annotations

from flask import Blueprint, Response, abort, render_template, request

from sip_refuge.config.model import Site
from sip_refuge.errors import RefugeError, SidecarError
from sip_refuge.sidecar.web.context import cameras, hub, stopping
from sip_refuge.sidecar.web.stream import LiveView

bp = Blueprint("pages", __name__)

INCIDENTS_SHOWN = 50  # the dashboard's history; older incidents are in the CSV/JSON export

# Incident timeline steps (store kinds) as the dashboard shows them; its script gets the same words.
STEP_LABELS = {"pressed": "Button pressed", "queued": "Queued", "desk_rung": "Rang", "answered": "Answered by",
               "ended": "Ended", "unanswered": "Unanswered", "overflowed": "Overflowed",
               "overflow_answered": "Overflow route answered", "requeued": "Back in the queue",
               "closed": "Closed"}


def _names(site: Site) -> dict[str, dict[str, str]]:
    """Display names by id: the JSON API and the events name desks and posts by id only."""
    return {"desks": {d.id: d.name for d in site.desks}, "posts": {p.id: p.name for p in site.posts}}


@bp.get("/")
def dashboard() -> str:
    h = hub()
    return render_template("dashboard.html", site=h.site, posts=h.views.posts(), calls=h.views.live_calls(),
                           incidents=h.views.incidents(INCIDENTS_SHOWN), names=_names(h.site),
                           step_labels=STEP_LABELS)


@bp.get("/operator")
def operator() -> str:
    h = hub()
    desk_id = request.args.get("desk", "")
    try:
        desk = h.site.desk(desk_id)
    except RefugeError:
        abort(404, description=f"no desk {desk_id!r}")
    return render_template("operator.html", site=h.site, desk=desk, calls=h.views.live_calls(), names=_names(h.site))


@bp.get("/cameras/<post_id>/thumbnail.jpg")
def thumbnail(post_id: str) -> Response:
    monitor = cameras()
    try:
        image = monitor.thumbnail(post_id) if monitor is not None else None
    except SidecarError:  # CameraError (no camera on this post); cameras.py needs OpenCV, so not imported here
        image = None
    if image is None:
        abort(404, description="no picture from this camera yet")
    return Response(image, mimetype="image/jpeg", headers={"Cache-Control": "no-store"})


@bp.get("/cameras/<post_id>/live.mjpeg")
def live(post_id: str) -> Response:
    monitor = cameras()
    if monitor is None:
        abort(404, description="camera checks are off")
    try:
        hub().site.post(post_id)
    except RefugeError:
        abort(404, description=f"no post {post_id!r}")
    try:
        parts = monitor.mjpeg(post_id, stopping())
    except SidecarError:  # CameraError (no camera on this post); cameras.py needs OpenCV, so not imported here
        abort(404, description=f"post {post_id!r} has no camera")
    # The sidecar's server runs the view in its loop from the camera's shared feed; ``parts`` is the fallback.
    return Response(LiveView(parts, lambda: monitor.feed(post_id)), direct_passthrough=True,
                    mimetype="multipart/x-mixed-replace; boundary=frame", headers={"Cache-Control": "no-store"})
