"""The dashboard (``/``) and the operator pop-up page (``/operator?desk=ID``), plus camera images and the
site plan's picture."""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, Response, abort, render_template, request

from sip_refuge.config.files import read_image
from sip_refuge.config.model import Site
from sip_refuge.config.plan import PLAN_IMAGE_MAX
from sip_refuge.errors import RefugeError, SidecarError
from sip_refuge.sidecar import siteplan
from sip_refuge.sidecar.web.context import cameras, hub, stopping
from sip_refuge.sidecar.web.stream import LiveView

log = logging.getLogger(__name__)
bp = Blueprint("pages", __name__)

INCIDENTS_SHOWN = 50  # the dashboard's history; older incidents are in the CSV/JSON export

# Incident timeline steps (store kinds) as the pages show them; their scripts get the same words.
STEP_LABELS = {"pressed": "Button pressed", "queued": "Queued", "desk_rung": "Rang", "answered": "Answered by",
               "ended": "Ended", "unanswered": "Unanswered", "overflowed": "Overflowed",
               "overflow_answered": "Overflow route answered", "requeued": "Back in the queue",
               "acknowledged": "Acknowledged by", "closed": "Closed by"}


def _names(site: Site) -> dict[str, dict[str, str]]:
    """Display names by id: the JSON API and the events name desks, posts and close reasons by id only."""
    return {"desks": {d.id: d.name for d in site.desks}, "posts": {p.id: p.name for p in site.posts},
            "reasons": {r.id: r.label for r in site.close_reasons}, "steps": STEP_LABELS}


def _page(template: str, **context: Any) -> str:
    site = hub().site
    return render_template(template, site=site, names=_names(site), console=True, **context)


@bp.get("/")
def dashboard() -> str:
    views = hub().views
    posts = views.posts()
    return _page("dashboard.html", posts=posts, calls=views.live_calls(), incidents=views.incidents(INCIDENTS_SHOWN),
                 step_labels=STEP_LABELS, plan=siteplan.draw(hub().site),
                 plan_states={p["id"]: (siteplan.state_of(p), siteplan.has_fault(p)) for p in posts},
                 state_words=dict(siteplan.STATES))


@bp.get("/operator")
def operator() -> str:
    desk_id = request.args.get("desk", "")
    try:
        desk = hub().site.desk(desk_id)
    except RefugeError:
        abort(404, description=f"no desk {desk_id!r}")
    return _page("operator.html", desk=desk)


@bp.get("/site/plan")
def plan_image() -> Response:
    """The site plan's picture (``site.plan.image``), read afresh: it may be replaced while the sidecar runs."""
    plan = hub().site.plan
    if plan is None:
        abort(404, description="this site has no plan picture (site.plan)")
    try:
        data, kind = read_image(plan.image, limit=PLAN_IMAGE_MAX, what="the site plan")
    except RefugeError as exc:
        log.warning("cannot serve the site plan: %s", exc)
        abort(404, description="the site plan's picture cannot be read now: the sidecar's log says why")
    reply = Response(data, mimetype=kind, headers={"Cache-Control": "private, no-cache"})
    reply.add_etag()
    reply.make_conditional(request)
    return reply


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
