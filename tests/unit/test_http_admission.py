"""The HTTP server's caps (sidecar/web/admission.py): connections, request threads and streams, pure."""

from __future__ import annotations

from sip_refuge.config import HttpLimits
from sip_refuge.sidecar.web.admission import Admission, metrics, problems
from tests.support.clock import Clock


def test_connections_are_capped_per_client_and_the_reserve_is_for_posts_and_loopback() -> None:
    gate = Admission(HttpLimits(connections=10, reserve=4, per_client=3), trusted=["10.20.5.0/24"])
    assert [gate.connect("203.0.113.7") for _ in range(3)] == [None, None, None]
    refusal = gate.connect("203.0.113.7")
    assert refusal is not None and refusal.reason == "per_client" and "203.0.113.7" in refusal.detail
    assert gate.connect("203.0.113.8") is None and gate.connect("203.0.113.8") is None
    assert gate.connect("203.0.113.9") is None
    # Six of ten are open: strangers may use no more; the last four are kept for posts and monitoring.
    refusal = gate.connect("203.0.113.10")
    assert refusal is not None and refusal.reason == "connections"
    assert [gate.connect(a) for a in ("10.20.5.11", "10.20.5.12", "127.0.0.1", "::ffff:127.0.0.1")] == [None] * 4
    assert gate.connect("10.20.5.13") is not None  # all ten in use now
    gate.disconnect("203.0.113.7")
    # Nine are open: above the strangers' six, so a stranger waits for more to close; loopback does not.
    assert gate.connect("203.0.113.7") is not None
    assert gate.connect("127.0.0.1") is None  # its third: "::ffff:127.0.0.1" is the same client
    status = gate.status()
    assert status["connections"] | {"open": 10, "busiest_client": 3, "clients": 6} == status["connections"]
    assert status["refused"] == {"connections": 3, "per_client": 1}


def test_only_telemetry_and_health_from_posts_or_loopback_get_the_reserved_threads() -> None:
    gate = Admission(HttpLimits(workers=8), trusted=["10.20.5.0/24"])
    assert gate.worker_reserve == 2
    assert gate.is_priority("POST", "/api/v1/posts/idlewells/telemetry", "10.20.5.11")
    assert gate.is_priority("GET", "/healthz", "127.0.0.1") and gate.is_priority("GET", "/metrics", "::1")
    assert not gate.is_priority("POST", "/api/v1/posts/idlewells/telemetry", "127.0.0.2")  # not loopback's own
    assert not gate.is_priority("GET", "/", "127.0.0.1")
    assert not gate.is_priority("POST", "/api/v1/posts/idlewells/press", "10.20.5.11")
    assert not gate.is_priority("GET", "/api/v1/posts/x/telemetry/../../../healthz", "10.20.5.11")
    assert [gate.take_worker(False) for _ in range(7)] == [True] * 6 + [False]
    assert gate.take_worker(True) and gate.take_worker(True) and not gate.take_worker(True)
    gate.release_worker()
    assert not gate.take_worker(False)  # 7 of 8 busy: the free one is reserved
    assert gate.take_worker(True)


def test_streams_and_live_views_are_capped() -> None:
    gate = Admission(HttpLimits(streams=3, live_views=2))
    assert gate.open_stream("live") is None and gate.open_stream("live") is None
    refusal = gate.open_stream("live")
    assert refusal is not None and refusal.reason == "live_views"
    assert gate.open_stream("events") is None
    refusal = gate.open_stream("events")
    assert refusal is not None and refusal.reason == "streams"
    gate.close_stream("live")
    assert gate.open_stream("events") is None
    assert gate.status()["streams"] | {"events": 2, "live_views": 1} == gate.status()["streams"]


def test_refusals_show_in_health_for_a_minute_and_in_metrics_for_good() -> None:
    clock = Clock()
    gate = Admission(HttpLimits(per_client=1), clock=clock)
    assert problems(gate.status()) == []
    gate.connect("192.0.2.1")
    gate.connect("192.0.2.1")
    gate.rejected("body_too_large")
    gate.timed_out("header")
    found = problems(gate.status())
    assert len(found) == 1 and found[0].startswith("http: 1 connections or requests refused")
    clock.now += 61
    assert problems(gate.status()) == []
    families = {name: samples for name, _, _, samples in metrics(gate.status())}
    assert families["refuge_http_refused_total"] == [({"cap": "per_client"}, 1)]
    assert families["refuge_http_rejected_total"] == [({"reason": "body_too_large"}, 1)]
    assert families["refuge_http_timeouts_total"] == [({"phase": "header"}, 1)]
    assert families["refuge_http_connections"] == [({}, 1)]
    assert metrics(None) == [] and problems(None) == []


def test_a_named_proxy_has_no_per_client_cap_and_never_the_reserve() -> None:
    """sidecar.proxies: the proxy carries many clients (its own limits cap each), and is not the sidecar's host."""
    gate = Admission(HttpLimits(connections=10, reserve=4, per_client=3), proxies=["127.0.0.9/32"])
    assert [gate.connect("127.0.0.9") for _ in range(6)] == [None] * 6  # past per_client: one address, many browsers
    refusal = gate.connect("127.0.0.9")
    assert refusal is not None and refusal.reason == "connections"  # the reserve is not for it
    assert gate.connect("127.0.0.1") is None  # the host's own monitoring still gets in
    assert not gate.is_priority("GET", "/metrics", "127.0.0.9") and gate.is_priority("GET", "/metrics", "127.0.0.1")
    proxied_loopback = Admission(HttpLimits(), proxies=["127.0.0.1/32"])  # a proxy left on 127.0.0.1
    assert not proxied_loopback.is_trusted("127.0.0.1")
