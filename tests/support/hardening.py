"""What the issue-8 tests and the dead-call bench share: a site with a post per SIP backend and auto-answer
policy, the attacker's address, where a post listens (as Asterisk shows it), a real ``kill -9`` of Asterisk,
and the fuzz corpus of datagrams no post may be hurt by."""

from __future__ import annotations

import os
import random
import re
import signal
from pathlib import Path

import yaml

from sip_refuge.config import Post, Site, load_site
from sip_refuge.config.secrets import init_secrets
from sip_refuge.pbx.asterisk import Asterisk, free_port
from tests.support.sites import agent_site
from tests.support.waiting import wait_for

STRANGER = "127.0.0.2"  # the attacker: another loopback address, no credentials
POLICIES = ("always", "after_alarm", "never")
BACKENDS = ("pjsua2", "pyvoip")


def post_id_for(backend: str, policy: str) -> str:
    return f"{backend}-{policy.replace('_', '-')}"


def hardening_site(folder: Path) -> Site:
    """The agent site (free ports, short queue timings) with one post per backend and policy, each with its
    own control port, extension and secret."""
    base = agent_site(folder)
    data = yaml.safe_load(base.path.read_text(encoding="utf-8"))
    template = {k: v for k, v in data["posts"][0].items() if k not in ("camera",)}
    posts = []
    for n, (backend, policy) in enumerate((b, p) for b in BACKENDS for p in POLICIES):
        post_id = post_id_for(backend, policy)
        posts.append({**template, "id": post_id, "name": f"Post {post_id}", "extension": str(9101 + n),
                      "secret_file": f"secrets/{post_id}.secret", "sip_backend": backend, "auto_answer": policy,
                      "control_port": free_port()})
    data["posts"] = posts
    base.path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    init_secrets(load_site(base.path, check_secrets=False))
    return load_site(base.path)


def post_for(site: Site, backend: str, policy: str) -> Post:
    return site.post(post_id_for(backend, policy))


def post_address(pbx: Asterisk, post_id: str) -> tuple[str, int]:
    """Where the post's SIP listens, from the contact it registered (what anyone on the path could learn)."""
    def contact() -> tuple[str, int] | None:
        text = pbx.cli(f"pjsip show aor {post_id}")  # its "contact :" line holds the whole URI (tables cut it)
        found = re.search(rf"^\s*contact\s*:\s*sip:{re.escape(post_id)}@([0-9.]+):(\d+)", text, re.MULTILINE)
        return (found.group(1), int(found.group(2))) if found else None

    return wait_for(contact, 10, f"{post_id}'s contact at the PBX")


def kill_pbx(pbx: Asterisk) -> None:
    """``kill -9`` of the real Asterisk: no BYE, no unregistration, its sockets just gone."""
    pid = pbx.pid
    assert pid is not None and pbx.running
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pbx.running, 10, "Asterisk gone after SIGKILL")
    pbx.stop()  # reaps the process and forgets it; nothing is left to stop


# -- the fuzz corpus --------------------------------------------------------------------------------------

def _request(method: str, uri: str, *, cseq: str | None = None, extra: str = "", body: str = "",
             length: str | None = None, call_id: str | None = None) -> bytes:
    call_id = call_id or f"fuzz-{random.randrange(10**9)}"
    head = (f"{method} {uri} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.9:5060;branch=z9hG4bKfuzz{random.randrange(10**9)}\r\n"
            f"From: <sip:fuzz@127.0.0.9>;tag=f1\r\nTo: <{uri}>\r\nCall-ID: {call_id}\r\n"
            f"CSeq: {cseq if cseq is not None else '1 ' + method}\r\nMax-Forwards: 70\r\n"
            f"Contact: <sip:fuzz@127.0.0.9:5060>\r\n{extra}"
            f"Content-Length: {length if length is not None else len(body.encode())}\r\n\r\n{body}")
    return head.encode("utf-8", "surrogateescape")


def _response(status: str, *, cseq: str = "1 INVITE", extra: str = "") -> bytes:
    return (f"SIP/2.0 {status}\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKnone\r\nFrom: <sip:a@b>;tag=1\r\n"
            f"To: <sip:c@d>;tag=2\r\nCall-ID: fuzz-resp\r\nCSeq: {cseq}\r\n{extra}Content-Length: 0\r\n\r\n").encode()


