"""The site CA and the PBX's certificate: what `secrets init` makes, what it never touches, and what
`config check` says about them (issue 9, encrypted calls)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from sip_refuge.config import Site, load_site
from sip_refuge.config.cert_check import check_tls
from sip_refuge.config.certs import CA_DAYS, PBX_DAYS, init_tls
from sip_refuge.config.secrets import init_secrets
from sip_refuge.errors import RefugeError

REPO = Path(__file__).resolve().parents[2]
TLS_SITE = REPO / "tests" / "golden" / "tls-site.yaml"
NOW = datetime.now(UTC)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sip_refuge.cli", *args], capture_output=True, text=True,
                          check=False, timeout=120)


def line_of(path: Path, needle: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


@pytest.fixture()
def site_file(tmp_path: Path) -> Path:
    """The TLS golden site (pbx.example.net, a failover PBX at 10.20.0.2), secrets made, no TLS files yet."""
    path = tmp_path / "site.yaml"
    path.write_text(TLS_SITE.read_text().replace("  host: pbx.example.net\n",
                                                  "  host: pbx.example.net\n  secondary_host: 10.20.0.2\n"))
    init_secrets(load_site(path, check_secrets=False))
    return path


def site(path: Path) -> Site:
    return load_site(path, check_secrets=False)


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def findings(s: Site, now: datetime = NOW) -> list[tuple[str, str, bool]]:
    return [(f.key, f.message, f.warning) for f in check_tls(s, now)]


def test_secrets_init_makes_a_site_ca_and_a_pbx_certificate_for_both_pbx_hosts(site_file: Path) -> None:
    done = run_cli("secrets", "init", str(site_file))
    assert done.returncode == 0, done.stderr
    tls = site_file.parent / "tls"
    assert f"created {tls / 'ca.key'}: the site CA's private key: keep it off posts" in done.stdout
    assert f"created {tls / 'ca.crt'}: the site CA's certificate: copy it to every post" in done.stdout
    assert f"created {tls / 'pbx.key'}" in done.stdout and f"created {tls / 'pbx.crt'}" in done.stdout
    assert done.stderr == ""  # no warning: the new certificate fits the site
    modes = {name: stat.S_IMODE((tls / name).stat().st_mode) for name in ("ca.key", "ca.crt", "pbx.key", "pbx.crt")}
    assert modes == {"ca.key": 0o600, "ca.crt": 0o644, "pbx.key": 0o600, "pbx.crt": 0o644}

    ca, pbx = cert(tls / "ca.crt"), cert(tls / "pbx.crt")
    pbx.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not pbx.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = pbx.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["pbx.example.net"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.20.0.2"]
    assert ExtendedKeyUsageOID.SERVER_AUTH in pbx.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    for c in (ca, pbx):
        key = c.public_key()
        assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 3072
    assert (ca.not_valid_after_utc - NOW).days in range(CA_DAYS - 2, CA_DAYS + 1)
    assert (pbx.not_valid_after_utc - NOW).days in range(PBX_DAYS - 2, PBX_DAYS + 1)
    assert pbx.not_valid_before_utc < NOW - timedelta(hours=12)  # a post whose clock lags still accepts it
    assert run_cli("config", "check", str(site_file)).returncode == 0


def test_existing_files_are_never_overwritten(site_file: Path) -> None:
    init_tls(site(site_file))
    tls = site_file.parent / "tls"
    before = {p.name: p.read_bytes() for p in tls.iterdir()}
    done = run_cli("secrets", "init", str(site_file))
    assert done.returncode == 0 and "every secret file exists already" in done.stdout
    assert {p.name: p.read_bytes() for p in tls.iterdir()} == before


def test_a_site_that_brings_its_own_certificate_gets_no_ca_made(site_file: Path) -> None:
    """The site names its own: cert_file and key_file exist (issued elsewhere), so nothing is made, not even a
    CA that could not have signed them."""
    other = site_file.parent / "elsewhere"
    other.mkdir()
    shutil.copy(site_file, other / "site.yaml")
    init_tls(site(other / "site.yaml"))
    (site_file.parent / "tls").mkdir()
    for name in ("pbx.crt", "pbx.key"):
        shutil.copy(other / "tls" / name, site_file.parent / "tls" / name)
    assert init_tls(site(site_file)) == []
    assert sorted(p.name for p in (site_file.parent / "tls").iterdir()) == ["pbx.crt", "pbx.key"]
    # config check names the missing CA file: posts need the CA that signed it.
    assert ("pbx.tls.ca_file", f"{site_file.parent / 'tls' / 'ca.crt'} does not exist: put there the certificate "
            f"of the CA that signed {site_file.parent / 'tls' / 'pbx.crt'} (posts check the PBX against it)",
            False) in findings(site(site_file))


def test_a_link_in_place_of_a_key_is_never_written_through(site_file: Path, tmp_path: Path) -> None:
    (site_file.parent / "tls").mkdir()
    target = tmp_path / "elsewhere.key"
    os.symlink(target, site_file.parent / "tls" / "ca.key")  # dangling
    done = run_cli("secrets", "init", str(site_file))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "(the site CA's private key) exists but its certificate" in done.stderr
    assert not target.exists() and not (site_file.parent / "tls" / "pbx.key").exists()


def test_renew_issues_a_new_key_and_certificate_from_the_same_ca(site_file: Path) -> None:
    init_tls(site(site_file))
    tls = site_file.parent / "tls"
    old_cert, old_key, ca = (tls / "pbx.crt").read_bytes(), (tls / "pbx.key").read_bytes(), (tls / "ca.crt").read_bytes()
    done = run_cli("secrets", "init", str(site_file), "--renew-pbx-cert")
    assert done.returncode == 0, done.stderr
    assert "the PBX's new certificate" in done.stdout
    assert (tls / "ca.crt").read_bytes() == ca
    assert (tls / "pbx.crt").read_bytes() != old_cert and (tls / "pbx.key").read_bytes() != old_key
    assert stat.S_IMODE((tls / "pbx.key").stat().st_mode) == 0o600
    cert(tls / "pbx.crt").verify_directly_issued_by(cert(tls / "ca.crt"))
    assert sorted(p.name for p in tls.iterdir()) == ["ca.crt", "ca.key", "pbx.crt", "pbx.key"]  # no leftovers


def test_without_the_ca_key_nothing_is_issued_and_the_message_says_what_to_do(site_file: Path) -> None:
    init_tls(site(site_file))
    tls = site_file.parent / "tls"
    (tls / "ca.key").rename(site_file.parent / "offline-ca.key")  # the CA key kept offline
    (tls / "pbx.crt").unlink()
    (tls / "pbx.key").unlink()
    with pytest.raises(RefugeError, match=r"has no private key at .*ca\.key: have that CA issue the PBX's "
                                          r"certificate \(subjectAltName pbx\.example\.net, 10\.20\.0\.2\)"):
        init_tls(site(site_file))
    renew = run_cli("secrets", "init", str(site_file), "--renew-pbx-cert")
    assert renew.returncode == 2 and "Traceback" not in renew.stderr
    assert "cannot renew the PBX's certificate: the CA in " in renew.stderr and "have that CA issue" in renew.stderr


def test_a_ca_file_holding_the_old_and_the_new_ca_is_fine(site_file: Path, tmp_path: Path) -> None:
    """While posts change over to a new site CA their ca_file holds both; the PBX's certificate, from either,
    passes, and secrets init still finds the CA its key belongs to."""
    init_tls(site(site_file))
    other = tmp_path / "new-ca"
    other.mkdir()
    shutil.copy(site_file, other / "site.yaml")
    init_tls(site(other / "site.yaml"))
    tls = site_file.parent / "tls"
    (tls / "ca.crt").write_bytes((other / "tls" / "ca.crt").read_bytes() + (tls / "ca.crt").read_bytes())
    assert findings(site(site_file)) == []
    (tls / "pbx.crt").unlink()
    (tls / "pbx.key").unlink()
    init_tls(site(site_file))  # issued by the CA whose key is ca.key: the second one in the file
    assert findings(site(site_file)) == []


def test_renew_never_makes_a_new_ca(site_file: Path) -> None:
    """A CA made during a renewal would sign a certificate no post trusts: with no CA at all, renewal stops."""
    with pytest.raises(RefugeError, match="cannot renew the PBX's certificate"):
        init_tls(site(site_file), renew=True)
    assert not (site_file.parent / "tls").exists()


def test_without_a_ca_file_secrets_init_refuses_to_make_an_unverifiable_certificate(site_file: Path) -> None:
    site_file.write_text(site_file.read_text().replace("    ca_file: tls/ca.crt\n", ""))
    done = run_cli("secrets", "init", str(site_file))
    assert done.returncode == 2
    assert "pbx.tls.ca_file is not set" in done.stderr and "name a ca_file" in done.stderr


def test_config_check_warns_30_days_before_the_pbx_certificate_expires(site_file: Path) -> None:
    init_tls(site(site_file), now=NOW - timedelta(days=PBX_DAYS - 12))
    done = run_cli("config", "check", str(site_file))
    assert done.returncode == 0, done.stderr
    line = line_of(site_file, "cert_file:")
    assert done.stderr.startswith(f"{site_file}:{line}: pbx.tls.cert_file: warning: the certificate expires on ")
    assert "(in 11 days); renew it: sip-refuge secrets init SITE --renew-pbx-cert" in done.stderr


def test_config_check_refuses_an_expired_certificate(site_file: Path) -> None:
    init_tls(site(site_file))
    got = findings(site(site_file), NOW + timedelta(days=PBX_DAYS + 1))
    assert [(k, w) for k, m, w in got if "expired on" in m] == [("pbx.tls.cert_file", False)]


def test_config_check_refuses_a_certificate_that_does_not_name_pbx_host(site_file: Path) -> None:
    """Posts compare pbx.host with the certificate's names, exactly (pjsip, sip_transport_tls.c) and refuse
    the PBX otherwise: with a ca_file that is an error, not a warning."""
    init_tls(site(site_file))
    site_file.write_text(site_file.read_text().replace("  host: pbx.example.net\n", "  host: pbx2.example.net\n"))
    done = run_cli("config", "check", str(site_file))
    assert done.returncode == 2
    assert (f"{site_file}:{line_of(site_file, 'cert_file:')}: pbx.tls.cert_file: {site_file.parent}/tls/pbx.crt "
            "is for 10.20.0.2, pbx.example.net, not for pbx.host pbx2.example.net: posts that check it against "
            "ca_file refuse the PBX") in done.stderr
    # The failover PBX counts as much as the first one.
    site_file.write_text(site_file.read_text().replace("pbx2.example.net", "pbx.example.net")
                         .replace("secondary_host: 10.20.0.2", "secondary_host: 10.20.0.3"))
    assert [m for k, m, w in findings(site(site_file)) if "not for pbx.secondary_host 10.20.0.3" in m]


def test_config_check_finds_a_wrong_key_a_foreign_ca_and_a_readable_key(site_file: Path, tmp_path: Path) -> None:
    init_tls(site(site_file))
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(site_file, other / "site.yaml")
    init_tls(site(other / "site.yaml"))
    tls = site_file.parent / "tls"
    shutil.copy(other / "tls" / "ca.crt", tls / "ca.crt")  # another site's CA
    (tls / "pbx.key").unlink()
    shutil.copy(other / "tls" / "pbx.key", tls / "pbx.key")  # another certificate's key
    (tls / "pbx.key").chmod(0o644)
    got = findings(site(site_file))
    messages = {k: [m for kk, m, w in got if kk == k and not w] for k in ("pbx.tls.key_file", "pbx.tls.cert_file")}
    assert f"{tls / 'pbx.key'} is not the private key of {tls / 'pbx.crt'}" in messages["pbx.tls.key_file"]
    assert f"{tls / 'pbx.key'} (a private key) is readable by other users: chmod 600 it" in messages["pbx.tls.key_file"]
    assert f"{tls / 'pbx.crt'} is not signed by the CA in {tls / 'ca.crt'}: posts refuse the PBX" \
        in messages["pbx.tls.cert_file"]


def test_config_check_warns_when_posts_cannot_check_the_pbx(site_file: Path) -> None:
    init_tls(site(site_file))
    site_file.write_text(site_file.read_text().replace("    ca_file: tls/ca.crt\n", ""))
    got = findings(site(site_file))
    assert [(k, w) for k, m, w in got] == [("pbx.tls.ca_file", True)]
    assert "posts then take any certificate" in got[0][1]


def test_config_check_says_a_missing_certificate_needs_secrets_init(site_file: Path) -> None:
    done = run_cli("config", "check", str(site_file))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert (f"{site_file}:{line_of(site_file, 'cert_file:')}: pbx.tls.cert_file: {site_file.parent}/tls/pbx.crt "
            "does not exist; run: sip-refuge secrets init SITE") in done.stderr


def test_a_pyvoip_post_is_refused_on_a_tls_site(site_file: Path) -> None:
    text = site_file.read_text()
    site_file.write_text(text.replace("    secret_file: secrets/old-post.secret\n",
                                      "    secret_file: secrets/old-post.secret\n    sip_backend: pyvoip\n"))
    done = run_cli("config", "check", str(site_file))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert (f"{site_file}:{line_of(site_file, 'sip_backend: pyvoip')}: posts[1].sip_backend: pyvoip cannot do TLS or "
            "SRTP, and pbx.transport is tls: use sip_backend: pjsua2 for this post") in done.stderr


def test_desks_on_tls_need_a_tls_site(site_file: Path) -> None:
    site_file.write_text(site_file.read_text().replace("  transport: tls\n", "  transport: udp\n")
                         .replace("    desks: udp\n", "    desks: tls\n"))
    done = run_cli("config", "check", str(site_file))
    assert done.returncode == 2
    assert f"{site_file}:{line_of(site_file, 'desks: tls')}: pbx.tls.desks: desks on TLS need pbx.transport: tls" \
        in done.stderr
