"""``/metrics``: the sidecar's figures in Prometheus' exposition format, made by ``prometheus_client``.

One custom collector reads everything at scrape time (SQL aggregates from the store, the outbox's and the
HTTP server's counters, the live state), so nothing is counted twice and a restarted sidecar reports what
the database holds. Each scrape gets a fresh registry: the collector reads the hub it is given.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry

from sip_refuge.sidecar.store import StoreError
from sip_refuge.sidecar.web import admission

if TYPE_CHECKING:
    from sip_refuge.sidecar.core import Hub

ANSWER_BUCKETS = (5, 10, 15, 20, 30, 45, 60, 120)  # seconds; ASME A17.1 asks for an answer within 30 s


def _family(kind: str, name: str, help_text: str, labels: list[str]) -> GaugeMetricFamily | CounterMetricFamily:
    if kind == "counter":
        return CounterMetricFamily(name, help_text, labels=labels)
    return GaugeMetricFamily(name, help_text, labels=labels)


def family(kind: str, name: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> Metric:
    """A gauge or counter family from ``({label: value}, number)`` samples (label names from the first)."""
    names = list(samples[0][0]) if samples else []
    metric = _family(kind, name, help_text, names)
    for labels, value in samples:
        metric.add_metric([labels[n] for n in names], float(value))
    return metric


class SidecarCollector(Collector):
    def __init__(self, hub: Hub, http: dict[str, Any] | None,
                 audit: dict[tuple[str, str], int] | None = None) -> None:
        self.hub, self.http, self.audit = hub, http, audit

    def collect(self) -> Iterator[Metric]:
        h = self.hub
        yield from self._store_aggregates()
        yield from self._store_health()
        status = h.outbox.status()
        yield family("counter", "refuge_delivery_attempts_failed_total",
                     "Failed delivery attempts since start, by target.", [({"target": t.name}, t.failed) for t in status])
        yield family("gauge", "refuge_target_up", "1 when the target's last delivery attempt succeeded.",
                     [({"target": t.name}, 1 if t.healthy else 0) for t in status])
        yield family("gauge", "refuge_target_in_flight", "Deliveries on the wire to the target now (at most its concurrency).",
                     [({"target": t.name}, t.in_flight) for t in status])
        posts = h.views.posts()
        yield family("gauge", "refuge_posts_online", "Posts whose SIP contact is reachable.",
                     [({}, sum(1 for p in posts if p["online"]))])
        yield family("gauge", "refuge_post_up", "1 when the post's SIP contact is reachable.",
                     [({"post": p["id"]}, 1 if p["online"] else 0) for p in posts])
        yield family("gauge", "refuge_post_fault",
                     "1 for each device fault a post's agent reports (tamper, button_stuck...).",
                     [({"post": p["id"], "fault": f}, 1) for p in posts for f in sorted(set(p["faults"]))])
        yield family("gauge", "refuge_selftest_ok", "1 when the post's last self-test passed, 0 when it failed.",
                     [({"post": p["id"]}, 1 if p["last_self_test"]["passed"] else 0) for p in posts
                      if p["last_self_test"] is not None])
        yield family("gauge", "refuge_camera_faults", "Cameras currently in fault.",
                     [({}, sum(1 for p in posts if p["camera"] and p["camera"]["ok"] is False))])
        calls = h.views.live_calls()
        yield family("gauge", "refuge_calls_live", "Calls whose caller is connected now, by state.",
                     [({"state": s}, sum(1 for c in calls if c["state"] == s))
                      for s in ("queued", "answered", "overflowed")])
        yield family("gauge", "refuge_ami_connected", "1 while the sidecar is connected to Asterisk's AMI.",
                     [({}, 1 if h.link.connected else 0)])
        if len(h.links) > 1:
            yield family("gauge", "refuge_pbx_up", "1 while the sidecar's AMI link to this PBX of the pair is up.",
                         [({"pbx": role, "host": h.site.pbx.host_of(role)}, 1 if link.connected else 0)
                          for role, link in h.links.items()])
        for name, kind, help_text, samples in admission.metrics(self.http):
            yield family(kind, name, help_text, samples)
        if self.audit is not None:  # logins (ok, failed, throttled), logouts, operators' writes by outcome
            yield family("counter", "refuge_audit_entries_total", "Audit log entries since start, by action and outcome.",
                         [({"action": a, "outcome": o}, n) for (a, o), n in sorted(self.audit.items())])

    def _store_aggregates(self) -> Iterator[Metric]:
        h = self.hub
        try:
            outcomes = h.store.outcome_counts()
            within, total, count = h.store.answer_waits(ANSWER_BUCKETS)
            counts = h.store.delivery_counts()
            closed = h.store.close_counts()
        except StoreError:
            return  # the store cannot be read: refuge_store_up says so, the other families still come
        yield family("counter", "refuge_calls_total",
                     "Refuge calls by outcome (queued, answered and overflowed may still be live).",
                     [({"outcome": k}, v) for k, v in sorted(outcomes.items())])
        reasons = [r.id for r in h.site.close_reasons]
        reasons += sorted(set(closed) - set(reasons))  # closed with a reason the site has since dropped
        yield family("counter", "refuge_incidents_closed_total", "Incidents closed by an operator, by reason.",
                     [({"reason": r}, closed.get(r, 0)) for r in reasons])
        yield HistogramMetricFamily("refuge_answer_seconds", "Time from queued to answered by a desk.",
                                    buckets=[*((str(b), float(within[b])) for b in ANSWER_BUCKETS),
                                             ("+Inf", float(count))], sum_value=total)
        yield family("gauge", "refuge_deliveries", "Stored deliveries by CCTV target and status.",
                     [({"target": t, "status": s}, n) for t, by in sorted(counts.items())
                      for s, n in sorted(by.items())])

    def _store_health(self) -> Iterator[Metric]:
        h = self.hub
        held = h.outbox.backlog.status()
        yield family("gauge", "refuge_store_up", "1 while the database takes every write (nothing held in memory).",
                     [({}, 0 if h.store.fault is not None or held.writes else 1)])
        yield family("counter", "refuge_store_errors_total", "Failed database operations since start.",
                     [({}, h.store.errors)])
        yield family("gauge", "refuge_store_held_writes",
                     "Writes held in memory because the database could not take them.", [({}, held.writes)])
        yield family("gauge", "refuge_store_held_bytes", "Estimated memory used by the writes held.",
                     [({}, held.bytes)])
        yield family("counter", "refuge_store_lost_writes_total",
                     "Writes lost because the memory for held writes was full, by kind (call or telemetry).",
                     [({"kind": k}, held.lost.get(k, 0)) for k in ("call", "telemetry")])
        if h.pruner is not None:
            pruned = h.pruner.status().pruned
            yield family("counter", "refuge_store_pruned_total", "Rows deleted by retention since start, by table.",
                         [({"table": t}, pruned.get(t, 0)) for t in ("events", "telemetry", "incidents", "audit")])


def exposition(hub: Hub, http: dict[str, Any] | None, accept: str | None,
               audit: dict[tuple[str, str], int] | None = None) -> tuple[bytes, str]:
    """The scrape's body and content type (Prometheus text, or OpenMetrics when the scraper asks for it)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SidecarCollector(hub, http, audit))
    encode, content_type = choose_encoder(accept or "")
    return encode(registry), content_type
