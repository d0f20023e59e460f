"""Every request is checked here before its view runs: deny unless a view says otherwise.

A view declares who may call it with one decorator; a view without one needs a login (or the bearer token):

- :func:`public`: anyone (the login page, static files);
- :func:`monitoring`: anyone from ``sidecar.monitoring_networks``, else as a read (``/healthz``, ``/metrics``);
- :func:`readable_with_key`: anyone with the URL's ``key``, else as a read (an incident's snapshot);
- (none): a read, by an operator's session or the bearer token;
- :func:`require_operator_write` ("press", ...): a write by a session or the token, recorded in the audit log;
- :func:`require_admin`: an admin's session or the token (the audit log);
- ``context.require_token``: the bearer token only; ``context.require_post_token``: a post's own token.

Every state-changing request made with a session must carry the session's CSRF token (header
``X-CSRF-Token``, or a form field ``csrf``) and, when the browser names its ``Origin``, come from this host.
A page asked for without a login is redirected to ``/login``; anything else gets 401 JSON.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import aclosing
from dataclasses import dataclass
from functools import wraps
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

from flask import Response, current_app, g, jsonify, make_response, redirect, request, url_for
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException

from sip_refuge.config.files import printable
from sip_refuge.sidecar.access import ADMIN, Access, Session, in_networks
from sip_refuge.sidecar.access.audit import OK
from sip_refuge.sidecar.web.context import ACCESS
from sip_refuge.sidecar.web.proxy import FORWARDED
from sip_refuge.sidecar.web.stream import Stream

F = TypeVar("F", bound=Callable[..., Any])
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SESSION_COOKIE = "refuge_session"
CSRF_HEADER = "X-CSRF-Token"
_PAGES = ("/", "/operator")


@dataclass(frozen=True)
class Who:
    """Who made this request: an operator's session, or the bearer token (``via``)."""

    name: str
    role: str
    via: str  # session | token
    session: Session | None = None
    cookie: str = ""


def access() -> Access:
    return cast(Access, current_app.extensions["refuge"]["access"])


def who() -> Who | None:
    return cast("Who | None", g.get("refuge_who"))


def client_address() -> str:
    """The client's address (behind a proxy named in ``sidecar.proxies``: the real client's)."""
    return request.remote_addr or "?"


def _level(level: str) -> Callable[[F], F]:
    def mark(view: F) -> F:
        setattr(view, ACCESS, level)
        return view

    return mark


public = _level("public")
monitoring = _level("monitoring")
require_admin = _level("admin")
KEY = "refuge_key"


def readable_with_key(key_for: Callable[..., str]) -> Callable[[F], F]:
    """A read that ``?key=`` opens too, without a login: ``key_for(**url arguments)`` is the right key ("" for
    none). An incident's snapshot URL carries one, so the CCTV system that got the event can fetch it."""

    def mark(view: F) -> F:
        setattr(view, ACCESS, "keyed")
        setattr(view, KEY, key_for)
        return view

    return mark


def require_operator_write(action: str) -> Callable[[F], F]:
    """A write an operator may make (``action`` names it in the audit log: press, incident.close, ...).

    The guard has already checked the session and its CSRF token, or the bearer token; this records the
    write, with the view's answer, once the view has run. The view's URL arguments are the audit ``target``.
    """

    def decorate(view: F) -> F:
        @wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            target = ",".join(str(v) for v in kwargs.values()) or None
            try:
                reply = make_response(view(*args, **kwargs))
            except HTTPException as exc:
                _audit_write(action, str(exc.code), target, detail=exc.description)
                raise
            _audit_write(action, OK if reply.status_code < 400 else str(reply.status_code), target,
                         status=reply.status_code)
            return reply

        setattr(wrapped, ACCESS, "write")
        return cast(F, wrapped)

    return decorate


def _audit_write(action: str, outcome: str, target: str | None, **detail: Any) -> None:
    person = who()
    access().audit.record(action, outcome, actor=person.name if person else "?", role=person.role if person else None,
                          address=client_address(), target=target, **detail)


# -- the check before each request --------------------------------------------------------------------------

