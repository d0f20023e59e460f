"""Access to the hub and settings from inside a request, and the bearer-token check."""

from __future__ import annotations

import hmac
import threading
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar, cast

from flask import abort, current_app, request

from sip_refuge.sidecar.core import Hub

F = TypeVar("F", bound=Callable[..., Any])


def hub() -> Hub:
    return cast(Hub, current_app.extensions["refuge"]["hub"])


def cameras() -> Any:
    return current_app.extensions["refuge"]["cameras"]


def stopping() -> threading.Event:
    return cast(threading.Event, current_app.extensions["refuge"]["stop"])


def require_token(view: F) -> F:
    """API writes need ``Authorization: Bearer <sidecar token>`` (compared in constant time)."""

    @wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        expected = str(current_app.extensions["refuge"]["token"])
        given = request.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not value or not hmac.compare_digest(value.strip().encode(),
                                                                               expected.encode()):
            abort(401, description="a valid bearer token is required")
        return view(*args, **kwargs)

    return cast(F, wrapped)
