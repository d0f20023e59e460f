"""The webhook target's ``body_template``: Jinja2, sandboxed, compiled when the site is read.

Apart from :mod:`.webhook` (which needs requests and standardwebhooks), so ``config check`` finds a broken
template on a machine with the base install only.
"""

from __future__ import annotations

import json

from jinja2 import StrictUndefined, Template, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from sip_refuge.errors import SidecarError


def _tojson(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def compile_template(source: str) -> Template:
    """Compile a body template; raises SidecarError at start-up rather than on the first call."""
    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
    env.filters["tojson"] = _tojson
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise SidecarError(f"body_template: {exc}") from None
