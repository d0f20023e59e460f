"""Build a :class:`Site` from a site file, checking every rule of spec section 2."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sip_refuge.config import cctv
from sip_refuge.config import sidecar_section as section
from sip_refuge.config.files import control_character, printable
from sip_refuge.config.model import (
    DEFAULT_CLOSE_REASONS,
    MONITORING_NETWORKS,
    TARGET_CONCURRENCY,
    Ami,
    Camera,
    CctvTarget,
    Desk,
    Gpio,
    Location,
    Networks,
    Pbx,
    Post,
    Queue,
    Secret,
    SelfTest,
    Sidecar,
    Site,
    Tls,
)
from sip_refuge.config.plan import off_plan, read_plan
from sip_refuge.config.reader import ID, ID_HINT, Reader
from sip_refuge.config.source import Source, load_yaml
from sip_refuge.errors import ConfigError, Problem, RefugeError

HOST = r"[A-Za-z0-9.:\[\]-]{1,253}"
ENV = r"[A-Za-z_][A-Za-z0-9_]*"
# BCM numbering on a 40-pin Raspberry Pi header.
GPIO_PINS = range(0, 28)
MIN_SECRET = 16
WELL_KNOWN = {
    "password", "password123", "changeme", "changeme123", "secret", "admin", "administrator", "1234",
    "123456", "12345678", "1234567890123456", "0000000000000000", "letmein", "asterisk", "default",
    "qwertyuiopasdfgh", "aaaaaaaaaaaaaaaa",
}
PREFIX = r"[A-Z][A-Z0-9]{0,7}"


def load_site(path: str | Path, *, check_secrets: bool = True, post: str | None = None) -> Site:
    """Load and validate ``path``. Raise :class:`ConfigError` listing every mistake.

    ``check_secrets=False`` skips reading secret values (``secrets init`` runs before they exist).
    ``post=ID`` reads and checks only that post's own secret, the one secret a post holds
    (``config check SITE --post ID`` on the post); the post must be in the site.
    """
    path = Path(path)
    _check_site_path(path)
    src = load_yaml(path)
    problems: list[Problem] = []
    builder = _Builder(src, problems, check_secrets, post)
    site = builder.site()
    if problems or site is None:
        problems.sort(key=lambda p: p.line)
        raise ConfigError(problems)
    return replace(site, warnings=tuple(sorted(builder.warnings, key=lambda p: p.line)))


def reference_prefix(site_name: str) -> str:
    """The default incident reference prefix: the first three letters of the site's name (``Kirkby Refuge
    Points`` -> ``KIR``), ``REF`` when it has none."""
    letters = "".join(c for c in site_name if c.isascii() and c.isalpha()).upper()
    return letters[:3] or "REF"


def _check_site_path(path: Path) -> None:
    """Every generated file names the site file in its header: a path with a line break would write a line
    of its own there (and into every message that names the file)."""
    for name in (str(path), str(path.resolve())):
        bad = control_character(name)
        if bad:
            raise ConfigError([Problem(printable(name), 1, "(file)", f"the site file's path holds a control character "
                                       f"({bad}); rename the file or its folder")])


def _mode(path: Path) -> int:
    try:
        return path.lstat().st_mode
    except OSError:  # gone since it was read: reading it again will say so
        return 0


class _Builder:
    def __init__(self, src: Source, problems: list[Problem], check_secrets: bool, only_post: str | None = None) -> None:
        self.src, self.problems = src, problems
        # With only_post, every other secret is left unread: on a post those files are not there, by design.
        self.check_secrets = check_secrets and only_post is None
        self.only_post = only_post if check_secrets else None
        self.extensions: dict[str, str] = {}
        self.transport: str | None = None  # pbx.transport, once read: posts depend on it
        self.ids: dict[str, set[str]] = {}
        self.warnings: list[Problem] = []

    def site(self) -> Site | None:
        top = Reader(self.src, "", self.src.data, self.problems)
        name = top.child("site", required=True)
        site_name = name.text("name", required=True) or ""
        prefix = name.text("reference_prefix", pattern=PREFIX,
                           hint="must be 1 to 8 capital letters and digits, starting with a letter (KIR)")
        # The picture is checked where the sidecar's files are (the sidecar, `config check`), not on a post.
        plan = read_plan(name.child("plan"), check_file=self.check_secrets) if name.has("plan") else None
        name.done()
        pbx = self.pbx(top.child("pbx", required=True))
        queue = self.queue(top.child("queue", required=True))
        self_test = self.self_test(top.child("self_test", required=True))
        desks = self.many(top, "desks", self.desk)
        posts = self.many(top, "posts", self.post)
        if not desks:
            top.fail("desks", "at least one desk is needed to answer calls")
        if not posts:
            top.fail("posts", "at least one post is needed")
        elif self.only_post is not None and self.only_post not in self.ids.get("posts", set()):
            top.fail("posts", f"no post with id {self.only_post!r} (posts: {', '.join(p.id for p in posts)})")
        self.check_pins(top, posts)
        sidecar = self.sidecar(top.child("sidecar")) if top.has("sidecar") else None
        cctv = self.many(top, "cctv", self.target)
        prompts = top.path_value("prompts_dir")
        if prompts is not None and not prompts.is_dir():
            top.fail("prompts_dir", f"{prompts} is not a directory")
        top.done()
        if self.problems or pbx is None or queue is None or self_test is None:
            return None
        if plan is not None:
            self.warnings += off_plan(plan, posts, self.src.problem)
        return Site(Path(self.src.file).resolve(), site_name, pbx, queue, self_test, tuple(desks),
                    tuple(posts), sidecar, tuple(cctv), prompts, prefix or reference_prefix(site_name), plan)

    # -- helpers ---------------------------------------------------------------------------------
    def many(self, top: Reader, key: str, build: Callable[[Reader], Any]) -> list[Any]:
        out = []
        for i, item in top.items(key):
            r = Reader(self.src, f"{top.at(key)}[{i}]", item, self.problems)
            built = build(r)
            r.done()
            if built is not None:
                out.append(built)
        return out

    def claim(self, r: Reader, kind: str, key: str, value: str | None) -> str | None:
        """Ids (and target names) are unique per kind."""
        if value is None:
            return None
        seen = self.ids.setdefault(kind, set())
        if value in seen:
            r.fail(key, f"{value!r} is used twice in {kind}")
            return None
        seen.add(value)
        return value

    def extension(self, r: Reader, key: str, owner: str) -> str | None:
        value = r.digits(key, required=True)
        if value is None:
            return None
        if value in self.extensions:
            r.fail(key, f"extension {value} is already used by {self.extensions[value]}")
            return None
        self.extensions[value] = owner
        return value

    def secret(self, r: Reader, key: str = "secret", kind: str = "password", *, required: bool = True) -> Secret | None:
        file_key, env_key = f"{key}_file", f"{key}_env"
        if r.has(key):
            r.fail(key, f"secrets never go in the site file: use {file_key} (a path) or {env_key}")
            return None
        has_file, has_env = r.has(file_key), r.has(env_key)
        if has_file and has_env:
            r.fail(file_key, f"give {file_key} or {env_key}, not both")
            return None
        if not has_file and not has_env:
            if required:
                r.fail(file_key, f"is required (or {env_key})")
            return None
        if has_file:
            secret = Secret(file=r.path_value(file_key), kind=kind)
            where = file_key
        else:
            env = r.text(env_key, pattern=ENV, hint="is not an environment variable name")
            if env is None:
                return None
            secret = Secret(env=env, kind=kind)
            where = env_key
        if self.check_secrets:
            self.check_secret_value(r, where, secret)
        return secret

    def check_secret_value(self, r: Reader, key: str, secret: Secret) -> None:
        try:
            value = secret.read()
        except RefugeError as exc:
            missing = secret.file is not None and not os.path.lexists(secret.file)
            hint = "; run: sip-refuge secrets init SITE" if missing else ""
            if missing and self.only_post is not None:
                hint = "; copy this post's secret from the control room (never run `secrets init` on a post)"
            r.fail(key, f"{exc}{hint}")
            return
        if secret.file is not None and _mode(secret.file) & 0o077:
            r.fail(key, f"{secret.file} is readable by other users: chmod 600 it")
        bare = value.removeprefix("whsec_")
        if len(bare) < MIN_SECRET:
            r.fail(key, f"secret in {secret.describe()} is too short ({len(bare)} characters; at least {MIN_SECRET})")
        elif bare.lower() in WELL_KNOWN or len(set(bare)) < 4:
            r.fail(key, f"secret in {secret.describe()} is a well-known or trivial value")

    def url(self, r: Reader, key: str, schemes: tuple[str, ...], *, required: bool = True) -> str | None:
        value = r.text(key, required=required)
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in schemes or not parts.hostname:
            r.fail(key, f"{value!r} must be a {' or '.join(s + '://' for s in schemes)} URL with a host")
            return None
        if parts.password:
            r.fail(key, "the URL holds a password: secrets never go in the site file; "
                        "give the user in the URL and the password as password_file or password_env")
            return None
        return value

    # -- sections --------------------------------------------------------------------------------
    def pbx(self, r: Reader) -> Pbx | None:
        host = r.text("host", required=True, pattern=HOST, hint="is not a host name or address")
        port = r.integer("sip_port", 5060, low=1, high=65535)
        transport = self.transport = r.choice("transport", ("udp", "tcp", "tls"), "udp")
        secondary = r.text("secondary_host", pattern=HOST, hint="is not a host name or address")
        bind = r.text("bind", "127.0.0.1", pattern=HOST, hint="is not an address")
        rtp_start = r.integer("rtp_start", 10000, low=1024, high=65000)
        rtp_end = r.integer("rtp_end", 20000, low=1024, high=65535)
        if rtp_start is not None and rtp_end is not None and rtp_end <= rtp_start:
            r.fail("rtp_end", "must be above rtp_start")
        qualify = r.integer("qualify_frequency", 30, low=5, high=3600)
        tls = None
        if transport == "tls" or r.has("tls"):
            tls = self.tls(r.child("tls", required=transport == "tls"), transport)
        networks = r.child("networks")
        nets = Networks(self.cidrs(networks, "posts"), self.cidrs(networks, "desks"))
        networks.done()
        register = r.duration("register_interval", low=5, high=3600)
        if secondary is not None and host is not None and secondary == host:
            r.fail("secondary_host", f"{secondary!r} is pbx.host itself: the secondary PBX of a pair is another host "
                                     "(on loopback another address, such as 127.0.0.2)")
            secondary = None
        a = r.child("ami", required=True)
        ami_host = a.text("host", "127.0.0.1", pattern=HOST, hint="is not an address")
        ami_secondary = a.text("secondary_host", pattern=HOST, hint="is not a host name or address")
        if ami_secondary is not None and secondary is None:
            a.fail("secondary_host", "there is no secondary PBX: set pbx.secondary_host first")
        ami = Ami(a.text("username", "sidecar", pattern=ID, hint=ID_HINT) or "", self.secret(a) or Secret(),
                  ami_host or "127.0.0.1", a.integer("port", 5038, low=1, high=65535) or 5038, ami_secondary)
        a.done()
        r.done()
        if host is None or port is None or transport is None:
            return None
        return Pbx(host, port, transport, ami, secondary, bind or "127.0.0.1", rtp_start or 10000,
                   rtp_end or 20000, tls, nets, qualify or 30, register)

    def tls(self, t: Reader, transport: str | None) -> Tls | None:
        cert, key = t.path_value("cert_file", required=True), t.path_value("key_file", required=True)
        ca = t.path_value("ca_file")
        for name, file in (("cert_file", cert), ("key_file", key), ("ca_file", ca)):
            if file is not None and ";" in str(file):
                t.fail(name, f"{file}: Asterisk reads ';' as the start of a comment; rename the file")
                cert = key = None
        ca_key = t.path_value("ca_key_file")
        if ca_key is None and ca is not None:
            ca_key = ca.with_suffix(".key") if ca.suffix != ".key" else ca.with_name(ca.name + ".key")
        if ca_key is not None and ca_key in (cert, key, ca):
            t.fail("ca_key_file", f"{ca_key} is also the PBX's certificate, key or CA file: give the CA's private "
                                  "key a file of its own")
        tls_port = t.integer("port", 5061, low=1, high=65535)
        desks = t.choice("desks", ("udp", "tls"), "udp")
        if desks == "tls" and transport not in (None, "tls"):
            t.fail("desks", "desks on TLS need pbx.transport: tls")
        t.done()
        if cert and key and tls_port and desks:
            return Tls(cert, key, ca, tls_port, ca_key, desks)
        return None

    def cidrs(self, r: Reader, key: str) -> tuple[str, ...]:
        out = []
        for i, net in enumerate(r.strings(key)):
            try:
                out.append(str(ipaddress.ip_network(net, strict=False)))
            except ValueError:
                r.fail(f"{key}[{i}]", f"{net!r} is not a network (example: 10.20.5.0/24)")
        return tuple(out)

    def queue(self, r: Reader) -> Queue | None:
        name = r.text("name", required=True, pattern=ID, hint=ID_HINT)
        ext = self.extension(r, "extension", "queue.extension")
        ring = r.duration("ring_timeout", 15, low=5, high=300)
        wait = r.duration("max_wait", 30, low=5, high=600)
        overflow = self.extension(r, "overflow", "queue.overflow")
        retry = r.duration("retry", 2, low=0, high=60)
        prio = r.integer("priority", 10, low=0, high=1000)
        announce = r.duration("announce_frequency", 20, low=0, high=600)
        r.done()
        if None in (name, ext, ring, wait, overflow, retry, prio, announce):
            return None
        return Queue(name or "", ext or "", ring or 0, wait or 0, overflow or "", retry or 0, prio or 0, announce or 0)

    def self_test(self, r: Reader) -> SelfTest | None:
        ext = self.extension(r, "extension", "self_test.extension")
        # EN 81-28 asks for an automatic test alarm at least every 3 days.
        interval = r.duration("interval", 86400, low=60, high=3 * 86400)
        r.done()
        return SelfTest(ext, interval) if ext and interval else None

    def desk(self, r: Reader) -> Desk | None:
        desk_id = self.claim(r, "desks", "id", r.text("id", required=True, pattern=ID, hint=ID_HINT))
        name = r.text("name", required=True)
        ext = self.extension(r, "extension", f"desk {desk_id}")
        secret = self.secret(r)
        workstation = r.text("workstation")
        if None in (desk_id, name, ext, secret):
            return None
        assert desk_id and name and ext and secret
        return Desk(desk_id, name, ext, secret, workstation)

    def post(self, r: Reader) -> Post | None:
        post_id = self.claim(r, "posts", "id", r.text("id", required=True, pattern=ID, hint=ID_HINT))
        name = r.text("name", required=True)
        ext = self.extension(r, "extension", f"post {post_id}")
        loc = r.child("location", required=True)
        location = Location(loc.text("address", required=True) or "", loc.number("lat", low=-90, high=90),
                            loc.number("lon", low=-180, high=180))
        loc.done()
        secret = self.secret(r)
        if secret is not None and post_id is not None and post_id == self.only_post:
            self.check_secret_value(r, "secret_file" if secret.file is not None else "secret_env", secret)
        camera = None
        if r.has("camera"):
            c = r.child("camera")
            rtsp = self.url(c, "rtsp_url", ("rtsp", "rtsps", "http", "https"))
            user = urlsplit(rtsp).username if rtsp else None
            pw = self.secret(c, "password", required=False)
            if pw and not user:
                c.fail("password_file", "a camera password needs a user in rtsp_url (rtsp://user@host/...)")
            c.done()
            camera = Camera(rtsp, user, pw) if rtsp else None
        g = r.child("gpio", required=True)
        pins = {k: g.integer(k, required=k != "tamper", low=GPIO_PINS.start, high=GPIO_PINS.stop - 1)
                for k in ("button", "yellow", "green", "red", "tamper")}
        g.done()
        backend = r.choice("sip_backend", ("pjsua2", "pyvoip"), "pjsua2")
        if backend == "pyvoip" and self.transport == "tls":
            r.fail("sip_backend", "pyvoip cannot do TLS or SRTP, and pbx.transport is tls: use sip_backend: pjsua2 "
                                  "for this post (or a site without TLS; calls then go in clear)")
            backend = None
        answer = r.choice("auto_answer", ("after_alarm", "always", "never"), "after_alarm")
        window = r.duration("auto_answer_window", 600, low=10, high=86400)
        max_call = r.duration("max_call", 1800, low=60, high=86400)
        control = r.integer("control_port", low=1024, high=65535)
        if None in (post_id, name, ext, secret, backend, answer, window, max_call) or \
                any(pins[k] is None for k in ("button", "yellow", "green", "red")):
            return None
        assert post_id and name and ext and secret and backend and answer and window and max_call
        gpio = Gpio(pins["button"] or 0, pins["yellow"] or 0, pins["green"] or 0, pins["red"] or 0, pins["tamper"])
        return Post(post_id, name, ext, location, secret, gpio, camera, backend, answer, window, max_call, control)

    def check_pins(self, top: Reader, posts: list[Post]) -> None:
        for i, post in enumerate(posts):
            pins = [p for p in (post.gpio.button, post.gpio.yellow, post.gpio.green, post.gpio.red,
                                post.gpio.tamper) if p is not None]
            if len(set(pins)) != len(pins):
                top.fail(f"posts[{i}].gpio", "each pin may be used once per post")

    def sidecar(self, r: Reader) -> Sidecar | None:
        listen = r.text("listen", "127.0.0.1:8080", pattern=r"[A-Za-z0-9.\-]+:\d{1,5}",
                        hint="must be HOST:PORT, for example 127.0.0.1:8080")
        token = self.secret(r, "token", kind="token")
        database = r.path_value("database", "var/sip-refuge.sqlite3")
        public = self.url(r, "public_url", ("http", "https"), required=False)
        grace = r.duration("offline_grace", 30, low=0, high=3600)
        interval = r.duration("camera_interval", 60, low=5, high=3600)
        retention = section.retention(r.child("retention"))
        limits = section.http_limits(r.child("limits"))
        reasons = section.close_reasons(r) if r.has("close_reasons") else DEFAULT_CLOSE_REASONS
        users = section.users_file(r, self.check_secrets)
        idle = r.duration("session_idle", 1800, low=60, high=86400) or 1800
        lifetime = r.duration("session_lifetime", 12 * 3600, low=300, high=7 * 86400) or 12 * 3600
        if idle > lifetime:
            r.fail("session_idle", f"{idle} s is longer than session_lifetime ({lifetime} s)")
        monitoring = self.cidrs(r, "monitoring_networks") if r.has("monitoring_networks") else MONITORING_NETWORKS
        proxies = self.cidrs(r, "proxies")
        r.done()
        if listen is None or token is None or database is None:
            return None
        host, _, port = listen.rpartition(":")
        if not 1 <= int(port) <= 65535:
            r.fail("listen", f"port {port} is out of range")
            return None
        return Sidecar(host, int(port), token, database, public, grace or 0, interval or 60, retention,
                       limits, reasons, users, idle, lifetime, monitoring, proxies)

    def target(self, r: Reader) -> CctvTarget | None:
        kind_name = r.choice("type", (*cctv.KINDS, *cctv.DEPRECATED), required=True)
        if kind_name in cctv.DEPRECATED:
            # An old site file keeps working: the entry is read (so its mistakes still show) and left out.
            self.warnings.append(self.src.problem(r.at("type"), f"{kind_name!r} is deprecated: "
                                                                f"{cctv.DEPRECATED[kind_name]}"))
            r.text("name", kind_name, pattern=ID, hint=ID_HINT)
            return None
        name = self.claim(r, "cctv", "name", r.text("name", kind_name, pattern=ID, hint=ID_HINT))
        kind = cctv.kind(kind_name or "")
        if kind is None:
            return None
        # At most 10: an HTTP target keeps 10 connections open (requests' pool); more would open and drop one
        # per event.
        concurrency = r.integer("concurrency", TARGET_CONCURRENCY, low=1, high=10) or TARGET_CONCURRENCY
        options, secret = kind.read(r, self)
        if options is None or name is None:
            return None
        return CctvTarget(kind.name, name, options, secret, concurrency)

    def plain_mapping(self, r: Reader) -> dict[str, str]:
        """A mapping of free names to one-line values (webhook headers, Nx camera ids)."""
        r.known.update(r.value)
        return {k: str(v) for k, v in r.value.items() if r.clean(k, str(v))}
