"""``/healthz`` (JSON) and ``/metrics`` (Prometheus exposition, built in ``web/metrics.py``).

The database is degraded at once when a write fails (a full disk, an I/O error, a damaged page), while
writes wait in memory, and after any write was lost because that memory was full: that stays until the
sidecar is restarted, since a lost event must be looked into (the log names it).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request

from sip_refuge.sidecar.core import Hub
from sip_refuge.sidecar.storefile import CORRUPT
from sip_refuge.sidecar.web import admission
from sip_refuge.sidecar.web.context import cameras, http_status, hub
from sip_refuge.sidecar.web.guard import access, monitoring
from sip_refuge.sidecar.web.metrics import exposition

bp = Blueprint("health", __name__)

FAILING_TARGET = 3  # consecutive failed attempts after which a CCTV target makes /healthz degraded


@bp.get("/healthz")
@monitoring  # from sidecar.monitoring_networks without a login; from elsewhere with one (or the token)
def healthz() -> tuple[Response, int]:
    h = hub()
    status = h.outbox.status()
    targets = [{"name": t.name, "healthy": t.healthy, "pending": t.pending, "last_success": t.last_success,
                "last_error": t.last_error, "last_error_at": t.last_error_at,
                "consecutive_failures": t.consecutive_failures, "in_flight": t.in_flight} for t in status]
    database, _ = _database(h)
    link = h.link.status()
    pbx = _pbx_pair(h)
    http = http_status()
    found = problems(h, http)
    body: dict[str, Any] = {
        "ami": {"connected": link.connected, "since": link.since, "last_error": link.last_error,
                "last_error_at": link.last_error_at, "resynced_at": link.resynced_at},
        "pbx": pbx,
        "database": database,
        "targets": targets,
        "cameras": _camera_summary(cameras()),
        "posts": _post_summary(h),
        "http": http,
        "problems": found,
    }
    ok = not found
    body["status"] = "ok" if ok else "degraded"
    return jsonify(body), 200 if ok else 503


def _pbx_pair(h: Hub) -> dict[str, Any]:
    """Each PBX of a pair, up while the sidecar's AMI link to it is; empty for a site with one PBX (whose
    outage is the ``ami`` problem)."""
    if len(h.links) < 2:
        return {}
    out: dict[str, Any] = {}
    for role, link in h.links.items():
        s = link.status()
        out[role] = {"host": h.site.pbx.host_of(role), "up": s.connected, "since": s.since,
                     "last_error": s.last_error}
    return out


def problems(h: Hub, http: dict[str, Any] | None) -> list[str]:
    """What is wrong with the sidecar itself (AMI, a PBX of the pair, database, CCTV targets, HTTP caps): /healthz is 503 while
    there is any, and the dashboard's ``/api/v1/posts`` carries the same list so the control room sees it."""
    found: list[str] = []
    link = h.link.status()
    if not link.connected:
        found.append("ami: not connected" + (f" ({link.last_error})" if link.last_error else ""))
    found += [f"pbx {role} ({p['host']}): down since {p['since']} (AMI not connected"
              + (f": {p['last_error']})" if p["last_error"] else ")") for role, p in _pbx_pair(h).items()
              if not p["up"]]
    found += _database(h)[1]
    found += [f"target {t.name}: {t.consecutive_failures} failed attempts in a row"
              + (f" ({t.last_error})" if t.last_error else "")
              for t in h.outbox.status() if t.consecutive_failures >= FAILING_TARGET]
    found += admission.problems(http)
    return found


def _post_summary(h: Hub) -> dict[str, Any]:
    """The field's faults at a glance: posts offline, posts reporting device faults, failed self-tests. These
    are the posts' problems, not the sidecar's, so they do not make /healthz 503 (the pages, /metrics and the
    CCTV events carry them to the control room)."""
    posts = h.views.posts()
    return {"count": len(posts),
            "offline": [p["id"] for p in posts if p["online"] is False],
            "faults": {p["id"]: sorted(p["faults"]) for p in posts if p["faults"]},
            "selftest_failed": [p["id"] for p in posts
                                if p["last_self_test"] is not None and p["last_self_test"]["passed"] is False]}


def _database(h: Hub) -> tuple[dict[str, Any], list[str]]:
    """The database's part of /healthz, and its problems."""
    database: dict[str, Any] = {"ok": True}
    try:
        database.update(schema=h.store.schema_version(), journal=h.store.journal_mode())
    except Exception as exc:  # noqa: BLE001 - health must report a broken database, not crash on it
        database.update(ok=False, error=str(exc))
    problems: list[str] = []
    fault = h.store.fault
    if fault is not None:
        database.update(ok=False, error=fault.error, error_kind=fault.kind, error_at=fault.since)
        problems.append(f"database: {fault.error} since {fault.since}" + (
            " (the file is damaged: stop the sidecar and recover it, docs/admin-guide.md)" if fault.kind == CORRUPT
            else ""))
    elif not database["ok"]:
        problems.append(f"database: {database['error']}")
    held = h.outbox.backlog.status()
    database["held"] = {"writes": held.writes, "events": held.events, "bytes": held.bytes,
                        "limit_bytes": held.limit, "since": held.since}
    database["lost"] = {"writes": sum(held.lost.values()), "by_kind": held.lost, "last_at": held.last_lost_at}
    if held.writes:
        database["ok"] = False
        problems.append(f"database: {held.writes} writes ({held.events} events) held in memory since {held.since},"
                        " not yet stored; their events still go to CCTV targets and pages")
    if held.lost:
        database["ok"] = False
        problems.append(f"database: {sum(held.lost.values())} writes LOST since start because the memory for held"
                        f" writes was full (last at {held.last_lost_at}); see the log, then restart the sidecar")
    database["errors"] = h.store.errors
    pruner = h.pruner.status() if h.pruner is not None else None
    database["retention"] = None if pruner is None else {
        "last_run": pruner.last_run, "last_error": pruner.last_error, "pruned": dict(pruner.pruned)}
    return database, problems


def _camera_summary(monitor: Any) -> dict[str, Any] | None:
    """How many cameras the monitor watches and which are in fault; None when camera checks are off."""
    if monitor is None:
        return None
    try:
        states = monitor.states()
    except Exception as exc:  # noqa: BLE001 - health must report, not crash on, a broken monitor
        return {"error": str(exc)}
    faulty = sorted(post for post, state in states.items() if state.ok is False)
    return {"count": len(states), "in_fault": len(faulty), "faulty": faulty,
            "unknown": sum(1 for state in states.values() if state.ok is None)}


@bp.get("/metrics")
@monitoring
def metrics() -> Response:
    body, content_type = exposition(hub(), http_status(), request.headers.get("Accept"), access().audit.counts())
    return Response(body, content_type=content_type)
