"""The sidecar's Flask app: a small factory and one blueprint per feature (flaskr style).

Nothing is read at import time: the runner builds the hub (store, outbox, AMI, cameras) and hands it in.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from sip_refuge.sidecar.access import Access, AuditLog
from sip_refuge.sidecar.core import Hub

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024  # telemetry reports are a few hundred bytes; anything bigger is a mistake or an attack


def create_app(hub: Hub, *, token: str, cameras: Any = None, stop: threading.Event | None = None,
               http: Callable[[], dict[str, Any]] | None = None, access: Access | None = None,
               test_config: dict[str, Any] | None = None) -> Flask:
    """``http`` reports the HTTP server's caps and refusals for /healthz and /metrics (the runner's server).
    ``access``: operators, sessions, monitoring networks and proxies (:meth:`Access.for_site`); without it
    only ``token`` opens anything but the login page, and /healthz, /metrics from the sidecar's own host."""
    app = Flask(__name__, template_folder="templates", static_folder="static")
    # The sidecar's server refuses a larger body before reading it; this covers any other WSGI server.
    app.config.update(MAX_CONTENT_LENGTH=MAX_BODY, JSON_SORT_KEYS=False)
    if test_config:
        app.config.update(test_config)
    access = access or Access(token, AuditLog(hub.store))
    # ``stop`` ends long-lived responses (event streams, live camera views) when the sidecar stops.
    app.extensions["refuge"] = {"hub": hub, "token": token, "cameras": cameras, "stop": stop or threading.Event(),
                                "http": http, "access": access}

    from sip_refuge.sidecar.web import api, auth, guard, health, pages, proxy, stream

    # Deny unless the view says otherwise: a route added later needs a login without anyone remembering it.
    app.before_request(guard.check_request)
    app.after_request(guard.after_request)
    app.wsgi_app = proxy.ForwardedFrom(app.wsgi_app, access.proxies)  # type: ignore[method-assign]
    app.register_blueprint(auth.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(stream.bp)
    app.register_blueprint(pages.bp)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        return jsonify(error=exc.name, detail=exc.description), exc.code or 500

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> tuple[Response, int]:
        # Never a stack trace to a client: log it here, answer with a plain 500.
        log.exception("unhandled error in the sidecar app")
        return jsonify(error="Internal Server Error", detail="the sidecar logged the details"), 500

    return app
