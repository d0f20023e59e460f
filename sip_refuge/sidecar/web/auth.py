"""Login and logout pages, ``/api/v1/session`` and ``/api/v1/audit``.

The login form carries its own CSRF token, equal to a cookie set with the form (double submit), so a page
elsewhere cannot log a browser in as someone else. A successful login sets the session cookie: HttpOnly,
SameSite=Strict, and Secure when the request came over https (directly, or through a proxy named in
``sidecar.proxies`` that says so in X-Forwarded-Proto).
"""

from __future__ import annotations

import hmac
import math
import secrets
from datetime import UTC, datetime
from typing import Any

from flask import (
    Blueprint,
    Response,
    abort,
    jsonify,
    make_response,
    redirect,
    render_template,
    request,
    url_for,
)
from werkzeug.wrappers import Response as Answer

from sip_refuge.config.files import printable
from sip_refuge.errors import SidecarError
from sip_refuge.sidecar.access.audit import OK
from sip_refuge.sidecar.events import iso_utc
from sip_refuge.sidecar.web.context import hub
from sip_refuge.sidecar.web.guard import (
    CSRF_HEADER,
    SESSION_COOKIE,
    access,
    client_address,
    public,
    require_admin,
    who,
)

bp = Blueprint("auth", __name__)

LOGIN_COOKIE = "refuge_login"
MAX_NAME = 64


def _cookie(reply: Answer, name: str, value: str, *, path: str, max_age: int | None = None) -> None:
    reply.set_cookie(name, value, max_age=max_age, path=path, secure=request.is_secure, httponly=True,
                     samesite="Strict")


def _safe_next(value: str | None) -> str:
    """Where to go after login: a path on this sidecar only (never ``//evil`` or ``https://evil``)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value or \
            any(ord(c) < 0x21 for c in value):
        return "/"
    return value


def _form(status: int = 200, message: str | None = None, name: str = "", retry_after: float | None = None) -> Response:
    token = request.cookies.get(LOGIN_COOKIE, "")
    if len(token) != 32 or not token.isascii():
        token = secrets.token_urlsafe(24)
    acc = access()
    reply = make_response(render_template(
        "login.html", site=hub().site, names={}, message=message, name=name, login_csrf=token,
        next=_safe_next(request.values.get("next")), configured=acc.operators.configured), status)
    _cookie(reply, LOGIN_COOKIE, token, path="/login", max_age=3600)
    reply.headers["Cache-Control"] = "no-store"
    if retry_after is not None:
        reply.headers["Retry-After"] = str(math.ceil(retry_after))
    return reply


@bp.get("/login")
@public
def login_page() -> Answer:
    person = _session_person()
    if person is not None:
        return redirect(_safe_next(request.args.get("next")), 303)
    return _form()


@bp.post("/login")
@public
def login() -> Answer:
    acc = access()
    expected = request.cookies.get(LOGIN_COOKIE, "")
    given = request.form.get("csrf", "")
    if not expected or not hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8", "replace")):
        return _form(400, "The login form was out of date: please try again.")
    name = request.form.get("name", "").strip().lower()[:MAX_NAME + 1]
    password = request.form.get("password", "")
    address, actor = client_address(), printable(name)[:MAX_NAME] or "(empty)"
    wait, first = acc.throttle.wait(address, name)
    if wait > 0:
        if first:
            acc.audit.record("login", "throttled", actor=actor, address=address, retry_after=math.ceil(wait))
        return _form(429, f"Too many failed logins: wait {math.ceil(wait)} s, then try again.", name, wait)
    try:
        user = acc.operators.check(name, password)
    except SidecarError as exc:
        return _form(503, str(exc), name, 5)
    if user is None:
        by_address, by_user = acc.throttle.failed(address, name)
        reason = "unknown user" if name not in acc.operators.current() else "wrong password"
        acc.audit.record("login", "failed", actor=actor, address=address, reason=reason,
                         failures_from_address=by_address, failures_for_user=by_user)
        return _form(401, "Wrong name or password.", name)
    acc.throttle.succeeded(address, name)
    cookie, _ = acc.sessions.open(user.name, user.role, user.hash, address, iso_utc(datetime.now(UTC)))
    acc.audit.record("login", OK, actor=user.name, role=user.role, address=address)
    reply = redirect(_safe_next(request.form.get("next")), 303)
    _cookie(reply, SESSION_COOKIE, cookie, path="/")
    reply.delete_cookie(LOGIN_COOKIE, path="/login")
    return reply


def _session_person() -> tuple[str, Any] | None:
    acc = access()
    cookie = request.cookies.get(SESSION_COOKIE, "")
    session = acc.sessions.get(cookie)
    if session is None or not acc.current(session):
        return None
    return cookie, session


@bp.post("/logout")
@public  # checked here: without a live session there is nothing to end, only a cookie to drop
def logout() -> Answer:
    acc = access()
    found = _session_person()
    if found is not None:
        cookie, session = found
        given = request.form.get("csrf", "") or request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(given.encode("utf-8", "replace"), session.csrf.encode()):
            abort(403, description="the CSRF token is missing or wrong: reload the page")
        acc.sessions.close(cookie)
        acc.audit.record("logout", OK, actor=session.user, role=session.role, address=client_address())
    reply = redirect(url_for("auth.login_page"), 303)
    reply.delete_cookie(SESSION_COOKIE, path="/", secure=request.is_secure, httponly=True, samesite="Strict")
    return reply


@bp.get("/api/v1/session")
def session_info() -> Response:
    """Who is asking: the pages read their CSRF token and expiry here (the token: no session, no CSRF)."""
    person = who()
    assert person is not None  # the guard let the request in
    body: dict[str, Any] = {"user": person.name, "role": person.role, "via": person.via}
    if person.session is not None:
        acc = access()
        body.update(csrf=person.session.csrf, since=person.session.started_at,
                    expires_in=round(acc.sessions.expires_in(person.session)),
                    idle_timeout=acc.sessions.idle, lifetime=acc.sessions.lifetime)
    return jsonify(body)


@bp.get("/api/v1/audit")
@require_admin
def audit() -> Response:
    limit, before = request.args.get("limit", "100"), request.args.get("before")
    if not (limit.isascii() and limit.isdigit()) or not 1 <= int(limit) <= 10000:
        abort(400, description="limit must be a whole number from 1 to 10000")
    if before is not None and not (before.isascii() and before.isdigit() and len(before) < 19):
        abort(400, description="before must be the seq of an entry")
    return jsonify(entries=access().audit.entries(int(limit), int(before) if before is not None else None))


@bp.app_context_processor
def session_for_templates() -> dict[str, Any]:
    """Every page learns who is logged in (its header shows it, with the logout button) and the CSRF token."""
    person = who()
    session = person.session if person is not None else None
    return {"who": person, "csrf_token": session.csrf if session is not None else ""}