SDP = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
       "m=audio 40000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n")


def fuzz_corpus(post_id: str, host: str, port: int, seed: int = 8) -> list[bytes]:
    """Malformed requests and responses, huge headers, random bytes, bad CSeq, truncated SDP (deterministic)."""
    rng = random.Random(seed)
    uri = f"sip:{post_id}@{host}:{port}"
    other = "sip:nobody@example.invalid"  # not the post's contact: valid INVITEs to it must be refused too
    out = [
        _response("200 OK", cseq="abc INVITE"),  # finding 4: killed the pyVoIP SIP thread
        _response("200 OK", cseq=""),
        _response("200 OK", cseq="99999999999999999999999 INVITE"),
        _response("200 OK", cseq="-1 INVITE"),
        _response("2OO OK"),
        _response("999 What"),
        _response("180"),
        b"SIP/2.0 200 OK\r\n\r\n",
        b"SIP/2.0\r\nCSeq: 1 INVITE\r\n\r\n",
        _response("200 OK", extra="Via: \r\n" * 3),
        _response("401 Unauthorized", extra='WWW-Authenticate: Digest realm="x", nonce=\r\n'),
        _request("INVITE", other, body=SDP, extra="Content-Type: application/sdp\r\n"),  # well formed, not for us
        _request("INVITE", other, cseq="abc INVITE", body=SDP),
        _request("INVITE", other, cseq="1 BYE", body=SDP),
        _request("INVITE", other, body=SDP[: len(SDP) // 2], extra="Content-Type: application/sdp\r\n"),  # truncated
        _request("INVITE", other, body=SDP, extra="Content-Type: application/sdp\r\n", length="99999"),
        _request("INVITE", other, body=SDP, extra="Content-Type: application/sdp\r\n", length="-5"),
        _request("INVITE", other, body="v=0\r\nm=audio x RTP/AVP zz\r\nc=IN IP4\r\n",
                 extra="Content-Type: application/sdp\r\n"),
        _request("INVITE", other, extra="X-Huge: " + "A" * 60000 + "\r\n"),  # a huge header
        _request("OPTIONS", uri, extra="".join(f"X-H{i}: {i}\r\n" for i in range(3000))),  # thousands of them
        _request("OPTIONS", uri, extra="Folded: a\r\n b\r\n\tc\r\n"),
        _request("BYE", uri, call_id="no-such-call"),
        _request("CANCEL", uri, call_id="no-such-call"),
        _request("ACK", uri, call_id="no-such-call"),
        _request("NOTIFY", uri, call_id="no-such-call"),
        _request("MESSAGE", uri, body="hello", extra="Content-Type: text/plain\r\n"),
        _request("REGISTER", uri),
        _request("INVITE", "not-a-uri", body=SDP),
        _request("INVITE", uri.replace("sip:", "sips:"), extra="Content-Type: application/sdp\r\n", body=SDP,
                 cseq="1"),
        _request("X" * 200, uri),
        b"INVITE\r\n\r\n",
        b"\r\n\r\n\r\n",
        b"\x00" * 1000,
        b"SIP/2.0 200 OK\r\nCSeq: 1 INVITE\r\nCall-ID: \xff\xfe\r\n\r\n",
        "INVITE sip:ü@ß SIP/2.0\r\nCSeq: 1 INVITE\r\n\r\n".encode(),
        _response("200 OK", extra="Content-Type: application/sdp\r\n") + SDP[:40].encode(),
    ]
    for size in (1, 12, 100, 1400, 8000, 60000):
        out.append(bytes(rng.randrange(256) for _ in range(size)))
    for _ in range(30):  # SIP-looking lines in a random order, some cut short
        lines = _request("INVITE", other, body=SDP, extra="Content-Type: application/sdp\r\n").split(b"\r\n")
        rng.shuffle(lines)
        blob = b"\r\n".join(lines)
        out.append(blob[: rng.randrange(1, len(blob))])
    return out
