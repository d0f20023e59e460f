"""Render the Asterisk configuration of a site from the Jinja2 templates in ``asterisk/templates``.

The package finds them as ``sip_refuge/pbx/templates``: in a checkout that is a link to ``asterisk/templates``
(where admins read them), in an installed wheel a copy of the files.

Two sets of files come out:

* :func:`render` gives the include files an admin ``#include``s into an existing PBX
  (``pjsip_refuge.conf``, ``extensions_refuge.conf`` ...). Every password lives in a file whose name
  ends in ``_secrets.conf`` (or in ``manager_refuge.conf``), so the rest can be shared and committed.
* :func:`render_sandbox` adds ``asterisk.conf``, ``modules.conf`` and the other top-level files that
  make a self-contained Asterisk on loopback (``sip-refuge pbx``, ``asterisk check``, the tests).

The templates decide the Asterisk syntax; this module only turns the typed :class:`Site` into plain
values for them, so a telecoms admin can read and adapt a template without reading Python.
"""

from __future__ import annotations

import ipaddress
import os
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from sip_refuge.config.files import control_character, printable
from sip_refuge.config.model import PRIMARY, SECONDARY, Desk, Pbx, Post, Site
from sip_refuge.errors import PbxError, RefugeError

TEMPLATES = Path(__file__).resolve().parent / "templates"

# The include files, in the order an admin reads about them in asterisk/README.md.
INCLUDE_FILES = (
    "pjsip_refuge_transport.conf",
    "pjsip_refuge.conf",
    "pjsip_refuge_secrets.conf",
    "acl_refuge.conf",
    "queues_refuge.conf",
    "extensions_refuge.conf",
    "manager_refuge.conf",
)
# Top-level files of the loopback sandbox; each #includes the matching include file(s).
SANDBOX_FILES = (
    "asterisk.conf",
    "modules.conf",
    "logger.conf",
    "indications.conf",
    "rtp.conf",
    "acl.conf",
    "pjsip.conf",
    "queues.conf",
    "extensions.conf",
    "manager.conf",
    # Files the Asterisk core reads at start: missing, each logs an ERROR or WARNING.
    "stasis.conf",
    "cdr.conf",
    "cel.conf",
    "ccss.conf",
    "features.conf",
    "udptl.conf",
    "pjproject.conf",
    "queuerules.conf",
)
# Files holding a password besides the *_secrets.conf ones: Asterisk wants the AMI user's secret
# inside its user section, so the whole (short) file is treated as secret.
SECRET_FILES = frozenset({"manager_refuge.conf"})

# Asterisk config values end at ';' (a comment) and break on newlines; names shown on phones and
# in queue member lines also must not carry quotes or commas (field separators in member =>).
_UNSAFE_TEXT = re.compile(r'[\x00-\x1f\x7f";\\,]+')


@dataclass(frozen=True)
class SandboxDirs:
    """Absolute directories of one loopback Asterisk run (asterisk.conf ``[directories]``)."""

    etc: Path
    modules: Path
    data: Path
    run: Path
    log: Path
    spool: Path
    lib: Path
    db: Path
    keys: Path


@dataclass(frozen=True)
class Phone:
    """A post or desk as the templates see it: one PJSIP endpoint + aor + auth."""

    id: str
    name: str
    extension: str
    role: str  # post | desk
    template: str  # the (!) endpoint template it inherits
    acl: str | None  # named ACL in acl_refuge.conf, or None when the site gives no networks


@dataclass(frozen=True)
class Transport:
    name: str
    protocol: str  # udp | tcp | tls
    bind: str
    port: int


def render(site: Site, *, command: str, templates: Path | None = None, role: str = PRIMARY) -> dict[str, str]:
    """The include files for an existing PBX: file name -> text. ``role``: which PBX of a pair (primary,
    secondary); both get the same posts, desks and queue, each its own addresses."""
    env = _environment(templates)
    context = _context(site, command, role)
    return {name: _render_one(env, name, context) for name in INCLUDE_FILES}


def render_sandbox(site: Site, dirs: SandboxDirs, *, command: str, templates: Path | None = None,
                   role: str = PRIMARY) -> dict[str, str]:
    """:func:`render` plus the top-level files of a self-contained Asterisk on loopback."""
    env = _environment(templates)
    context = _context(site, command, role)
    context.update(dirs=dirs, language=_sound_language(dirs.data))
    files = {name: _render_one(env, name, context) for name in INCLUDE_FILES}
    files.update((name, _render_one(env, name, context)) for name in SANDBOX_FILES)
    return files


