"""The site's TLS certificates: ``secrets init`` makes a site CA and the PBX's certificate (``config check``
looks at them in :mod:`sip_refuge.config.cert_check`).

Made with the ``cryptography`` package, not the ``openssl`` command line: keys are generated in memory and
written once, straight into files created 0600 with ``O_EXCL | O_NOFOLLOW`` (as every secret is), with no
temporary key file, no shell quoting of host names and no dependence on the installed openssl's defaults.
The same library reads them back.

What goes where: the PBX holds ``cert_file``, ``key_file`` and ``ca_file``; posts get only ``ca_file`` (the
CA's certificate, public); the CA's private key (``ca_key_file``) is needed only to issue or renew the PBX's
certificate and can be kept off the PBX between renewals. Keys are RSA 3072: desk phones of many makes take
RSA certificates only, and a post only verifies signatures, which RSA makes cheap.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sip_refuge.config.files import create_file, read_regular
from sip_refuge.config.model import Site, Tls
from sip_refuge.errors import RefugeError

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

CA_DAYS = 3652  # ten years: the CA is copied onto every post, so it should rarely change
PBX_DAYS = 730  # two years; renewed with `sip-refuge secrets init SITE --renew-pbx-cert`
KEY_BITS = 3072
# A post's clock may lag (a Raspberry Pi has no clock battery: until NTP it runs from the last saved time).
BACKDATE = timedelta(days=1)
MAX_PEM_BYTES = 256 * 1024
RENEW = "sip-refuge secrets init SITE --renew-pbx-cert"


def pbx_names(site: Site) -> list[str]:
    """The names posts reach the PBX by, as its certificate must carry them: pbx.host and secondary_host."""
    hosts = [site.pbx.host, *([site.pbx.secondary_host] if site.pbx.secondary_host else [])]
    return list(dict.fromkeys(h.strip("[]").lower() for h in hosts))


# -- secrets init ------------------------------------------------------------------------------------

def init_tls(site: Site, *, renew: bool = False, now: datetime | None = None) -> list[tuple[Path, str]]:
    """Create what is missing of the site CA and the PBX's certificate; return (file, what it is) created.

    Nothing that exists is overwritten, except by ``renew``: a new PBX key and certificate from the site CA,
    each written to a new file and renamed over the old one.
    """
    tls = site.pbx.tls
    if tls is None:
        if renew:
            raise RefugeError(f"{site.path}: pbx.tls is not set: there is no PBX certificate to renew")
        return []
    now = now or datetime.now(UTC)
    have_cert, have_key = os.path.lexists(tls.cert_file), os.path.lexists(tls.key_file)
    if have_cert and have_key and not renew:
        return []  # made before, or the site's own: a CA made now could not have signed it
    if have_cert != have_key and not renew:
        there, missing = (tls.cert_file, tls.key_file) if have_cert else (tls.key_file, tls.cert_file)
        raise RefugeError(f"{there} exists but {missing} does not: restore it, or remove {there} too and run "
                          "secrets init again for a new PBX certificate and key")
    if renew:
        for path in (tls.cert_file, tls.key_file):
            if os.path.islink(path):
                raise RefugeError(f"{path} is a symbolic link: --renew-pbx-cert replaces only files it made")
    created: list[tuple[Path, str]] = []
    # A renewal never makes a new CA: posts would not trust what it signs.
    ca_cert, ca_key = _site_ca(site, tls, now, created, make=not renew)
    if ca_cert is None or ca_key is None:
        raise RefugeError(_cannot_issue(site, tls, renew))
    key = _new_key()
    cert = _issue(ca_cert, ca_key, key, pbx_names(site), now)
    if renew:
        _replace(tls.key_file, _key_pem(key), 0o600)
        _replace(tls.cert_file, _cert_pem(cert), 0o644)
        created += [(tls.key_file, "the PBX's new private key"), (tls.cert_file, "the PBX's new certificate")]
    else:
        create_file(tls.key_file, _key_pem(key), 0o600, "TLS key")
        create_file(tls.cert_file, _cert_pem(cert), 0o644, "TLS certificate")
        created += [(tls.key_file, "the PBX's private key"), (tls.cert_file, "the PBX's certificate")]
    return created


def stand_in_tls(site: Site, directory: Path) -> tuple[Site, bool]:
    """A copy of ``site`` whose missing PBX certificate (with its CA) is a throw-away one in ``directory``,
    and whether it stood in: ``asterisk check`` can load a TLS site before ``secrets init``."""
    tls = site.pbx.tls
    if tls is None or (os.path.lexists(tls.cert_file) and os.path.lexists(tls.key_file)):
        return site, False
    folder = directory / "tls"
    spare = replace(tls, cert_file=folder / "pbx.crt", key_file=folder / "pbx.key", ca_file=folder / "ca.crt",
                    ca_key_file=folder / "ca.key")
    site = replace(site, pbx=replace(site.pbx, tls=spare))
    init_tls(site)
    return site, True


def _site_ca(site: Site, tls: Tls, now: datetime, created: list[tuple[Path, str]], *,
             make: bool) -> tuple[Any, Any]:
    """The site CA (certificate, private key), made (with ``make``) when neither file exists; (None, None) when
    there is no CA of ours to issue from (no ca_file, or a CA of the site's own whose key is not here)."""
    if tls.ca_file is None or tls.ca_key_file is None:
        return None, None
    have_ca, have_key = os.path.lexists(tls.ca_file), os.path.lexists(tls.ca_key_file)
    if not have_ca and have_key:
        raise RefugeError(f"{tls.ca_key_file} (the site CA's private key) exists but its certificate {tls.ca_file} "
                          "does not: restore the certificate (posts hold a copy of it)")
    if not have_ca and not make:
        return None, None
    if not have_ca:
        key = _new_key()
        cert = _make_ca(site.name, key, now)
        create_file(tls.ca_key_file, _key_pem(key), 0o600, "TLS key")
        create_file(tls.ca_file, _cert_pem(cert), 0o644, "TLS certificate")
        created += [(tls.ca_key_file, "the site CA's private key: keep it off posts, and offline between renewals"),
                    (tls.ca_file, "the site CA's certificate: copy it to every post")]
        return cert, key
    if not have_key:
        return None, None
    ca_key = load_key(tls.ca_key_file, "pbx.tls.ca_key_file")
    ca = next((c for c in load_certs(tls.ca_file, "pbx.tls.ca_file") if same_key(ca_key, c)), None)
    if ca is None:
        raise RefugeError(f"{tls.ca_key_file} is not the private key of the CA in {tls.ca_file}")
    return ca, ca_key


def _cannot_issue(site: Site, tls: Tls, renew: bool) -> str:
    names = ", ".join(pbx_names(site))
    why = "cannot renew the PBX's certificate" if renew else f"{tls.cert_file} does not exist"
    if tls.ca_file is None:
        return (f"{site.path}: pbx.tls.ca_file is not set, and {why}: name a ca_file (secrets init makes a site CA "
                f"there and signs the PBX certificate with it), or put the PBX's certificate (for {names}) and key "
                "at cert_file and key_file yourself")
    return (f"{why}: the CA in {tls.ca_file} has no private key at {tls.ca_key_file}: have that CA issue the PBX's "
            f"certificate (subjectAltName {names}) into cert_file and key_file, or give pbx.tls.ca_key_file")


def _crypto() -> None:
    try:
        import cryptography  # noqa: F401 - only to say clearly that it is missing
    except ImportError:
        raise RefugeError("TLS certificates need the Python package 'cryptography' (a control-room dependency "
                          "of sip-refuge): pip install cryptography") from None


def _new_key() -> RSAPrivateKey:
    _crypto()
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)


