"""``/healthz`` (JSON) and ``/metrics`` (Prometheus text format)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from sip_refuge.sidecar.web import admission
from sip_refuge.sidecar.web.context import cameras, http_status, hub

bp = Blueprint("health", __name__)

FAILING_TARGET = 3  # consecutive failed attempts after which a CCTV target makes /healthz degraded
ANSWER_BUCKETS = (5, 10, 15, 20, 30, 45, 60, 120)  # seconds; ASME A17.1 asks for an answer within 30 s


@bp.get("/healthz")
def healthz() -> tuple[Response, int]:
    h = hub()
    status = h.outbox.status()
    targets = [{"name": t.name, "healthy": t.healthy, "pending": t.pending, "last_success": t.last_success,
                "last_error": t.last_error, "last_error_at": t.last_error_at,
                "consecutive_failures": t.consecutive_failures} for t in status]
    try:
        database = {"ok": True, "schema": h.store.schema_version(), "journal": h.store.journal_mode()}
    except Exception as exc:  # noqa: BLE001 - health must report a broken database, not crash on it
        database = {"ok": False, "error": str(exc)}
    problems: list[str] = []
    if not h.ami_connected:
        problems.append("ami: not connected" + (f" ({h.ami_last_error})" if h.ami_last_error else ""))
    if not database["ok"]:
        problems.append(f"database: {database['error']}")
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
def metrics() -> Response:
    h = hub()
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            label = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            lines.append(f"{name}{{{label}}} {value:g}" if label else f"{name} {value:g}")

    outcomes = h.store.outcome_counts()
    metric("refuge_calls_total", "counter", "Refuge calls by outcome (queued and answered are still live).",
           [({"outcome": k}, float(v)) for k, v in sorted(outcomes.items())])
    within, total, count = h.store.answer_waits(ANSWER_BUCKETS)
    lines.append("# HELP refuge_answer_seconds Time from queued to answered by a desk.")
    lines.append("# TYPE refuge_answer_seconds histogram")
    for bound in ANSWER_BUCKETS:
        lines.append(f'refuge_answer_seconds_bucket{{le="{bound}"}} {within[bound]:g}')
    lines.append(f'refuge_answer_seconds_bucket{{le="+Inf"}} {count:g}')
    lines.append(f"refuge_answer_seconds_sum {total:g}")
    lines.append(f"refuge_answer_seconds_count {count}")
    counts = h.store.delivery_counts()
    metric("refuge_deliveries", "gauge", "Stored deliveries by CCTV target and status.",
           [({"target": t, "status": s}, float(n)) for t, by in sorted(counts.items()) for s, n in sorted(by.items())])
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
           [({"post": p["id"], "fault": f}, 1.0) for p in posts for f in _faults(p["faults"])])
    metric("refuge_selftest_ok", "gauge", "1 when the post's last self-test passed, 0 when it failed.",
           [({"post": p["id"]}, 1.0 if passed else 0.0) for p in posts
            if (passed := _selftest_passed(p["last_self_test"])) is not None])
    metric("refuge_camera_faults", "gauge", "Cameras currently in fault.",
           [({}, float(sum(1 for p in posts if p["camera"] and p["camera"]["ok"] is False)))])
    metric("refuge_ami_connected", "gauge", "1 while the sidecar is connected to Asterisk's AMI.",
           [({}, 1.0 if h.ami_connected else 0.0)])
    for family in admission.metrics(http_status()):
        metric(*family)
    return Response("\n".join(lines) + "\n", mimetype="text/plain; version=0.0.4")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _faults(value: object) -> list[str]:
    """The distinct fault names of a post's telemetry (which is only what its agent sent: check it)."""
    if not isinstance(value, list | tuple):
        return []
    return sorted({str(f) for f in value if isinstance(f, str) and f})


def _selftest_passed(value: object) -> bool | None:
    if isinstance(value, dict) and isinstance(value.get("passed"), bool):
        return bool(value["passed"])
    return None