def is_secret(name: str) -> bool:
    """Whether a rendered file holds a password and must be written mode 0600."""
    return name.endswith("_secrets.conf") or name in SECRET_FILES


def write(files: dict[str, str], out: Path) -> list[Path]:
    """Write ``files`` into ``out``; secret files are created 0600 (never briefly world-readable)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        path = out / name
        mode = 0o600 if is_secret(name) else 0o644
        tmp = path.with_name(f".{name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.chmod(tmp, mode)  # an old leftover tmp file keeps its mode through O_CREAT
            os.replace(tmp, path)  # a reloading Asterisk never reads a half-written file
        except OSError as exc:
            raise PbxError(f"cannot write {path}: {exc.strerror}") from None
        written.append(path)
    return written


# -- the values the templates see -------------------------------------------------------------------

def _context(site: Site, command: str, role: str = PRIMARY) -> dict[str, Any]:
    pbx = site.pbx
    if role not in pbx.roles:
        raise PbxError(f"{site.path}: pbx.secondary_host is not set: the site has no secondary PBX to render"
                       if role == SECONDARY else f"unknown PBX role {role!r} (primary, secondary)")
    bind = pbx.bind_of(role)
    tls_mode = pbx.transport == "tls"
    # Posts on TLS always (a pyVoIP post is refused on a TLS site); desks stay on UDP inside the control
    # room unless pbx.tls.desks is tls.
    desks_tls = tls_mode and pbx.tls is not None and pbx.tls.desks == "tls"
    transports = []
    if not tls_mode or not desks_tls:
        proto = "tcp" if pbx.transport == "tcp" else "udp"
        transports.append(Transport(f"transport-refuge-{proto}", proto, bind, pbx.sip_port))
    if pbx.tls is not None:
        transports.append(Transport("transport-refuge-tls", "tls", bind, pbx.tls.port))
    acls = {"posts": pbx.networks.posts, "desks": pbx.networks.desks}
    phones: list[Post | Desk] = [*site.posts, *site.desks]
    passwords = {phone.id: _secret_value(phone.id, phone.secret.read) for phone in phones}
    return {
        "site": site,
        "site_file": str(site.path),
        "command": command,
        "tls_mode": tls_mode,
        "desks_tls": desks_tls,
        "transports": transports,
        "acls": {f"refuge-{role}": nets for role, nets in acls.items() if nets},
        "posts": [_phone(p, "post", bool(acls["posts"])) for p in site.posts],
        "desks": [_phone(d, "desk", bool(acls["desks"])) for d in site.desks],
        "passwords": passwords,
        "ami_secret": _secret_value("pbx.ami", site.pbx.ami.secret.read),
        "role": role,
        "role_note": _role_note(pbx, role),
        "pbx_host": pbx.host_of(role),
        # The sandbox's AMI: the primary's on 127.0.0.1, the secondary's where the sidecar looks for it.
        "ami_bind": "127.0.0.1" if role == PRIMARY else pbx.ami_of(role).host,
        # Who may log in to AMI: the sidecar, beside the primary (loopback there; the primary's address as the
        # secondary sees it, when that is an address).
        "ami_permits": ["127.0.0.1"] + ([pbx.host] if role != PRIMARY and _is_remote_address(pbx.host) else []),
        "sidecar_host_unknown": role != PRIMARY and not _is_address(pbx.host),
    }


def _role_note(pbx: Pbx, role: str) -> str:
    """The header line naming the PBX's place in a pair; empty for a site with one PBX."""
    if pbx.secondary_host is None:
        return ""
    if role == PRIMARY:
        return (f"primary PBX of the pair (pbx.host {pbx.host}); the secondary at {pbx.secondary_host} "
                "has the same posts, desks and queue")
    return (f"SECONDARY PBX of the pair (pbx.secondary_host {pbx.secondary_host}): the same posts, desks "
            f"and queue as the primary at {pbx.host}")


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _is_remote_address(host: str) -> bool:
    return _is_address(host) and not ipaddress.ip_address(host.strip("[]")).is_loopback


def _phone(item: Post | Desk, role: str, has_acl: bool) -> Phone:
    if isinstance(item, Post):
        template = f"refuge-post-{item.sip_backend}"
    else:
        template = "refuge-desk"
    return Phone(item.id, _text(item.name), item.extension, role, template,
                 f"refuge-{role}s" if has_acl else None)