def _make_ca(site_name: str, key: RSAPrivateKey, now: datetime) -> x509.Certificate:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, (site_name or "sip-refuge")[:64]),
                      x509.NameAttribute(NameOID.COMMON_NAME, "sip-refuge site CA")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))


def _issue(ca_cert: x509.Certificate, ca_key: Any, key: RSAPrivateKey, names: list[str],
           now: datetime) -> x509.Certificate:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    alt: list[x509.GeneralName] = []
    for host in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])])
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(min(now + timedelta(days=PBX_DAYS), ca_cert.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            # clientAuth too: Asterisk is the TLS client when it opens a connection to a phone itself.
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
            .sign(ca_key, hashes.SHA256()))


def _key_pem(key: RSAPrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _replace(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a new file beside ``path``, then rename it over ``path``: never a half-written key."""
    tmp = path.with_name(f".{path.name}.new")
    if os.path.lexists(tmp):
        os.unlink(tmp)  # a leftover of an interrupted renewal; O_EXCL below refuses anything racing in
    create_file(tmp, data, mode, "TLS file")
    os.replace(tmp, path)


# -- reading them back -------------------------------------------------------------------------------

def load_certs(path: Path, key: str) -> list[x509.Certificate]:
    """Every certificate in a PEM file (a CA file may hold an old and a new CA while posts change over)."""
    _crypto()
    from cryptography import x509

    data = read_regular(path, limit=MAX_PEM_BYTES, what=key, follow_link=True)
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise RefugeError(f"{path} is not a PEM certificate") from None


def load_key(path: Path, key: str) -> Any:
    _crypto()
    from cryptography.hazmat.primitives import serialization

    data = read_regular(path, limit=MAX_PEM_BYTES, what=key, follow_link=True)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:  # TypeError: a key with a passphrase, which Asterisk cannot use
        raise RefugeError(f"{path} is not an unencrypted PEM private key ({exc})") from None


def same_key(private_key: Any, cert: x509.Certificate) -> bool:
    return bool(private_key.public_key() == cert.public_key())
