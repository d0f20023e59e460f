"""Who may hold what on the sidecar's HTTP server: connections, request threads and long-lived streams.

A street post's network is not trusted, and anyone who reaches the sidecar can open connections. These caps
keep one client, or many, from taking everything (``sidecar.limits`` in the site file):

- connections in all and per client address; the last ``reserve`` of them only posts' networks
  (``pbx.networks.posts``) and loopback (monitoring on the sidecar's host) may use;
- request threads for the Flask app; a quarter of them only telemetry writes and health checks from those
  networks may use, so a flood of page loads cannot delay a post's report;
- event streams and live camera views.

Every refusal is counted by reason for ``/healthz`` and ``/metrics``. This is bookkeeping only: the server's
event loop calls it from its one thread, and :meth:`Admission.status` is safe from any thread.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sip_refuge.config.model import HttpLimits

log = logging.getLogger(__name__)

MONITORING = ("127.0.0.1/32", "::1/128")  # the sidecar's own host: health checks and metrics scrapers
RECENT = 60.0  # seconds: refusals this recent make /healthz degraded
_PRIORITY_POST = re.compile(r"/api/v1/posts/[^/]+/telemetry")
_PRIORITY_GET = ("/healthz", "/metrics")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Refusal:
    """Why a connection or request was refused (``reason`` names the cap); ``detail`` is for the 503 body."""

    reason: str  # connections | per_client | workers | streams | live_views
    detail: str


class Admission:
    def __init__(self, limits: HttpLimits, trusted: Iterable[str] = (),
                 clock: Callable[[], float] = time.monotonic, proxies: Iterable[str] = ()) -> None:
        """``proxies`` (``sidecar.proxies``): each carries many clients, so no per-client cap applies to it,
        and it is never trusted with the reserve, even on loopback (the proxy's own limits apply)."""
        self.limits = limits
        self.worker_reserve = max(1, limits.workers // 4)
        self.trusted = tuple(ipaddress.ip_network(n, strict=False) for n in (*MONITORING, *trusted))
        self.proxies = tuple(ipaddress.ip_network(n, strict=False) for n in proxies)
        self.clock = clock
        self._lock = threading.Lock()
        self._per_client: Counter[str] = Counter()
        self._open = self._busy = 0
        self._streams: Counter[str] = Counter()  # events | live
        self._refused: Counter[str] = Counter()
        self._rejected: Counter[str] = Counter()  # 400, 413, 431 answers by reason
        self._timeouts: Counter[str] = Counter()  # header | body | idle | write
        self._recent: deque[float] = deque(maxlen=10_000)
        self._unlogged: Counter[str] = Counter()
        self._logged_at = -RECENT

    # -- classifying ---------------------------------------------------------------------------------------
    def is_trusted(self, address: str) -> bool:
        ip = _ip(address)
        return ip is not None and any(ip in net for net in self.trusted) and not self.is_proxy(address)

    def is_proxy(self, address: str) -> bool:
        ip = _ip(address)
        return ip is not None and any(ip in net for net in self.proxies)

    def is_priority(self, method: str, path: str, address: str) -> bool:
        """A post's telemetry write or a health check, from a posts' network or loopback."""
        wanted = (method == "POST" and _PRIORITY_POST.fullmatch(path) is not None) or \
            (method in ("GET", "HEAD") and path in _PRIORITY_GET)
        return wanted and self.is_trusted(address)

    # -- connections ---------------------------------------------------------------------------------------
    def connect(self, address: str) -> Refusal | None:
        """Admit a new connection from ``address`` (then :meth:`disconnect` it), or say why not."""
        limits, address = self.limits, _client(address)
        with self._lock:
            if self._per_client[address] >= limits.per_client and not self.is_proxy(address):
                refusal = Refusal("per_client", f"too many connections from {address} (at most "
                                  f"{limits.per_client})")
            elif self._open >= limits.connections - (0 if self.is_trusted(address) else limits.reserve):
                refusal = Refusal("connections", f"too many connections (at most {limits.connections})")
            else:
                self._per_client[address] += 1
                self._open += 1
                return None
        self.refused(refusal.reason)
        return refusal

    def disconnect(self, address: str) -> None:
        address = _client(address)
        with self._lock:
            self._open -= 1
            self._per_client[address] -= 1
            if self._per_client[address] <= 0:
                del self._per_client[address]

    # -- request threads -----------------------------------------------------------------------------------
    def take_worker(self, priority: bool) -> bool:
        """A request thread for one request, if one is free for its kind (then :meth:`release_worker`)."""
        with self._lock:
            if self._busy >= self.limits.workers - (0 if priority else self.worker_reserve):
                return False
            self._busy += 1
            return True

    def release_worker(self) -> None:
        with self._lock:
            self._busy -= 1

    # -- streams ---------------------------------------------------------------------------------------------
    def open_stream(self, kind: str) -> Refusal | None:
        """Admit an event stream (``events``) or a live view (``live``); then :meth:`close_stream` it."""
        limits = self.limits
        with self._lock:
            if sum(self._streams.values()) >= limits.streams:
                refusal = Refusal("streams", f"too many open streams (at most {limits.streams})")
            elif kind == "live" and self._streams["live"] >= limits.live_views:
                refusal = Refusal("live_views", f"too many live views (at most {limits.live_views})")
            else:
                self._streams[kind] += 1
                return None
        self.refused(refusal.reason)
        return refusal

    def close_stream(self, kind: str) -> None:
        with self._lock:
            self._streams[kind] -= 1

    # -- counting --------------------------------------------------------------------------------------------
    def refused(self, reason: str) -> None:
        """A 503 at a cap (connection and stream refusals count themselves). Logged at most once a minute:
        a flood of refusals must not become a flood of log lines."""
        now = self.clock()
        with self._lock:
            self._refused[reason] += 1
            self._recent.append(now)
            self._unlogged[reason] += 1
            if now - self._logged_at < RECENT:
                return
            self._logged_at, unlogged = now, dict(self._unlogged)
            self._unlogged.clear()
        log.warning("HTTP: refused at a cap (503): %s", ", ".join(f"{k} {v}" for k, v in sorted(unlogged.items())))

    def rejected(self, reason: str) -> None:
        """A request answered 400, 413 or 431 by the server itself (``reason`` says which limit)."""
        with self._lock:
            self._rejected[reason] += 1

    def timed_out(self, phase: str) -> None:
        """A connection closed at a deadline: ``header``, ``body``, ``idle`` or ``write``."""
        with self._lock:
            self._timeouts[phase] += 1

    def status(self) -> dict[str, Any]:
        """The caps, what is in use, and every refusal so far (JSON for /healthz)."""
        limits = self.limits
        with self._lock:
            since = self.clock() - RECENT
            while self._recent and self._recent[0] < since:
                self._recent.popleft()
            return {
                "connections": {"open": self._open, "limit": limits.connections, "reserve": limits.reserve,
                                "per_client": limits.per_client, "clients": len(self._per_client),
                                "busiest_client": max(self._per_client.values(), default=0)},
                "workers": {"busy": self._busy, "limit": limits.workers, "reserve": self.worker_reserve},
                "streams": {"events": self._streams["events"], "live_views": self._streams["live"],
                            "limit": limits.streams, "live_views_limit": limits.live_views},
                "deadlines": {"header_timeout": limits.header_timeout, "idle_timeout": limits.idle_timeout},
                "refused": dict(sorted(self._refused.items())),
                "refused_last_minute": len(self._recent),
                "rejected": dict(sorted(self._rejected.items())),
                "timeouts": dict(sorted(self._timeouts.items())),
            }


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # a dual-stack socket's view of an IPv4 client
    return ip


def _client(address: str) -> str:
    """One name per client address, however the socket spells it."""
    ip = _ip(address)
    return str(ip) if ip is not None else address


def problems(status: dict[str, Any] | None) -> list[str]:
    """``/healthz`` problems from :meth:`Admission.status`: someone was turned away at a cap just now."""
    if not status or not status["refused_last_minute"]:
        return []
    return [f"http: {status['refused_last_minute']} connections or requests refused at a cap in the last "
            f"minute (so far: {', '.join(f'{k} {v}' for k, v in status['refused'].items())})"]


Samples = list[tuple[dict[str, str], float]]


def metrics(status: dict[str, Any] | None) -> list[tuple[str, str, str, Samples]]:
    """``/metrics`` families (name, type, help, samples) from :meth:`Admission.status`."""
    if not status:
        return []
    conns, workers, streams = status["connections"], status["workers"], status["streams"]
    return [
        ("refuge_http_connections", "gauge", "Open HTTP connections.", [({}, conns["open"])]),
        ("refuge_http_connections_limit", "gauge", "The cap on open HTTP connections.", [({}, conns["limit"])]),
        ("refuge_http_workers_busy", "gauge", "Request threads running the app now.", [({}, workers["busy"])]),
        ("refuge_http_workers_limit", "gauge", "Request threads for the app.", [({}, workers["limit"])]),
        ("refuge_http_streams", "gauge", "Open event streams and live camera views.",
         [({"kind": "events"}, streams["events"]), ({"kind": "live_view"}, streams["live_views"])]),
        ("refuge_http_streams_limit", "gauge", "The cap on open streams, in all and for live views.",
         [({"kind": "all"}, streams["limit"]), ({"kind": "live_view"}, streams["live_views_limit"])]),
        ("refuge_http_refused_total", "counter", "Connections and requests refused with 503 at a cap, by cap.",
         [({"cap": k}, v) for k, v in status["refused"].items()]),
        ("refuge_http_rejected_total", "counter", "Requests the server answered 400, 413 or 431, by reason.",
         [({"reason": k}, v) for k, v in status["rejected"].items()]),
        ("refuge_http_timeouts_total", "counter", "Connections closed at a deadline, by phase.",
         [({"phase": k}, v) for k, v in status["timeouts"].items()]),
    ]
