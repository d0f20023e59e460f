"""Asterisk 22 with a TLS site as `secrets init` makes it: the certificate its TLS port serves, SRTP mandatory
for posts (and for desks on TLS), tried with raw INVITEs from Python's ``ssl`` (tests/support/sip_tls.py),
and `asterisk check` on a TLS site before any certificate exists.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sip_refuge.config.model import Site
from sip_refuge.pbx.asterisk import Asterisk
from tests.support.sip_tls import TlsSipClient, sdp_offer
from tests.support.sites import tls_site

pytestmark = pytest.mark.integration
RTP_PORT = 40000  # the offers' RTP port: nothing is sent there, the calls end at once


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    return tls_site(tmp_path_factory.mktemp("pbx-tls"))


@pytest.fixture(scope="module")
def pbx(site: Site) -> Iterator[Asterisk]:
    with Asterisk(site) as ast:
        yield ast


def tls_address(site: Site) -> tuple[str, int]:
    assert site.pbx.tls is not None
    return site.pbx.host, site.pbx.tls.port


def handshake(site: Site, *, cafile: Path | None, name: str) -> dict[str, object]:
    context = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    with socket.create_connection(tls_address(site), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=name) as conn:
        peer = conn.getpeercert()
        assert peer is not None
        return {"protocol": conn.version(), **peer}


def client(site: Site, user: str, password: str) -> TlsSipClient:
    assert site.pbx.tls is not None and site.pbx.tls.ca_file is not None
    return TlsSipClient(user, password, tls_address(site), site.pbx.tls.ca_file)


def test_pbx_serves_the_certificate_secrets_init_made(site: Site, pbx: Asterisk) -> None:
    """The TLS port presents the certificate `secrets init` issued, valid for pbx.host under the site CA only.

    A client trusting only the site CA accepts it for pbx.host and refuses it for any other name; a client
    without the site CA refuses it."""
    assert site.pbx.tls is not None
    peer = handshake(site, cafile=site.pbx.tls.ca_file, name=site.pbx.host)
    assert ("IP Address", "127.0.0.1") in peer["subjectAltName"]  # type: ignore[operator]
    assert peer["protocol"] in ("TLSv1.2", "TLSv1.3")
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        handshake(site, cafile=site.pbx.tls.ca_file, name="pbx.invalid")
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        handshake(site, cafile=None, name=site.pbx.host)


def test_post_offer_without_srtp_keys_is_refused(site: Site, pbx: Asterisk) -> None:
    """A post's offer without SRTP keys gets 488 over TLS; the same offer with an SDES key is answered.

    The post authenticates with its right password first, and the queue and the self-test refuse alike."""
    post = site.posts[0]
    for extension in (site.queue.extension, site.self_test.extension):
        with client(site, post.id, post.secret.read()) as sip:
            final = sip.invite(extension, sdp_offer(RTP_PORT, srtp=False))
            assert final.code == 488, final.start
            # Refused after the post proved who it is: the refusal is the endpoint's SRTP rule, not a login.
            assert [m.code for m in sip.received if m.is_response][0] == 401
    with client(site, post.id, post.secret.read()) as sip:
        final = sip.invite(site.self_test.extension, sdp_offer(RTP_PORT, srtp=True))
        assert final.code == 200, final.start
        assert "RTP/SAVP" in final.body and "a=crypto:" in final.body


def test_desks_on_tls_have_no_plain_sip_port_and_must_use_srtp(tmp_path: Path) -> None:
    """With pbx.tls.desks: tls there is no plain SIP transport and a desk's offer without SRTP keys gets 488.

    With a key the same call goes through."""
    site = tls_site(tmp_path, desks="tls")
    desk = site.desks[0]
    with Asterisk(site) as ast:
        transports = ast.cli("pjsip show transports")
        assert "transport-refuge-tls" in transports and "udp" not in transports
        with client(site, desk.id, desk.secret.read()) as sip:
            assert sip.invite(site.self_test.extension, sdp_offer(RTP_PORT, srtp=False)).code == 488
        with client(site, desk.id, desk.secret.read()) as sip:
            assert sip.invite(site.self_test.extension, sdp_offer(RTP_PORT, srtp=True)).code == 200


def test_asterisk_check_loads_a_tls_site_before_secrets_init(tmp_path: Path) -> None:
    """`asterisk check` loads a TLS site clean before `secrets init`, with a throw-away certificate."""
    site = tls_site(tmp_path)
    shutil.rmtree(tmp_path / "tls")
    done = subprocess.run([sys.executable, "-m", "sip_refuge.cli", "asterisk", "check", str(site.path)],
                          capture_output=True, text=True, check=False, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no PBX certificate yet: checking with a throw-away one" in done.stderr
    assert not (tmp_path / "tls").exists()  # nothing made where the site's own certificate belongs
