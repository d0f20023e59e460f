"""The site file as frozen, typed objects. Every part of sip-refuge reads the site through these."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

from sip_refuge.config.files import checked_secret, read_secret_file
from sip_refuge.errors import Problem, RefugeError


@dataclass(frozen=True)
class Secret:
    """Where a secret lives: a file (relative to the site file) or an environment variable.

    The value is never kept in the object, so printing a site never prints a secret.
    """

    file: Path | None = None
    env: str | None = None
    kind: str = "password"  # password | webhook (Standard Webhooks whsec_ key) | token

    def read(self) -> str:
        if self.file is not None:
            return read_secret_file(self.file)
        if self.env is not None:
            value = os.environ.get(self.env)
            if value is None:
                raise RefugeError(f"environment variable {self.env} (a secret) is not set")
            return checked_secret(value, f"environment variable {self.env}")
        raise RefugeError("no secret configured")

    def describe(self) -> str:
        return f"file {self.file}" if self.file is not None else f"environment variable {self.env}"


@dataclass(frozen=True)
class Tls:
    """``pbx.tls``: the PBX's certificate and key, the site CA posts check it against, and who uses TLS."""

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None
    port: int = 5061
    ca_key_file: Path | None = None  # the site CA's private key (``secrets init``); never goes to a post
    desks: str = "udp"  # udp: desks stay on plain SIP/RTP inside the control room | tls: TLS and SRTP too


@dataclass(frozen=True)
class Networks:
    """Networks each role may register from; empty means no ACL is rendered for that role."""

    posts: tuple[str, ...] = ()
    desks: tuple[str, ...] = ()


@dataclass(frozen=True)
class Ami:
    username: str
    secret: Secret
    host: str = "127.0.0.1"
    port: int = 5038
    secondary_host: str | None = None  # where the sidecar reaches the secondary's AMI; None: pbx.secondary_host


# The two PBXs of a pair. A site without ``pbx.secondary_host`` has only the primary.
PRIMARY = "primary"
SECONDARY = "secondary"
ROLES = (PRIMARY, SECONDARY)
_WILDCARDS = frozenset({"0.0.0.0", "::", "[::]"})


@dataclass(frozen=True)
class Pbx:
    host: str
    sip_port: int
    transport: str  # udp | tcp | tls
    ami: Ami
    secondary_host: str | None = None
    bind: str = "127.0.0.1"
    rtp_start: int = 10000
    rtp_end: int = 20000
    tls: Tls | None = None
    networks: Networks = field(default_factory=Networks)
    qualify_frequency: int = 30
    register_interval: int | None = None  # seconds between a post's REGISTERs to each PBX; None: the backend's

    @property
    def roles(self) -> tuple[str, ...]:
        """``("primary",)``, or ``("primary", "secondary")`` for a pair."""
        return ROLES if self.secondary_host else (PRIMARY,)

    def host_of(self, role: str) -> str:
        """Where posts and desks send SIP to reach the PBX of ``role``."""
        if role == PRIMARY:
            return self.host
        if role == SECONDARY and self.secondary_host:
            return self.secondary_host
        raise RefugeError(f"no {role} PBX: pbx.secondary_host is not set" if role == SECONDARY
                          else f"unknown PBX role {role!r} (primary, secondary)")

    def role_of(self, host: str) -> str:
        """The role of the PBX at ``host`` (as the site spells it); the primary for any other name."""
        return SECONDARY if self.secondary_host and host == self.secondary_host and host != self.host else PRIMARY

    def bind_of(self, role: str) -> str:
        """The address the PBX of ``role`` binds SIP (and, in the sandbox, AMI) to: ``pbx.bind`` for the primary;
        for the secondary the same when it is a wildcard (0.0.0.0, ::), else ``pbx.secondary_host``: the two
        run on different hosts (or, on loopback, different addresses with the same ports)."""
        if role == PRIMARY or self.bind in _WILDCARDS:
            return self.bind
        return self.host_of(role)

    def ami_of(self, role: str) -> Ami:
        """The AMI the sidecar follows for ``role``: the same user, secret and port on both PBXs."""
        if role == PRIMARY:
            return self.ami
        return replace(self.ami, host=self.ami.secondary_host or self.host_of(role))


