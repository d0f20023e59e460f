"""Create the secret files a site refers to, and mask secrets wherever text is logged or shown."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets as random
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote

from sip_refuge.config.files import create_file
from sip_refuge.config.model import Secret, Site
from sip_refuge.config.users import init_users_file
from sip_refuge.errors import RefugeError

_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]+):[^@\s/]*@", re.I)


def new_value(kind: str) -> str:
    """A strong random value; webhook keys use the Standard Webhooks ``whsec_`` + base64 form."""
    if kind == "webhook":
        return "whsec_" + base64.b64encode(random.token_bytes(24)).decode()
    return random.token_urlsafe(24)  # 32 characters, about 192 bits


def init_secrets(site: Site) -> list[Path]:
    """Write every missing secret file with mode 0600, and an empty users file; return the files created.

    Anything already at a secret's path is left alone, a symbolic link too, dangling or not: a link
    there is never written through (``O_NOFOLLOW``, ``O_EXCL``), and validating the site afterwards
    reports it, since a secret must be a regular file.
    """
    created = []
    for _, secret in site.secrets():
        if secret.file is None or os.path.lexists(secret.file):
            continue
        create_file(secret.file, (new_value(secret.kind) + "\n").encode(), 0o600, "secret")
        created.append(secret.file)
    users = site.sidecar.users_file if site.sidecar is not None else None
    if users is not None and init_users_file(users):
        created.append(users)  # empty: `sip-refuge users add` puts the operators in
    return created


def purpose(site: Site, name: str) -> str:
    """What the secret named ``name`` (as in :meth:`Site.secrets`) is for, and where it has to go."""
    kind, _, rest = name.partition(".")
    if kind == "pbx":
        return "the sidecar's password for Asterisk's manager interface (AMI, read-only); stays in the control room"
    if kind == "desks":
        return f"SIP password of desk phone {rest} (user name {rest}): set it in that phone"
    if kind == "posts" and rest.endswith(".camera"):
        post = site.post(rest.removesuffix(".camera"))
        user = post.camera.username if post.camera else None
        return (f"password of post {post.id}'s camera (user {user} in its rtsp_url): set the same password on the "
                "camera; the sidecar uses it to check the camera, and CCTV targets that open the stream get it "
                "inside the RTSP URL. It never goes to the post")
    if kind == "posts":
        return (f"SIP password of post {rest} (user name {rest}): copy it, and no other secret, to that post "
                "(README.md, Installing a post)")
    if kind == "sidecar":
        return "bearer token for writes to the sidecar's API; stays in the control room"
    target = next((t for t in site.cctv if t.name == rest), None)
    what = {"webhook": "Standard Webhooks signing key: give the same key to the receiver",
            "nx": "password of the Nx Witness user", "vlc": "password of VLC's HTTP interface",
            }.get(target.type if target else "", "secret")
    return f"CCTV target {rest}: {what}"


def mask_url(text: str) -> str:
    """Hide the password in ``scheme://user:password@host`` anywhere in ``text``."""
    return _URL_PASSWORD.sub(r"\g<head>:***@", text)


class Masker:
    """Replaces known secret values (and URL passwords) in text; used by every log handler."""

    def __init__(self, values: list[str] | None = None) -> None:
        raw = {v for v in (values or []) if len(v) >= 4}
        # A secret can also show up percent-encoded, e.g. a camera password inside an RTSP URL.
        raw |= {quote(v, safe="") for v in raw}
        self.values = sorted(raw, key=len, reverse=True)

    @classmethod
    def for_site(cls, site: Site) -> Masker:
        values = []
        for _, secret in site.secrets():
            try:
                values.append(secret.read())
            except RefugeError:  # a missing secret is reported by `config check`; nothing to mask
                continue
        return cls(values)

    def __call__(self, text: str) -> str:
        for value in self.values:
            text = text.replace(value, "***")
        return mask_url(text)


def stand_in_secrets(site: Site, directory: Path) -> tuple[Site, list[str]]:
    """A copy of ``site`` whose unreadable secrets point at fresh random files in ``directory``.

    For checks that only need *some* secret (``asterisk check`` loads the rendered config into a
    throw-away Asterisk): a fresh clone can be checked before ``secrets init``. Returns the dotted
    names of the secrets that were stood in for.
    """
    swapped: dict[int, Secret] = {}
    names: list[str] = []
    for name, secret in site.secrets():
        try:
            secret.read()
        except RefugeError:
            path = directory / f"{len(swapped)}.secret"
            path.write_text(new_value(secret.kind) + "\n", encoding="utf-8")
            path.chmod(0o600)
            swapped[id(secret)] = replace(secret, file=path, env=None)
            names.append(name)
    if not swapped:
        return site, []

    def fix(secret: Secret | None) -> Secret | None:
        return swapped.get(id(secret), secret) if secret is not None else None

    def fix_required(secret: Secret) -> Secret:
        return swapped.get(id(secret), secret)

    pbx = replace(site.pbx, ami=replace(site.pbx.ami, secret=fix_required(site.pbx.ami.secret)))
    desks = tuple(replace(d, secret=fix_required(d.secret)) for d in site.desks)
    posts = tuple(replace(p, secret=fix_required(p.secret),
                          camera=replace(p.camera, password=fix(p.camera.password)) if p.camera else None)
                  for p in site.posts)
    sidecar = replace(site.sidecar, token=fix_required(site.sidecar.token)) if site.sidecar else None
    cctv = tuple(replace(t, secret=fix(t.secret)) for t in site.cctv)
    return replace(site, pbx=pbx, desks=desks, posts=posts, sidecar=sidecar, cctv=cctv), names


def telemetry_token(post_id: str, post_secret: str) -> str:
    """The bearer token a post uses for its own telemetry: derived from its SIP secret, so a post needs
    no site-wide secret and a stolen post can only ever write as itself."""
    digest = hmac.new(post_secret.encode(), f"sip-refuge telemetry {post_id}".encode(), hashlib.sha256)
    return "post." + digest.hexdigest()


def snapshot_key(site_token: str, incident_id: str) -> str:
    """The ``key`` in an incident's ``snapshot_url``: whoever got the event (a CCTV system) may fetch that one
    picture without a login or the site token. 128 bits of HMAC-SHA256 keyed with the site token, so
    changing the token withdraws every such link at once."""
    digest = hmac.new(site_token.encode(), f"sip-refuge snapshot {incident_id}".encode(), hashlib.sha256)
    return digest.hexdigest()[:32]


def incident_snapshot_url(site: Site, base_url: str, incident_id: str) -> str:
    """An incident's snapshot URL; with its key when the site token can be read (it always can in a sidecar)."""
    url = f"{base_url}/api/v1/incidents/{incident_id}/snapshot.jpg"
    try:
        token = site.sidecar.token.read() if site.sidecar is not None else ""
    except RefugeError:
        token = ""
    return f"{url}?key={snapshot_key(token, incident_id)}" if token else url