def _secret_value(owner: str, read: Callable[[], str]) -> str:
    try:
        value = read()
    except PbxError:
        raise
    except RefugeError as exc:
        raise PbxError(f"the secret of {owner}: {exc}") from None
    # A newline would end the config line and let the rest of the secret be read as config. Reading
    # refuses it already; this holds for a Site built in code, too. The value itself is never shown.
    if control_character(value):
        raise PbxError(f"the secret of {owner} holds control characters; Asterisk cannot take it")
    return value


def _text(value: object) -> str:
    """Free text (names) made safe for a config value, a caller ID and a queue member name."""
    return " ".join(_UNSAFE_TEXT.sub(" ", str(value)).split())


def _conf_secret(value: str) -> str:
    # In an Asterisk config a bare ';' starts a comment; '\;' is read back as ';'.
    return value.replace(";", r"\;")


def _sound_language(data: Path) -> str:
    """Pick a prompt language whose directory really exists in the sandbox's data dir.

    Debian links sounds/en to /etc/alternatives, which is missing when Asterisk runs from its own
    root folder without chroot; prompts then fail, so fall back to a real en_* directory.
    """
    sounds = data / "sounds"
    if (sounds / "en").is_dir():
        return "en"
    found = sorted(p.name for p in sounds.glob("en*") if p.is_dir()) if sounds.is_dir() else []
    return found[0] if found else "en"


# -- Jinja2 -------------------------------------------------------------------------------------------

def _environment(templates: Path | None) -> jinja2.Environment:
    folder = (templates or TEMPLATES).resolve()
    if not folder.is_dir():
        raise PbxError(f"template folder {folder} does not exist")
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(folder),
        undefined=jinja2.StrictUndefined,  # a typo in a template is an error, not an empty value
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        # Not HTML: autoescape only marks what was checked. Every printed value goes through
        # _one_line, which returns it as Markup (so nothing is escaped) or refuses it; a macro's
        # output (a banner, a header) is Markup already and was checked value by value inside.
        # Markup joined with plain text escapes the text: concatenate values, not macro calls.
        autoescape=True,
        finalize=_one_line,
    )
    env.filters["text"] = _text
    env.filters["conf_secret"] = _conf_secret
    return env


@jinja2.pass_context
def _one_line(context: jinja2.runtime.Context, value: object) -> Markup:
    """Every value printed into a generated file, refused when it holds a control character.

    The site file's reader already refuses them in every value; this is the last gate for the rest
    (the site file's own path, --out, the sandbox folders, a Site built in code): a line break in a
    value would let it write config lines of its own choosing, such as a hidden desk account.
    """
    if isinstance(value, Markup):
        return value
    text = str(value)
    bad = control_character(text)
    if bad:
        shown = printable(text if len(text) <= 80 else text[:77] + "...")
        raise PbxError(f"{context.get('file', context.name)}: refusing to write '{shown}': it holds a control "
                       f"character ({bad}) that would start a new line of config")
    return Markup(text)


def _render_one(env: jinja2.Environment, name: str, context: dict[str, Any]) -> str:
    template_name = f"{name}.j2"
    try:
        return env.get_template(template_name).render(file=name, **context)
    except jinja2.TemplateNotFound as exc:
        raise PbxError(f"template {exc.name} not found in {_folder(env)}") from None
    except jinja2.TemplateSyntaxError as exc:
        where = exc.filename or str(_folder(env) / (exc.name or template_name))
        raise PbxError(f"{where}:{exc.lineno}: template syntax error: {exc.message}") from None
    except RefugeError:
        raise
    except (jinja2.TemplateError, ArithmeticError, AttributeError, LookupError, TypeError,
            ValueError) as exc:
        raise PbxError(f"{_location(exc, env, template_name)}: {type(exc).__name__}: {exc}") from None


def _folder(env: jinja2.Environment) -> Path:
    loader = env.loader
    assert isinstance(loader, jinja2.FileSystemLoader)
    return Path(loader.searchpath[0])


def _location(exc: BaseException, env: jinja2.Environment, fallback: str) -> str:
    """FILE:LINE of the template line that failed; Jinja2 rewrites tracebacks to point at it."""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if frame.filename.endswith(".j2"):
            return f"{frame.filename}:{frame.lineno}"
    return str(_folder(env) / fallback)