@dataclass(frozen=True)
class Queue:
    name: str
    extension: str
    ring_timeout: int
    max_wait: int
    overflow: str
    retry: int = 2
    priority: int = 10
    announce_frequency: int = 20


@dataclass(frozen=True)
class SelfTest:
    extension: str
    interval: int  # seconds


@dataclass(frozen=True)
class Desk:
    id: str
    name: str
    extension: str
    secret: Secret
    workstation: str | None = None


@dataclass(frozen=True)
class Location:
    address: str
    lat: float | None = None
    lon: float | None = None


@dataclass(frozen=True)
class Camera:
    rtsp_url: str
    username: str | None = None
    password: Secret | None = None


@dataclass(frozen=True)
class Gpio:
    button: int
    yellow: int
    green: int
    red: int
    tamper: int | None = None


@dataclass(frozen=True)
class Post:
    id: str
    name: str
    extension: str
    location: Location
    secret: Secret
    gpio: Gpio
    camera: Camera | None = None
    sip_backend: str = "pjsua2"  # pjsua2 | pyvoip
    auto_answer: str = "after_alarm"  # after_alarm | always | never
    auto_answer_window: int = 600  # seconds after an alarm call in which call-backs are auto-answered
    max_call: int = 1800  # seconds; a call is ended after this long
    control_port: int | None = None  # local control socket of a mock-GPIO agent


@dataclass(frozen=True)
class Retention:
    """How long the sidecar's database keeps things (seconds). Incidents, the legal record, are kept for ever
    unless ``incidents`` is set."""

    events: int = 400 * 86400  # events sent to CCTV targets, with their delivery records
    telemetry: int = 30 * 86400  # post agents' reports
    telemetry_per_post: int = 16 * 1024 * 1024  # bytes of the newest reports kept per post
    incidents: int | None = None  # ended incidents and their timelines; None: kept for ever
    audit: int = 400 * 86400  # the audit log's logins, logouts and operators' writes


@dataclass(frozen=True)
class HttpLimits:
    """The sidecar's HTTP caps and deadlines (``sidecar.limits``): no client may exhaust the server."""

    connections: int = 1000  # open connections in all
    per_client: int = 32  # open connections from one address
    reserve: int = 64  # of ``connections``: only posts' networks and loopback may use these
    workers: int = 16  # request threads for the app; a quarter of them only for telemetry and health checks
    streams: int = 500  # open event streams and live views together
    live_views: int = 50  # open live camera views
    header_timeout: int = 10  # seconds for a request's headers to arrive, and again for its body
    idle_timeout: int = 30  # seconds a kept-alive connection may wait for its next request


MONITORING_NETWORKS = ("127.0.0.1/32", "::1/128")  # the sidecar's own host


@dataclass(frozen=True)
class CloseReason:
    """One reason an operator may give when closing an incident (``sidecar.close_reasons``)."""

    id: str  # stable: the API, the export, the metrics label and the CCTV event use it
    label: str  # what the operator reads


# The rail regulator's help-point review asks control rooms to report calls by reason; these cover a street
# refuge's usual outcomes. A site lists its own in ``sidecar.close_reasons``.
DEFAULT_CLOSE_REASONS = (
    CloseReason("assistance", "Assistance given"),
    CloseReason("police", "Police dispatched"),
    CloseReason("ambulance", "Ambulance"),
    CloseReason("advice", "Advice"),
    CloseReason("no-one-there", "No one there"),
    CloseReason("misuse", "Misuse"),
    CloseReason("test", "Test"),
)


