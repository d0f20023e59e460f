"""Operators for tests: put one in a site's users file, and log in over HTTP as a browser would.

A login costs one real scrypt check (about a second here): tests log in once and keep the session.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from sip_refuge.config import Site
from sip_refuge.config.passwords import hash_password
from sip_refuge.config.users import set_user

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def add_operator(site: Site, name: str, role: str = "operator", password: str | None = None) -> str:
    """Add (or reset) ``name`` in the site's users file, as `sip-refuge users add` does; returns the password."""
    assert site.sidecar is not None and site.sidecar.users_file is not None
    password = password or "pw-" + secrets.token_urlsafe(12)
    set_user(site.sidecar.users_file, name, role, hash_password(password))
    return password


class FromAddress(HTTPAdapter):
    """Connections from a given loopback address (an attacker at 127.0.0.2, say)."""

    def __init__(self, source: str) -> None:
        self.source = source
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["source_address"] = (self.source, 0)
        super().init_poolmanager(*args, **kwargs)


def client(source: str | None = None) -> requests.Session:
    """A fresh HTTP client with no token: from ``source`` when given."""
    session = requests.Session()
    if source is not None:
        session.mount("http://", FromAddress(source))
        session.mount("https://", FromAddress(source))
    return session


def login_form(session: requests.Session, base: str) -> str:
    """GET /login: the form's CSRF token (its cookie is now in ``session``)."""
    page = session.get(base + "/login", timeout=15)
    page.raise_for_status()
    found = _CSRF.search(page.text)
    assert found is not None, page.text
    return found.group(1)


def log_in(session: requests.Session, base: str, name: str, password: str, *, next_page: str = "/") -> requests.Response:
    """POST the login form as a browser would (no redirect followed): 303 on success."""
    csrf = login_form(session, base)
    return session.post(base + "/login", data={"name": name, "password": password, "csrf": csrf, "next": next_page},
                        allow_redirects=False, timeout=30)


def page_csrf(session: requests.Session, base: str) -> str:
    """The session's CSRF token, as the pages read it."""
    reply = session.get(base + "/api/v1/session", timeout=15)
    reply.raise_for_status()
    return str(reply.json()["csrf"])
