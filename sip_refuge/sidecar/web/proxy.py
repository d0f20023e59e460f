"""The client's real address and scheme behind a reverse proxy the site names (``sidecar.proxies``).

Behind a proxy every connection comes from the proxy. For a request from one of ``sidecar.proxies`` this
takes the client's address from the last entry of ``X-Forwarded-For`` (the one the proxy itself added) and
the scheme from ``X-Forwarded-Proto`` (so session cookies are marked Secure behind TLS). From anyone else
those headers are ignored, since anyone can send them, and the request is marked as forwarded: a request
that came through an unnamed proxy must never pass for a monitoring client on loopback.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from sip_refuge.sidecar.access import Network, in_networks
from sip_refuge.sidecar.web.wsgi import WsgiApp

FORWARDED = "refuge.forwarded"  # environ key: True when forwarding headers came from a client not trusted
PROXY = "refuge.proxy"  # environ key: the proxy's address, when the request came through a trusted one
_HEADERS = ("HTTP_X_FORWARDED_FOR", "HTTP_X_FORWARDED_PROTO", "HTTP_FORWARDED", "HTTP_X_REAL_IP")


class ForwardedFrom:
    def __init__(self, app: WsgiApp, proxies: tuple[Network, ...]) -> None:
        self.app, self.proxies = app, proxies

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        peer = str(environ.get("REMOTE_ADDR", ""))
        if self.proxies and in_networks(peer, self.proxies):
            client = _last(environ.get("HTTP_X_FORWARDED_FOR", ""))
            try:
                environ["REMOTE_ADDR"] = str(ipaddress.ip_address(client))
            except ValueError:
                environ[FORWARDED] = True  # a proxy that names no client: treat it as a stranger
            proto = _last(environ.get("HTTP_X_FORWARDED_PROTO", "")).lower()
            if proto in ("http", "https"):
                environ["wsgi.url_scheme"] = proto
            environ[PROXY] = peer
        elif any(environ.get(h) for h in _HEADERS):
            environ[FORWARDED] = True
        return self.app(environ, start_response)


def _last(value: str) -> str:
    return value.rsplit(",", 1)[-1].strip()
