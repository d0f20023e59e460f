"""The pjsua2 backend over TLS with SDES-SRTP against a real Asterisk 22, and what the built binding offers.

The site CA and the PBX's certificate (for 127.0.0.1) are made as `secrets init` makes them
(sip_refuge/config/certs.py); a second site's CA stands for "not the PBX the post was set up to trust", and a
certificate from the right CA for another name stands for a PBX posing under someone else's name.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from sip_refuge.config.cert_check import check_tls
from sip_refuge.config.certs import init_tls
from sip_refuge.config.model import Site
from sip_refuge.pbx.asterisk import Asterisk, on_free_ports
from sip_refuge.post import events as ev
from tests.integration.test_post_pjsua2 import POST, Events, contact_of, start_backend, wait_until
from tests.support.audio import chirp_found
from tests.support.sites import tls_site

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    """The demo site (free ports, fresh secrets, every post on pjsua2) with ``transport: tls``: Asterisk
    renders SDES-SRTP for its posts."""
    return tls_site(tmp_path_factory.mktemp("tls-site"))


@pytest.fixture(scope="module")
def stranger_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another site's CA: it signed nothing this PBX presents."""
    other = tls_site(tmp_path_factory.mktemp("stranger"))
    assert other.pbx.tls is not None and other.pbx.tls.ca_file is not None
    return other.pbx.tls.ca_file


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
        site: Site, pbx: Asterisk, stranger_ca: Path) -> None:
    """A post set up to trust another CA (as if an impostor held the PBX's address) never registers there."""
    assert site.pbx.tls is not None
    stranger = replace(site, pbx=replace(site.pbx, tls=replace(site.pbx.tls, ca_file=stranger_ca)))
    events = Events()
    backend = start_backend(stranger, events)
    try:
        failed = events.wait(ev.RegistrationFailed, timeout=15)
        assert failed.status != 200 and "certificate verification" in failed.reason  # PJSIP_TLS_ECERTVERIF
        assert not any(isinstance(e, ev.Registered) for _, e in events.emitted)
        assert not contact_of(pbx, POST)
    finally:
        backend.stop()


def test_post_does_not_register_to_a_certificate_for_another_name(site: Site, tmp_path: Path) -> None:
    """A post refuses a PBX whose certificate, signed by the site CA, names another host than pbx.host.

    pjsip compares the names; `config check` says beforehand that posts will refuse it."""
    tls = site.pbx.tls
    assert tls is not None
    wrong = replace(tls, cert_file=tmp_path / "wrong.crt", key_file=tmp_path / "wrong.key")
    init_tls(replace(site, pbx=replace(site.pbx, host="pbx.invalid", tls=wrong)))  # the site CA issues it
    misnamed = on_free_ports(replace(site, pbx=replace(site.pbx, tls=wrong)))
    assert [f.message for f in check_tls(misnamed) if not f.warning] == [
        f"{wrong.cert_file} is for pbx.invalid, not for pbx.host 127.0.0.1: posts that check it against ca_file "
        "refuse the PBX; issue it for 127.0.0.1 (sip-refuge secrets init SITE --renew-pbx-cert does)"]
    with Asterisk(misnamed) as impostor:
        events = Events()
        backend = start_backend(misnamed, events)
        try:
            failed = events.wait(ev.RegistrationFailed, timeout=15)
            assert failed.status != 200 and "certificate verification" in failed.reason  # PJSIP_TLS_ECERTVERIF
            assert not any(isinstance(e, ev.Registered) for _, e in events.emitted)
            assert not contact_of(impostor, POST)
        finally:
            backend.stop()
