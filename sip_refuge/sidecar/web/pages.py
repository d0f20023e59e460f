"""The dashboard (``/``) and the operator pop-up page (``/operator?desk=ID``), plus camera images."""

from __future__ import annotations

from flask import Blueprint, Response, abort, render_template, request

from sip_refuge.errors import RefugeError
from sip_refuge.sidecar.web.context import cameras, hub, stopping

bp = Blueprint("pages", __name__)


@bp.get("/")
def dashboard() -> str:
    h = hub()
    return render_template("dashboard.html", site=h.site, posts=h.posts(), calls=h.live_calls(),
                           incidents=h.store.incidents(50))


@bp.get("/operator")
def operator() -> str:
    h = hub()
    desk_id = request.args.get("desk", "")
    try:
        desk = h.site.desk(desk_id)
    except RefugeError:
        abort(404, description=f"no desk {desk_id!r}")
    return render_template("operator.html", site=h.site, desk=desk, calls=h.live_calls())


@bp.get("/cameras/<post_id>/thumbnail.jpg")
def thumbnail(post_id: str) -> Response:
    monitor = cameras()
    image = monitor.thumbnail(post_id) if monitor is not None else None
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
    return Response(monitor.mjpeg(post_id, stopping()), mimetype="multipart/x-mixed-replace; boundary=frame",
                    headers={"Cache-Control": "no-store"})
