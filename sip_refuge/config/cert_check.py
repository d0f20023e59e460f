"""``config check`` on the PBX's certificate, key and CA: what the PBX would fail to load and what the posts
would refuse, before either happens."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sip_refuge.config.certs import RENEW, load_certs, load_key, pbx_names, same_key
from sip_refuge.config.model import Site
from sip_refuge.errors import RefugeError

if TYPE_CHECKING:
    from cryptography import x509

WARN_DAYS = 30  # warn this long before the PBX's certificate (or the CA) expires


@dataclass(frozen=True)
class Finding:
    """What ``config check`` has to say about one ``pbx.tls`` file; an error unless ``warning``."""

    key: str  # dotted path in the site file, e.g. pbx.tls.cert_file
    message: str
    warning: bool = False


def check_tls(site: Site, now: datetime | None = None) -> list[Finding]:
    """What is wrong (or soon will be) with the PBX's certificate, key and CA, as the PBX and the posts see them."""
    tls = site.pbx.tls
    if tls is None:
        return []
    now = now or datetime.now(UTC)
    out: list[Finding] = []
    if tls.ca_file is None and site.pbx.transport == "tls":
        out.append(Finding("pbx.tls.ca_file", "not set: posts then take any certificate on the PBX's TLS port, so "
                           "whoever gets the PBX's address gets the alarms; name a ca_file (secrets init makes a "
                           "site CA there)", warning=True))
    certs = _read(out, "pbx.tls.cert_file", tls.cert_file, load_certs)
    cert: x509.Certificate | None = certs[0] if certs else None  # the PBX's own; any others are its chain
    key = _read(out, "pbx.tls.key_file", tls.key_file, load_key)
    cas: list[x509.Certificate] = []
    if tls.ca_file is not None and cert is not None and not os.path.lexists(tls.ca_file):
        out.append(Finding("pbx.tls.ca_file", f"{tls.ca_file} does not exist: put there the certificate of the CA "
                           f"that signed {tls.cert_file} (posts check the PBX against it)"))
    elif tls.ca_file is not None:
        cas = _read(out, "pbx.tls.ca_file", tls.ca_file, load_certs) or []
    for name, path in (("pbx.tls.key_file", tls.key_file), ("pbx.tls.ca_key_file", tls.ca_key_file)):
        if path is not None and path.exists() and path.stat().st_mode & 0o077:
            out.append(Finding(name, f"{path} (a private key) is readable by other users: chmod 600 it"))
    if cert is None:
        return out
    if key is not None and not same_key(key, cert):
        out.append(Finding("pbx.tls.key_file", f"{tls.key_file} is not the private key of {tls.cert_file}"))
    if cas:
        issuer = next((ca for ca in cas if _issued(ca, cert)), None)
        if issuer is None:
            out.append(Finding("pbx.tls.cert_file", f"{tls.cert_file} is not signed by the CA in {tls.ca_file}: "
                               "posts refuse the PBX"))
        else:
            out += _validity("pbx.tls.ca_file", issuer, now, "make a new site CA and copy it to every post "
                                                              "(docs/admin-guide.md, Encrypted calls)")
    out += _validity("pbx.tls.cert_file", cert, now, f"renew it: {RENEW}")
    try:
        names = _names(cert)
    except ValueError as exc:  # an extension cryptography cannot parse: neither can the posts, likely
        return [*out, Finding("pbx.tls.cert_file", f"{tls.cert_file}: cannot read its names: {exc}")]
    for which, host in zip(("pbx.host", "pbx.secondary_host"), pbx_names(site), strict=False):
        if not _covers(names, host):
            out.append(Finding("pbx.tls.cert_file", f"{tls.cert_file} is for {', '.join(sorted(names)) or 'no name'}, "
                               f"not for {which} {host}: posts that check it against ca_file refuse the PBX; issue "
                               f"it for {host} ({RENEW} does)", warning=tls.ca_file is None))
    return out


def _issued(ca: x509.Certificate, cert: x509.Certificate) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _read(out: list[Finding], key: str, path: Path, load: Any) -> Any:
    if not os.path.lexists(path):
        out.append(Finding(key, f"{path} does not exist; run: sip-refuge secrets init SITE"))
        return None
    try:
        return load(path, key)
    except RefugeError as exc:
        out.append(Finding(key, str(exc)))
        return None


def _validity(key: str, cert: x509.Certificate, now: datetime, fix: str) -> list[Finding]:
    end, start = cert.not_valid_after_utc, cert.not_valid_before_utc
    if end <= now:
        return [Finding(key, f"the certificate expired on {end:%Y-%m-%d}: posts refuse it; {fix}")]
    out = []
    if end - now <= timedelta(days=WARN_DAYS):
        days = (end - now).days
        out.append(Finding(key, f"the certificate expires on {end:%Y-%m-%d} (in {days} days); {fix}", warning=True))
    if start > now:
        out.append(Finding(key, f"the certificate is valid only from {start:%Y-%m-%d %H:%M} UTC: is this "
                                "machine's clock right?", warning=True))
    return out


def _names(cert: x509.Certificate) -> set[str]:
    """The names pjsip accepts a server by (sip_transport_tls.c): subjectAltName DNS, IP and sip: URI host
    entries, else the subject's common name; compared exactly, without wildcards (RFC 5922, 7.2)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    names: set[str] = set()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        names |= {n.lower() for n in san.get_values_for_type(x509.DNSName)}
        names |= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
        names |= {u.split(":", 1)[1].lower() for u in san.get_values_for_type(x509.UniformResourceIdentifier)
                  if u.lower().startswith(("sip:", "sips:"))}
    names |= {str(a.value).lower() for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)}
    return names


def _covers(names: set[str], host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host.lower() in names
    return any(_same_ip(ip, name) for name in names)


def _same_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, name: str) -> bool:
    try:
        return ipaddress.ip_address(name) == ip
    except ValueError:
        return False
