"""The pjsua2 backend over TLS with SDES-SRTP against a real Asterisk 22, and what the built binding offers.

Certificates come from the openssl command line: a throw-away CA signs the PBX's certificate for 127.0.0.1,
and a second CA that signed nothing stands for "not the PBX the post was set up to trust".
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import yaml

from sip_refuge.config.loader import load_site
from sip_refuge.config.model import Site
from sip_refuge.pbx.asterisk import Asterisk, free_port
from sip_refuge.post import events as ev
from tests.integration.test_post_pjsua2 import POST, Events, contact_of, make_site, start_backend, wait_until
from tests.support.audio import chirp_found

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Certs:
    ca: Path  # signed the PBX's certificate
    stranger_ca: Path  # signed nothing the PBX presents
    cert: Path
    key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    d = tmp_path_factory.mktemp("tls")
    for name in ("ca", "stranger"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt",
                 "-days", "2", "-subj", f"/CN=sip-refuge test {name}", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "pbx.key", "-out", "pbx.csr", "-subj", "/CN=127.0.0.1",
             cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n", encoding="utf-8")
    _openssl("x509", "-req", "-in", "pbx.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out",
             "pbx.crt", "-days", "2", "-extfile", "san.ext", cwd=d)
    return Certs(d / "ca.crt", d / "stranger.crt", d / "pbx.crt", d / "pbx.key")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Site:
    """The demo site (free ports, fresh secrets) with ``transport: tls``: Asterisk renders SDES-SRTP for it."""
    path = make_site(tmp_path_factory.mktemp("tls-site")).path
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["pbx"]["transport"] = "tls"
    data["pbx"]["tls"] = {"cert_file": str(certs.cert), "key_file": str(certs.key), "ca_file": str(certs.ca),
                          "port": free_port()}
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return load_site(path)


@pytest.fixture(scope="module")
def pbx(site: Site) -> Iterator[Asterisk]:
    with Asterisk(site) as ast:
        yield ast


def test_built_binding_offers_tls_srtp_g722_and_opus() -> None:
    """The installed pjsua2 is pjproject's SWIG binding with a TLS transport, SRTP suites, G.722, Opus, a WAV
    player and libHandleEvents."""
    # Its own process: pjsua2 allows one library per process, and this check makes one.
    done = subprocess.run([sys.executable, "-m", "sip_refuge.post.sip.pjsua2_build", "--capabilities"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    caps = json.loads(done.stdout.strip().splitlines()[-1])
    assert caps["version"].startswith("2.17")
    assert "G722/16000/1" in caps["codecs"] and "opus/48000/2" in caps["codecs"] and "PCMU/8000/1" in caps["codecs"]
    assert caps["tls"] == "TLS"
    assert "AES_CM_128_HMAC_SHA1_80" in caps["srtp"]  # the suite Asterisk offers for SDES
    assert caps["handle_events"] and caps["srtp_use"] and caps["player"]


def test_post_registers_and_self_tests_over_tls_with_srtp(site: Site, pbx: Asterisk, tmp_path: Path) -> None:
    """Over TLS (PBX certificate checked against the site's CA) the post registers, and its self-test's chirp
    comes back through SDES-SRTP media."""
    events = Events()
    log_file = tmp_path / "pjsua.log"  # level 4, no SIP messages: pjmedia says which SRTP keying it used
    backend = start_backend(site, events, pjsua_log_file=str(log_file), pjsua_log_level=4)
    try:
        events.wait(ev.Registered, timeout=15)
        wait_until(lambda: contact_of(pbx, POST), 10, "post contact in Asterisk")
        assert ";transport=tls" in pbx.cli(f"pjsip show aor {POST}").lower()
        backend.dial("st-tls", site.self_test.extension, site.pbx.host, True)
        events.wait(ev.CallAnswered, timeout=20, where=lambda e: e.call_id == "st-tls")
        backend.check_audio("st-tls-call", "call", "st-tls", 3.0)
        heard = events.wait(ev.AudioHeard, timeout=20)
        assert chirp_found(heard.rate, heard.pcm).correlation > 0.9
        backend.hangup("st-tls")
        events.wait(ev.CallEnded, where=lambda e: e.call_id == "st-tls")
    finally:
        backend.stop()
    # Asterisk's endpoint has media_encryption=sdes, so plain RTP would have been refused (488) anyway.
    assert "SRTP uses keying method SDES" in log_file.read_text(encoding="utf-8", errors="replace")


def test_post_does_not_register_to_a_certificate_its_ca_did_not_sign(
        site: Site, pbx: Asterisk, certs: Certs) -> None:
    """A post set up to trust another CA (as if an impostor held the PBX's address) never registers there."""
    assert site.pbx.tls is not None
    stranger = replace(site, pbx=replace(site.pbx, tls=replace(site.pbx.tls, ca_file=certs.stranger_ca)))
    events = Events()
    backend = start_backend(stranger, events)
    try:
        failed = events.wait(ev.RegistrationFailed, timeout=15)
        assert failed.status != 200
        assert not any(isinstance(e, ev.Registered) for _, e in events.emitted)
        assert not contact_of(pbx, POST)
    finally:
        backend.stop()
