"""``cctv[type=webhook]``: a Standard Webhooks POST of each event (``sip_refuge.sidecar.targets.webhook``)."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sip_refuge.config.model import Secret, TargetOptions
from sip_refuge.config.reader import Reader
from sip_refuge.errors import RefugeError

if TYPE_CHECKING:
    from jinja2 import Template

    from sip_refuge.config.cctv import ReadContext

KIND = "webhook"


@dataclass(frozen=True)
class WebhookOptions(TargetOptions):
    url: str
    headers: dict[str, str] = field(default_factory=dict)  # extra request headers
    body_template: str | None = None  # Jinja2 (sandboxed): the body for a VMS that takes a templated call


def _tojson(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def compile_template(source: str) -> Template:
    """Compile a body template; raises RefugeError naming the mistake. Jinja2 is imported only here, when a
    site has a template, so reading a site never loads it otherwise."""
    from jinja2 import StrictUndefined, TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
    env.filters["tojson"] = _tojson
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise RefugeError(f"body_template: {exc}") from None


def check_key(value: str) -> str | None:
    """Why ``value`` is no Standard Webhooks signing key (``whsec_`` and base64), or None when it is one.

    Judged as ``standardwebhooks.Webhook(value)`` does, without importing it (the base install, which runs
    ``config check`` on a post, has no standardwebhooks): it drops ``whsec_``, decodes base64 with padding
    added, and refuses an empty key. A unit test holds this to the library's own verdict."""
    bare = value.removeprefix("whsec_")
    try:
        key = base64.b64decode(bare + "==")
    except binascii.Error as exc:
        return str(exc)
    return None if key else "empty"


def read(r: Reader, ctx: ReadContext) -> tuple[WebhookOptions | None, Secret | None]:
    url = ctx.url(r, "url", ("http", "https"))
    secret = ctx.secret(r, kind="webhook")
    headers = ctx.plain_mapping(r.child("headers"))
    body_template = r.text("body_template", multiline=True)
    if body_template:
        try:
            compile_template(body_template)
        except RefugeError as exc:
            r.fail("body_template", str(exc))
    if secret is not None and ctx.check_secrets:
        _check_secret(r, secret)
    return (WebhookOptions(url, headers, body_template) if url else None), secret


def _check_secret(r: Reader, secret: Secret) -> None:
    try:
        value = secret.read()
    except RefugeError:
        return  # already reported by the loader's secret check
    problem = check_key(value)
    if problem is not None:
        r.fail("secret_file" if secret.file is not None else "secret_env",
               f"the secret in {secret.describe()} is not a valid Standard Webhooks key (whsec_ and base64:"
               f" {problem})")