def check_request() -> ResponseReturnValue | None:
    view = current_app.view_functions.get(request.endpoint or "")
    level = "public" if request.endpoint == "static" else getattr(view, ACCESS, "read")
    if level in ("public", "post"):  # a post's write checks its own token in the view
        return None
    if level == "monitoring" and from_monitoring_network():
        return None
    if level == "keyed" and _key_ok(getattr(view, KEY)):
        return None
    person, refusal = _identify()
    if person is None:
        return refusal if refusal is not None else _unauthenticated()
    if level == "token" and person.via != "token":
        return _refuse(403, "this needs the bearer token (sidecar.token_file)")
    if level == "admin" and person.role != ADMIN:
        return _refuse(403, "only an admin may read this")
    if request.method not in SAFE_METHODS and person.session is not None:
        problem = _forged(person.session)
        if problem is not None:
            access().audit.record("write", "refused", actor=person.name, role=person.role, address=client_address(),
                                  target=request.path, reason=problem)
            return _refuse(403, problem)
    g.refuge_who = person
    return None


def from_monitoring_network() -> bool:
    return not request.environ.get(FORWARDED) and in_networks(client_address(), access().monitoring)


def _key_ok(key_for: Callable[..., str]) -> bool:
    given = request.args.get("key", "")
    if not given:
        return False
    expected = key_for(**(request.view_args or {}))
    return bool(expected) and hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode())


def _identify() -> tuple[Who | None, ResponseReturnValue | None]:
    acc = access()
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, value = header.partition(" ")
        token = value.strip().encode()
        if scheme.lower() == "bearer" and token and hmac.compare_digest(token, acc.token.encode()):
            return Who("token", ADMIN, "token"), None
        return None, _refuse(401, "the bearer token is wrong")
    cookie = request.cookies.get(SESSION_COOKIE, "")
    session = acc.sessions.get(cookie)
    if session is None:
        return None, None
    if not acc.current(session):
        acc.sessions.close(cookie)
        acc.audit.record("logout", "ended", actor=session.user, role=session.role, address=client_address(),
                         reason="the user was removed, or given a new password or role")
        return None, None
    return Who(session.user, session.role, "session", session, cookie), None


def _forged(session: Session) -> str | None:
    """Why this write cannot be the session's own page's, or None."""
    given = request.headers.get(CSRF_HEADER, "")
    if not given and request.mimetype in ("application/x-www-form-urlencoded", "multipart/form-data"):
        given = request.form.get("csrf", "")
    if not given or not hmac.compare_digest(given.encode("utf-8", "replace"), session.csrf.encode()):
        return "the CSRF token is missing or wrong: reload the page"
    origin = request.headers.get("Origin", "null")
    if origin != "null" and urlsplit(origin).netloc != request.host:
        return f"the request comes from {printable(origin)[:200]}, not from this sidecar ({request.host})"
    return None


def _refuse(status: int, detail: str) -> tuple[Response, int]:
    return jsonify(error="Unauthorized" if status == 401 else "Forbidden", detail=detail), status


def _unauthenticated() -> ResponseReturnValue:
    if request.method in ("GET", "HEAD") and request.path in _PAGES:
        query = request.query_string.decode("latin-1")
        return redirect(url_for("auth.login", next=request.path + (f"?{query}" if query else "")), 303)
    reply, status = _refuse(401, "log in at /login, or send Authorization: Bearer <the sidecar token>")
    reply.headers["WWW-Authenticate"] = 'Bearer realm="sip-refuge"'
    return reply, status


# -- after each request ---------------------------------------------------------------------------------------

def after_request(reply: Response) -> Response:
    person = who()
    if person is None or person.session is None:
        return reply
    if isinstance(reply.response, Stream):  # an event stream or live view ends with its session
        acc, cookie, session = access(), person.cookie, person.session
        reply.response = SessionBound(reply.response, lambda: acc.sessions.get(cookie) is session
                                      and acc.current(session))
    elif reply.mimetype == "text/html":
        reply.headers["Cache-Control"] = "no-store"  # after logout, Back must not show the page again
    return reply


class SessionBound(Stream):
    """A stream that ends when the session it was opened with does (logout, expiry, user removed).

    ``alive`` is asked before each chunk: an event stream sends one at least every 15 s (its keep-alive),
    a live view one per picture. Asking also counts as use of the session, so an open console stays
    logged in until its lifetime ends.
    """

    def __init__(self, inner: Stream, alive: Callable[[], bool]) -> None:
        self.inner, self.alive, self.kind = inner, alive, inner.kind

    def __iter__(self) -> Iterator[bytes]:
        chunks = iter(self.inner)
        try:
            for chunk in chunks:
                if not self.alive():
                    return
                yield chunk
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()  # the event stream's own clean-up (unsubscribe) runs now, not at garbage collection

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        async with aclosing(self.inner.chunks()) as chunks:
            async for chunk in chunks:
                if not self.alive():
                    return
                yield chunk

    def close(self) -> None:
        self.inner.close()
