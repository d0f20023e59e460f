"""Who a post talks SIP with: its own PBX, and only through its own registration (issue 8).

A post stands in a public street on a network nobody vouches for. Both SIP backends put every request
through one :class:`Gate` before anything else (the state machine included) hears of it:

* the source address must be one of the PBX's (``pbx.host`` and ``pbx.secondary_host``, resolved);
* a new call must be aimed at the contact the post registered (``sip:<post id>@<its address>``): a
  call-back reaches the post through its registration, never by someone dialling its address;
* its media must go to the PBX too: Asterisk anchors the media of every post call (``direct_media=no``),
  so an offer whose ``c=`` names another address is someone trying to turn the microphone towards
  themselves (with a forged source address, UDP needs no reply to do that).

What was turned away, and what could not even be read, is counted (``sip-refuge status``, telemetry) and
logged at most once per :data:`LOG_EVERY` seconds per kind, so a flood cannot fill the disk with log lines.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import threading
import time
from typing import Any

from sip_refuge.config.model import Pbx
from sip_refuge.errors import SipError

LOG_EVERY = 10.0  # seconds between warnings of one kind; the rest go to debug


def resolve(host: str) -> frozenset[str]:
    """Every address ``host`` has (an IP literal is itself); OSError when it does not resolve."""
    infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_UDP)
    return frozenset(normal_ip(str(info[4][0])) for info in infos)


def pbx_addresses(pbx: Pbx, log: logging.Logger | logging.LoggerAdapter[Any]) -> frozenset[str]:
    """The addresses a post accepts SIP and RTP from: ``pbx.host`` (must resolve) and ``pbx.secondary_host``."""
    try:
        found = set(resolve(pbx.host))
    except OSError as exc:
        raise SipError(f"pbx.host {pbx.host!r} does not resolve ({exc}); the post accepts SIP from nobody "
                       "until it does") from None
    if pbx.secondary_host:
        try:
            found |= resolve(pbx.secondary_host)
        except OSError as exc:  # the primary works: run without the failover rather than not at all
            log.warning("pbx.secondary_host %r does not resolve (%s); only %s is trusted", pbx.secondary_host,
                        exc, pbx.host)
    return frozenset(found)


def local_address_for(host: str, port: int) -> str:
    """The local address the kernel routes to ``host`` from: where a post binds SIP and RTP (never 0.0.0.0)."""
    probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect((host, port))  # UDP connect sends nothing; it only picks the route
        return str(probe.getsockname()[0])
    except OSError as exc:
        raise SipError(f"no route to the PBX {host}:{port} ({exc}); the network may not be up yet") from None
    finally:
        probe.close()


def normal_ip(text: str) -> str:
    """An address in one spelling (``[::1]`` and ``::1`` alike, IPv4-mapped IPv6 as IPv4); other text as is."""
    text = text.strip().strip("[]")
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return text.lower()
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip)


def split_hostport(text: str, default_port: int | None = None) -> tuple[str, int | None]:
    """``1.2.3.4:5060`` / ``[::1]:5060`` / ``host`` as (normal host, port or ``default_port``)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    return normal_ip(host), int(port) if port.isascii() and port.isdigit() else default_port


_URI = re.compile(r"^(sips?):(?:([^@;?]*)@)?(\[[^\]]*\]|[^:;?>]+)(?::(\d{1,5}))?", re.IGNORECASE)


def parse_uri(uri: str) -> tuple[str, str, int] | None:
    """(user, host, port) of a SIP URI (``<...>`` allowed); the port defaults to 5060 (5061 for sips); None if
    it is not a SIP URI at all."""
    uri = uri.strip()
    if uri.startswith("<"):
        uri = uri[1:].split(">", 1)[0]
    match = _URI.match(uri)
    if match is None:
        return None
    scheme, user, host, port = match.groups()
    default = 5061 if scheme.lower() == "sips" or "transport=tls" in uri.lower() else 5060
    return user or "", normal_ip(host), int(port) if port else default


def sdp_addresses(sdp: str) -> list[str]:
    """Every ``c=`` address of an SDP body (session and media level)."""
    return [normal_ip(m) for m in re.findall(r"^c=IN\s+IP[46]\s+([^\s/]+)", sdp, re.MULTILINE)]


