"""Who may read and write on the sidecar: operators' logins and sessions, the admin token, monitoring networks,
trusted reverse proxies, and the audit log of it all. The web layer (:mod:`sip_refuge.sidecar.web.guard`)
asks this; nothing here knows about HTTP.

Roles, kept to two: ``operator`` reads every page, camera, stream and export and makes the operators'
writes; ``admin`` may also read the audit log. The bearer token (``sidecar.token_file``) is for automation
and acts as an admin; posts' telemetry keeps its per-post token.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from sip_refuge.config.model import MONITORING_NETWORKS, Site
from sip_refuge.sidecar.access.audit import AuditLog
from sip_refuge.sidecar.access.operators import Operators
from sip_refuge.sidecar.access.sessions import Session, Sessions
from sip_refuge.sidecar.access.throttle import LoginThrottle
from sip_refuge.sidecar.store import Store

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
OPERATOR, ADMIN = "operator", "admin"

__all__ = ["ADMIN", "OPERATOR", "Access", "AuditLog", "LoginThrottle", "Operators", "Session", "Sessions",
           "in_networks", "networks"]


def networks(cidrs: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(n, strict=False) for n in cidrs)


def in_networks(address: str, nets: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack socket's view of an IPv4 client
    return any(ip in net for net in nets)


@dataclass
class Access:
    token: str
    audit: AuditLog
    operators: Operators = field(default_factory=lambda: Operators(None))
    sessions: Sessions = field(default_factory=lambda: Sessions(30 * 60, 12 * 3600))
    throttle: LoginThrottle = field(default_factory=LoginThrottle)
    monitoring: tuple[Network, ...] = networks(MONITORING_NETWORKS)
    proxies: tuple[Network, ...] = ()

    @classmethod
    def for_site(cls, site: Site, store: Store, token: str) -> Access:
        conf = site.sidecar
        if conf is None:
            return cls(token, AuditLog(store))
        return cls(token, AuditLog(store), Operators(conf.users_file),
                   Sessions(conf.session_idle, conf.session_lifetime), LoginThrottle(),
                   networks(conf.monitoring_networks), networks(conf.proxies))

    def current(self, session: Session) -> bool:
        """The session's user is still in the users file with the same password hash and role."""
        user = self.operators.current().get(session.user)
        return user is not None and user.hash == session.credential and user.role == session.role
