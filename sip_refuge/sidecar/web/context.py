"""Access to the hub and settings from inside a request, and the bearer-token checks.

Who may call which view is decided before it runs (:mod:`.guard`); these two mark a view for it and check
their token themselves too, so they hold under any app that forgot the guard.
"""

from __future__ import annotations

import hmac
import threading
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar, cast

from flask import abort, current_app, request

from sip_refuge.config.secrets import telemetry_token
from sip_refuge.errors import RefugeError
from sip_refuge.sidecar.core import Hub

F = TypeVar("F", bound=Callable[..., Any])
ACCESS = "refuge_access"  # a view's attribute, read by the guard: public | monitoring | read | write | admin | token | post


def hub() -> Hub:
    return cast(Hub, current_app.extensions["refuge"]["hub"])


def cameras() -> Any:
    return current_app.extensions["refuge"]["cameras"]


def http_status() -> dict[str, Any] | None:
    """The HTTP server's caps and refusals; None under another server (Flask's test client)."""
    report = current_app.extensions["refuge"].get("http")
    return cast("dict[str, Any]", report()) if report is not None else None


def stopping() -> threading.Event:
    return cast(threading.Event, current_app.extensions["refuge"]["stop"])


def _bearer() -> bytes:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return value.strip().encode() if scheme.lower() == "bearer" else b""


def _site_token_ok(given: bytes) -> bool:
    expected = str(current_app.extensions["refuge"]["token"]).encode()
    return bool(given) and hmac.compare_digest(given, expected)


def require_token(view: F) -> F:
    """Automation only: ``Authorization: Bearer <sidecar token>`` (compared in constant time), no session.
    An operator's write uses :func:`.guard.require_operator_write` instead."""

    @wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if not _site_token_ok(_bearer()):
            abort(401, description="a valid bearer token is required")
        return view(*args, **kwargs)

    setattr(wrapped, ACCESS, "token")
    return cast(F, wrapped)


def require_post_token(view: F) -> F:
    """Writes about one post (``post_id``): the site token, or that post's own telemetry token.

    A post holds only its own token (derived from its SIP secret), so a tampered post can never
    write as another one.
    """

    @wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        given = _bearer()
        if not _site_token_ok(given) and not _post_token_ok(str(kwargs.get("post_id", "")), given):
            abort(401, description="a valid bearer token is required")
        return view(*args, **kwargs)

    setattr(wrapped, ACCESS, "post")
    return cast(F, wrapped)


def _post_token_ok(post_id: str, given: bytes) -> bool:
    if not given:
        return False
    try:
        secret = hub().site.post(post_id).secret.read()
    except RefugeError:
        return False  # unknown post, or its secret is missing here: only the site token will do
    return hmac.compare_digest(given, telemetry_token(post_id, secret).encode())