def via_public_address(via: str) -> tuple[str, int] | None:
    """Where the registrar saw us: ``received`` and ``rport`` of the top Via of a REGISTER's response."""
    top = via.split(",", 1)[0]
    received = re.search(r";\s*received=([^;,\s]+)", top)
    rport = re.search(r";\s*rport=(\d{1,5})", top)
    if received is None and rport is None:
        return None
    sent_by = re.match(r"\s*SIP/2\.0/\w+\s+([^;\s]+)", top)
    host, port = split_hostport(sent_by.group(1) if sent_by else "", 5060)
    return (normal_ip(received.group(1)) if received else host,
            int(rport.group(1)) if rport else (port or 5060))


class Counters:
    """What a backend turned away or could not read, by kind, with a warning per kind at most every
    :data:`LOG_EVERY` seconds (the rest at debug level). Any thread may count."""

    def __init__(self, log: logging.Logger | logging.LoggerAdapter[Any]) -> None:
        self.log = log
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._logged: dict[str, float] = {}

    def count(self, kind: str, message: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            total = self._counts[kind] = self._counts.get(kind, 0) + 1
            loud = now - self._logged.get(kind, -LOG_EVERY) >= LOG_EVERY
            if loud:
                self._logged[kind] = now
        if loud:
            self.log.warning(message + " [%s: %d so far]", *args, kind, total, exc_info=exc_info)
        else:
            self.log.debug(message, *args, exc_info=exc_info)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class Gate:
    """The questions every request from the network is asked; see the module docstring.

    ``contacts`` are the (host, port) pairs a call-back's Request-URI may name: the address the post's SIP
    socket is bound to, and where the registrar saw it (behind NAT) as learnt from its REGISTER responses.
    """

    def __init__(self, user: str, trusted: frozenset[str], counters: Counters) -> None:
        self.user = user
        self.trusted = frozenset(normal_ip(a) for a in trusted)
        self.counters = counters
        self.contacts: set[tuple[str, int]] = set()

    def add_contact(self, host: str, port: int) -> None:
        self.contacts.add((normal_ip(host), port))

    def learn_registration(self, via: str) -> None:
        """Note where the registrar saw the post (top Via of a 2xx to REGISTER)."""
        seen = via_public_address(via)
        if seen is not None and seen not in self.contacts:
            self.counters.log.info("the PBX sees this post at %s:%d", *seen)
            self.contacts.add(seen)

    def from_pbx(self, source_ip: str) -> bool:
        return normal_ip(source_ip) in self.trusted

    def refuse_stranger(self, source: str, what: str) -> bool:
        """Count and say so when ``source`` (an IP, or ``ip:port``) is not the PBX; True means turn it away."""
        host = split_hostport(source)[0] if source.count(":") == 1 or source.startswith("[") else normal_ip(source)
        if host in self.trusted:
            return False
        self.counters.count("refused", "%s from %s refused: not the PBX (%s)", what, source,
                            ", ".join(sorted(self.trusted)))
        return True

    def callback_refusal(self, request_uri: str, sdp: str) -> str | None:
        """Why a new call from the PBX is not a call-back through this post's registration, or None."""
        parsed = parse_uri(request_uri)
        if parsed is None:
            return f"Request-URI {request_uri[:80]!r} is not a SIP URI"
        user, host, port = parsed
        if user != self.user:
            return f"Request-URI {request_uri[:80]!r} is not for {self.user}"
        if (host, port) not in self.contacts:
            known = ", ".join(f"{h}:{p}" for h, p in sorted(self.contacts)) or "none yet"
            return f"Request-URI {request_uri[:80]!r} is not the contact this post registered ({known})"
        addresses = sdp_addresses(sdp)
        strangers = [a for a in addresses if a not in self.trusted]
        if strangers:
            return f"its media would go to {strangers[0]}, not to the PBX"
        return None

    def refuse_callback(self, source: str, request_uri: str, sdp: str) -> str | None:
        """Both checks for a new INVITE; counts and logs a refusal and returns its reason (None: accept)."""
        if self.refuse_stranger(source, "INVITE"):
            return "not the PBX"
        reason = self.callback_refusal(request_uri, sdp)
        if reason is not None:
            self.counters.count("refused", "INVITE from %s refused: %s", source, reason)
        return reason