@dataclass(frozen=True)
class Sidecar:
    host: str
    port: int
    token: Secret
    database: Path
    public_url: str | None = None
    offline_grace: int = 30
    camera_interval: int = 60
    retention: Retention = Retention()
    limits: HttpLimits = field(default_factory=HttpLimits)
    close_reasons: tuple[CloseReason, ...] = DEFAULT_CLOSE_REASONS
    users_file: Path | None = None  # operators who may log in to the pages; None: only the bearer token reads
    session_idle: int = 30 * 60  # seconds without a request (an open page's stream counts) before logout
    session_lifetime: int = 12 * 3600  # seconds from login to logout, whatever happens (one shift)
    monitoring_networks: tuple[str, ...] = MONITORING_NETWORKS  # may read /healthz and /metrics unauthenticated
    proxies: tuple[str, ...] = ()  # reverse proxies whose X-Forwarded-For/-Proto are believed


@dataclass(frozen=True)
class TargetOptions:
    """The type-specific keys of one CCTV target, validated: each kind subclasses this (``config/cctv``)."""


TARGET_CONCURRENCY = 8  # ``cctv[].concurrency`` when a site file does not say


@dataclass(frozen=True)
class CctvTarget:
    """One CCTV/VMS target; ``options`` is its kind's options dataclass (``sip_refuge.config.cctv``)."""

    type: str  # a kind of sip_refuge.config.cctv.KINDS: webhook | milestone | nx | vlc
    name: str
    options: TargetOptions
    secret: Secret | None = None
    concurrency: int = 8  # TARGET_CONCURRENCY: deliveries in flight at once, each of a different incident or post


@dataclass(frozen=True)
class Plan:
    """``site.plan``: a picture of the site (north up) and the latitudes and longitudes of its edges; the
    dashboard draws the posts on it. Without one it draws a plain plan of the posts alone."""

    image: Path
    south: float
    west: float
    north: float
    east: float


@dataclass(frozen=True)
class Site:
    path: Path
    name: str
    pbx: Pbx
    queue: Queue
    self_test: SelfTest
    desks: tuple[Desk, ...]
    posts: tuple[Post, ...]
    sidecar: Sidecar | None
    cctv: tuple[CctvTarget, ...]
    prompts_dir: Path | None = None
    reference_prefix: str = "REF"  # incident references read PREFIX-0412 (site.reference_prefix)
    plan: Plan | None = None  # the dashboard's site plan background (site.plan)
    # Things that still work but should change (a deprecated key or target type), located like mistakes:
    # ``config check`` prints them and the sidecar logs them at start.
    warnings: tuple[Problem, ...] = ()

    @property
    def close_reasons(self) -> tuple[CloseReason, ...]:
        return self.sidecar.close_reasons if self.sidecar else DEFAULT_CLOSE_REASONS

    @cached_property
    def _posts_by_id(self) -> dict[str, Post]:
        return {p.id: p for p in self.posts}

    def post(self, post_id: str) -> Post:
        # By index: the pages and /metrics look up every post of a 1,000-post site on each request.
        post = self._posts_by_id.get(post_id)
        if post is not None:
            return post
        raise RefugeError(f"{self.path}: no post with id {post_id!r} (posts: {', '.join(p.id for p in self.posts)})")

    def desk(self, desk_id: str) -> Desk:
        for desk in self.desks:
            if desk.id == desk_id:
                return desk
        raise RefugeError(f"{self.path}: no desk with id {desk_id!r} (desks: {', '.join(d.id for d in self.desks)})")

    def secrets(self) -> list[tuple[str, Secret]]:
        """Every secret the site refers to, with the dotted path naming it."""
        out: list[tuple[str, Secret]] = [("pbx.ami", self.pbx.ami.secret)]
        out += [(f"desks.{d.id}", d.secret) for d in self.desks]
        out += [(f"posts.{p.id}", p.secret) for p in self.posts]
        out += [(f"posts.{p.id}.camera", p.camera.password) for p in self.posts if p.camera and p.camera.password]
        if self.sidecar:
            out.append(("sidecar.token", self.sidecar.token))
        out += [(f"cctv.{t.name}", t.secret) for t in self.cctv if t.secret]
        return out
