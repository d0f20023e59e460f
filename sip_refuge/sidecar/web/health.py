"""``/healthz`` (JSON) and ``/metrics`` (Prometheus text format).

The database is degraded at once when a write fails (a full disk, an I/O error, a damaged page), while
writes wait in memory, and after any write was lost because that memory was full: that stays until the
sidecar is restarted, since a lost event must be looked into (the log names it).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from sip_refuge.sidecar.core import Hub
from sip_refuge.sidecar.store import StoreError
from sip_refuge.sidecar.storefile import CORRUPT
from sip_refuge.sidecar.web import admission
from sip_refuge.sidecar.web.context import cameras, http_status, hub
from sip_refuge.sidecar.web.guard import monitoring

bp = Blueprint("health", __name__)

FAILING_TARGET = 3  # consecutive failed attempts after which a CCTV target makes /healthz degraded
ANSWER_BUCKETS = (5, 10, 15, 20, 30, 45, 60, 120)  # seconds; ASME A17.1 asks for an answer within 30 s


@bp.get("/healthz")
@monitoring  # from sidecar.monitoring_networks without a login; from elsewhere with one (or the token)
def healthz() -> tuple[Response, int]:
    h = hub()
    status = h.outbox.status()
    targets = [{"name": t.name, "healthy": t.healthy, "pending": t.pending, "last_success": t.last_success,
                "last_error": t.last_error, "last_error_at": t.last_error_at,
                "consecutive_failures": t.consecutive_failures} for t in status]
    database, db_problems = _database(h)
    problems: list[str] = []
    if not h.ami_connected:
        problems.append("ami: not connected" + (f" ({h.ami_last_error})" if h.ami_last_error else ""))
    problems += db_problems
    problems += [f"target {t.name}: {t.consecutive_failures} failed attempts in a row"
                 + (f" ({t.last_error})" if t.last_error else "")
                 for t in status if t.consecutive_failures >= FAILING_TARGET]
    http = http_status()
    problems += admission.problems(http)
    body: dict[str, Any] = {
        "ami": {"connected": h.ami_connected, "since": h.ami_last_change, "last_error": h.ami_last_error,
                "last_error_at": h.ami_last_error_at, "resynced_at": h.ami_resynced_at},
        "database": database,
        "targets": targets,
        "cameras": _camera_summary(cameras()),
        "http": http,
        "problems": problems,
    }
    ok = not problems
    body["status"] = "ok" if ok else "degraded"
    return jsonify(body), 200 if ok else 503


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
    h = hub()
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            label = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            lines.append(f"{name}{{{label}}} {value:g}" if label else f"{name} {value:g}")

    try:
        outcomes = h.store.outcome_counts()
        within, total, count = h.store.answer_waits(ANSWER_BUCKETS)
        counts = h.store.delivery_counts()
    except StoreError:
        pass  # the store cannot be read: refuge_store_up says so, the other families still come
    else:
        metric("refuge_calls_total", "counter", "Refuge calls by outcome (queued and answered are still live).",
               [({"outcome": k}, float(v)) for k, v in sorted(outcomes.items())])
        lines.append("# HELP refuge_answer_seconds Time from queued to answered by a desk.")
        lines.append("# TYPE refuge_answer_seconds histogram")
        for bound in ANSWER_BUCKETS:
            lines.append(f'refuge_answer_seconds_bucket{{le="{bound}"}} {within[bound]:g}')
        lines.append(f'refuge_answer_seconds_bucket{{le="+Inf"}} {count:g}')
        lines.append(f"refuge_answer_seconds_sum {total:g}")
        lines.append(f"refuge_answer_seconds_count {count}")
        metric("refuge_deliveries", "gauge", "Stored deliveries by CCTV target and status.",
               [({"target": t, "status": s}, float(n)) for t, by in sorted(counts.items())
                for s, n in sorted(by.items())])
    _store_metrics(h, metric)
    status = h.outbox.status()
    metric("refuge_delivery_attempts_failed_total", "counter", "Failed delivery attempts since start, by target.",
           [({"target": t.name}, float(t.failed)) for t in status])
    metric("refuge_target_up", "gauge", "1 when the target's last delivery attempt succeeded.",
           [({"target": t.name}, 1.0 if t.healthy else 0.0) for t in status])
    posts = h.posts()
    metric("refuge_posts_online", "gauge", "Posts whose SIP contact is reachable.",
           [({}, float(sum(1 for p in posts if p["online"])))])
    metric("refuge_post_up", "gauge", "1 when the post's SIP contact is reachable.",
           [({"post": p["id"]}, 1.0 if p["online"] else 0.0) for p in posts])
    metric("refuge_post_fault", "gauge", "1 for each device fault a post's agent reports (tamper, button_stuck...).",
           [({"post": p["id"], "fault": f}, 1.0) for p in posts for f in sorted(set(p["faults"]))])
    metric("refuge_selftest_ok", "gauge", "1 when the post's last self-test passed, 0 when it failed.",
           [({"post": p["id"]}, 1.0 if p["last_self_test"]["passed"] else 0.0) for p in posts
            if p["last_self_test"] is not None])
    metric("refuge_camera_faults", "gauge", "Cameras currently in fault.",
           [({}, float(sum(1 for p in posts if p["camera"] and p["camera"]["ok"] is False)))])
    metric("refuge_ami_connected", "gauge", "1 while the sidecar is connected to Asterisk's AMI.",
           [({}, 1.0 if h.ami_connected else 0.0)])
    for family in admission.metrics(http_status()):
        metric(*family)
    return Response("\n".join(lines) + "\n", mimetype="text/plain; version=0.0.4")


def _store_metrics(h: Hub, metric: Any) -> None:
    held = h.outbox.backlog.status()
    metric("refuge_store_up", "gauge", "1 while the database takes every write (nothing held in memory).",
           [({}, 0.0 if h.store.fault is not None or held.writes else 1.0)])
    metric("refuge_store_errors_total", "counter", "Failed database operations since start.",
           [({}, float(h.store.errors))])
    metric("refuge_store_held_writes", "gauge", "Writes held in memory because the database could not take them.",
           [({}, float(held.writes))])
    metric("refuge_store_held_bytes", "gauge", "Estimated memory used by the writes held.", [({}, float(held.bytes))])
    metric("refuge_store_lost_writes_total", "counter",
           "Writes lost because the memory for held writes was full, by kind (call or telemetry).",
           [({"kind": k}, float(held.lost.get(k, 0))) for k in ("call", "telemetry")])
    if h.pruner is not None:
        pruned = h.pruner.status().pruned
        metric("refuge_store_pruned_total", "counter", "Rows deleted by retention since start, by table.",
               [({"table": t}, float(pruned.get(t, 0))) for t in ("events", "telemetry", "incidents")])


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
