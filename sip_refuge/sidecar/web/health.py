"""``/healthz`` (JSON) and ``/metrics`` (Prometheus text format)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from sip_refuge.sidecar.web.context import hub

bp = Blueprint("health", __name__)

ANSWER_BUCKETS = (5, 10, 15, 20, 30, 45, 60, 120)  # seconds; ASME A17.1 asks for an answer within 30 s


@bp.get("/healthz")
def healthz() -> tuple[Response, int]:
    h = hub()
    targets = [{"name": t.name, "healthy": t.healthy, "pending": t.pending, "last_success": t.last_success,
                "last_error": t.last_error, "last_error_at": t.last_error_at} for t in h.outbox.status()]
    try:
        database = {"ok": True, "schema": h.store.schema_version(), "journal": h.store.journal_mode()}
    except Exception as exc:  # noqa: BLE001 - health must report a broken database, not crash on it
        database = {"ok": False, "error": str(exc)}
    body: dict[str, Any] = {
        "ami": {"connected": h.ami_connected, "since": h.ami_last_change},
        "database": database,
        "targets": targets,
    }
    ok = h.ami_connected and bool(database["ok"])
    body["status"] = "ok" if ok else "degraded"
    return jsonify(body), 200 if ok else 503


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

    incidents = h.store.incidents(limit=None)
    outcomes: dict[str, int] = {}
    waits: list[float] = []
    for inc in incidents:
        outcomes[inc.outcome or inc.state] = outcomes.get(inc.outcome or inc.state, 0) + 1
        wait = next((t.detail.get("wait_seconds") for t in inc.timeline if t.kind == "answered"), None)
        if isinstance(wait, int | float):
            waits.append(float(wait))
    metric("refuge_calls_total", "counter", "Refuge calls by outcome (queued and answered are still live).",
           [({"outcome": k}, v) for k, v in sorted(outcomes.items())])
    buckets = [({"le": str(b)}, float(sum(1 for w in waits if w <= b))) for b in ANSWER_BUCKETS]
    buckets.append(({"le": "+Inf"}, float(len(waits))))
    lines.append("# HELP refuge_answer_seconds Time from queued to answered by a desk.")
    lines.append("# TYPE refuge_answer_seconds histogram")
    for labels, value in buckets:
        lines.append(f'refuge_answer_seconds_bucket{{le="{labels["le"]}"}} {value:g}')
    lines.append(f"refuge_answer_seconds_sum {sum(waits):g}")
    lines.append(f"refuge_answer_seconds_count {len(waits)}")
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
    metric("refuge_camera_faults", "gauge", "Cameras currently in fault.",
           [({}, float(sum(1 for p in posts if p["camera"] and p["camera"]["ok"] is False)))])
    metric("refuge_ami_connected", "gauge", "1 while the sidecar is connected to Asterisk's AMI.",
           [({}, 1.0 if h.ami_connected else 0.0)])
    return Response("\n".join(lines) + "\n", mimetype="text/plain; version=0.0.4")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
