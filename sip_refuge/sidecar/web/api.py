"""The JSON API (spec section 5): posts, incidents, snapshots, acknowledgement, close-out and post telemetry."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, abort, jsonify, request

from sip_refuge.config.secrets import snapshot_key
from sip_refuge.control import ask, control_port
from sip_refuge.errors import RefugeError
from sip_refuge.sidecar.alarm import AcknowledgeRefused
from sip_refuge.sidecar.closeout import CloseRefused
from sip_refuge.sidecar.store import StoreError
from sip_refuge.sidecar.web.context import http_status, hub, require_post_token
from sip_refuge.sidecar.web.guard import readable_with_key, require_operator_write, who
from sip_refuge.sidecar.web.health import problems
from sip_refuge.telemetry import Telemetry, TelemetryError

bp = Blueprint("api", __name__, url_prefix="/api/v1")

SNAPSHOT_WAIT = 10.0  # seconds: the snapshot of a just-queued call needs the camera's next key frame


def _post_or_404(post_id: str) -> dict[str, Any]:
    try:
        return hub().views.post(post_id)
    except RefugeError:
        abort(404, description=f"no post {post_id!r}")


@bp.get("/posts")
def posts() -> Response:
    """Every post, every live call (longest waiting first, with its times), ``now``, and the sidecar's own
    ``problems`` (those of /healthz: AMI, database, CCTV targets), which the pages show above the posts."""
    h = hub()
    return jsonify({**h.views.overview(), "problems": problems(h, http_status())})


@bp.get("/posts/<post_id>")
def post(post_id: str) -> Response:
    return jsonify(_post_or_404(post_id))


@bp.get("/incidents")
def incidents() -> Response:
    limit = request.args.get("limit", "100")
    if not (limit.isascii() and limit.isdigit()) or not 1 <= int(limit) <= 10000:  # "²".isdigit() is True
        abort(400, description="limit must be a whole number from 1 to 10000")
    views = hub().views
    if request.args.get("format") == "csv":
        return Response(views.export_csv(int(limit)), mimetype="text/csv",
                        headers={"Content-Disposition": "attachment; filename=incidents.csv"})
    post_id = request.args.get("post")
    return jsonify(incidents=[i.to_dict() for i in views.incidents(int(limit), post_id)])


@bp.get("/incidents/<incident_id>")
def incident(incident_id: str) -> Response:
    found = hub().views.incident(incident_id)
    if found is None:
        abort(404, description=f"no incident {incident_id!r}")
    return jsonify(found.to_dict())


def _snapshot_key(incident_id: str) -> str:
    """The key of the events' ``snapshot_url`` (:func:`sip_refuge.config.secrets.incident_snapshot_url`)."""
    site = hub().site
    try:
        token = site.sidecar.token.read() if site.sidecar is not None else ""
    except RefugeError:
        return ""
    return snapshot_key(token, incident_id) if token else ""


@bp.get("/incidents/<incident_id>/snapshot.jpg")
@readable_with_key(_snapshot_key)
def snapshot(incident_id: str) -> Response:
    image = hub().views.snapshot(incident_id, wait=SNAPSHOT_WAIT)
    if image is None:
        abort(404, description="no snapshot for this incident")
    return Response(image, mimetype="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


@bp.get("/close-reasons")
def close_reasons() -> Response:
    """The reasons an operator may close an incident with (``sidecar.close_reasons``)."""
    return jsonify(reasons=hub().views.close_reasons())


@bp.post("/incidents/<incident_id>/close")
@require_operator_write("incident.close")
def close(incident_id: str) -> tuple[Response, int]:
    """Close an ended incident with ``{"reason": ID, "note": TEXT}``: 200 with the incident; 404 (no such
    incident), 409 (closed already, or its caller is still connected), 422 (a bad reason or note)."""
    body = _json_body()
    try:
        closed = hub().recorder.close_incident(incident_id, body, by=_by())
    except CloseRefused as exc:
        abort(exc.status, description=str(exc))
    except StoreError as exc:
        abort(503, description=f"the incident log cannot be read now ({exc}); try again")
    return jsonify(closed.to_dict()), 200


@bp.post("/incidents/<incident_id>/acknowledge")
@require_operator_write("incident.acknowledge")
def acknowledge(incident_id: str) -> tuple[Response, int]:
    """Silence the alarm of a call no desk answered, on every open page: empty, or ``{"desk": ID}`` (the
    console's desk). 200 with who and when; 404 (no such incident), 409 (answered, acknowledged already, or
    closed), 422 (a bad body)."""
    body = _json_body(optional=True)
    try:
        done = hub().recorder.acknowledge_incident(incident_id, body, by=_by())
    except AcknowledgeRefused as exc:
        abort(exc.status, description=str(exc))
    except StoreError as exc:
        abort(503, description=f"the incident log cannot be read now ({exc}); try again")
    return jsonify(done), 200


def _json_body(*, optional: bool = False) -> object:
    """The request's JSON body (None for an empty one when ``optional``); 400 when it is not JSON."""
    if optional and not request.get_data(cache=True):
        return None
    if not request.is_json:
        abort(400, description="body: must be JSON (Content-Type: application/json)" + (", or empty" if optional else ""))
    body = request.get_json(silent=True)
    if body is None:
        abort(400, description="body: not valid JSON")
    return body


def _by() -> str:
    """Who writes: the operator whose session made the request, else the admin token."""
    person = who()
    return person.name if person is not None and person.via == "session" else "admin-token"


@bp.post("/posts/<post_id>/telemetry")
@require_post_token
def telemetry(post_id: str) -> tuple[Response, int]:
    _post_or_404(post_id)
    if not request.is_json:
        abort(400, description="body: must be JSON (Content-Type: application/json)")
    try:
        message = Telemetry.from_json(request.get_data(cache=False))
    except TelemetryError as exc:
        abort(exc.status, description=str(exc))
    if message.post != post_id:
        abort(422, description=f"post: {message.post!r} is not the post this URL is for ({post_id!r})")
    hub().recorder.on_telemetry(post_id, message)
    return jsonify(accepted=True), 202


@bp.post("/posts/<post_id>/press")
@require_operator_write("press")
def press(post_id: str) -> tuple[Response, int]:
    """Press a mock-GPIO post's button through its agent's control socket (demo and acceptance runs).

    Only an agent on this host can be reached, and a real-GPIO agent refuses: on a real post the
    button is the only way to raise an alarm.
    """
    _post_or_404(post_id)
    site = hub().site
    try:
        reply = ask(control_port(site, site.post(post_id)), {"cmd": "press"}, timeout=3)
    except RefugeError as exc:
        abort(503, description=str(exc))
    if not reply.get("ok"):
        abort(409, description=str(reply.get("error") or "the post agent refused"))
    return jsonify(pressed=post_id), 202
