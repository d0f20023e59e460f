"""A raw SIP client over TLS (Python's ``ssl``), for tests that must send exactly the INVITE they mean to.

pjsua2 never sends an offer without SRTP keys once SRTP is mandatory, so it cannot show what the PBX does
with one; this client can. It checks the PBX's certificate against the site CA like a post, answers one
digest challenge, acknowledges final responses and reads SIP messages off the TLS stream by their
Content-Length. One request at a time, from the test's own thread: no reader thread.
"""

from __future__ import annotations

import hashlib
import secrets
import socket
import ssl
import time
from pathlib import Path
from types import TracebackType

from tests.support.sipua import SipMessage, digest_params

SRTP_KEY_BYTES = 30  # AES_CM_128_HMAC_SHA1_80: 16-byte key + 14-byte salt, base64 in a=crypto


def _md5(text: str) -> str:
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


def sdp_offer(port: int, *, srtp: bool) -> str:
    """An audio offer (PCMU and RFC 4733): RTP/AVP with no key, or RTP/SAVP with an SDES key (RFC 4568)."""
    media = "RTP/SAVP" if srtp else "RTP/AVP"
    lines = ["v=0", f"o=- {port} {port} IN IP4 127.0.0.1", "s=tls-test", "c=IN IP4 127.0.0.1", "t=0 0",
             f"m=audio {port} {media} 0 101", "a=rtpmap:0 PCMU/8000", "a=rtpmap:101 telephone-event/8000",
             "a=fmtp:101 0-16", "a=sendrecv"]
    if srtp:
        import base64

        key = base64.b64encode(secrets.token_bytes(SRTP_KEY_BYTES)).decode()
        lines.append(f"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:{key}")
    return "\r\n".join(lines) + "\r\n"


class TlsSipClient:
    """One TLS connection to the PBX, as the SIP user ``user``. Use as a context manager."""

    def __init__(self, user: str, password: str, server: tuple[str, int], ca_file: Path) -> None:
        self.user, self.password, self.server = user, password, server
        context = ssl.create_default_context(cafile=str(ca_file))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        raw = socket.create_connection(server, timeout=10)
        self.sock = context.wrap_socket(raw, server_hostname=server[0])
        self.local = self.sock.getsockname()[:2]
        self.buffer = b""
        self.received: list[SipMessage] = []

    def __enter__(self) -> TlsSipClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.sock.close()

    # -- the stream ---------------------------------------------------------------------------------------
    def send(self, text: str) -> None:
        self.sock.sendall(text.encode())

    def read(self, timeout: float = 10.0) -> SipMessage:
        """The next SIP message on the stream (keep-alive CRLFs skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            self.buffer = self.buffer.lstrip(b"\r\n")
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end >= 0:
                head = SipMessage.parse(self.buffer[:head_end + 4])
                length = int(head.header("content-length") or 0)
                end = head_end + 4 + length
                if len(self.buffer) >= end:
                    message = SipMessage.parse(self.buffer[:end])
                    self.buffer = self.buffer[end:]
                    self.received.append(message)
                    return message
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no complete SIP message from the PBX within {timeout} s")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the PBX closed the TLS connection")
            self.buffer += chunk

    # -- an INVITE, start to finish ----------------------------------------------------------------------
    def invite(self, extension: str, sdp: str, timeout: float = 10.0) -> SipMessage:
        """INVITE ``extension`` with ``sdp``, answering one digest challenge; the final response (ACKed).
        A 2xx is hung up again at once (BYE)."""
        host, port = self.server
        uri = f"sip:{extension}@{host}:{port};transport=tls"
        call_id, tag = secrets.token_hex(8) + "@tls-test", secrets.token_hex(4)
        auth: list[str] = []
        for cseq in (1, 2):
            branch = "z9hG4bK" + secrets.token_hex(8)
            headers = [f"Via: SIP/2.0/TLS {self.local[0]}:{self.local[1]};branch={branch};rport;alias",
                       "Max-Forwards: 70", f"From: <sip:{self.user}@{host}>;tag={tag}", f"To: <{uri}>",
                       f"Call-ID: {call_id}", f"CSeq: {cseq} INVITE",
                       f"Contact: <sip:{self.user}@{self.local[0]}:{self.local[1]};transport=tls>",
                       "Allow: INVITE, ACK, CANCEL, BYE, OPTIONS", *auth, "Content-Type: application/sdp",
                       f"Content-Length: {len(sdp.encode())}"]
            self.send(f"INVITE {uri} SIP/2.0\r\n" + "\r\n".join(headers) + "\r\n\r\n" + sdp)
            final = self._final(cseq, timeout)
            if final.code >= 300:
                self._ack(uri, branch, final, call_id, tag)
            if final.code != 401 or auth:
                break
            auth = [self._authorization(final, "INVITE", uri)]
        if 200 <= final.code < 300:
            self._ack(uri, "z9hG4bK" + secrets.token_hex(8), final, call_id, tag)
            self._bye(final, call_id, tag)
        return final

    def _final(self, cseq: int, timeout: float) -> SipMessage:
        deadline = time.monotonic() + timeout
        while True:
            message = self.read(max(0.1, deadline - time.monotonic()))
            if message.is_response and message.cseq == (cseq, "INVITE") and message.code >= 200:
                return message

    def _ack(self, uri: str, branch: str, final: SipMessage, call_id: str, tag: str) -> None:
        host = self.server[0]
        lines = [f"ACK {uri} SIP/2.0", f"Via: SIP/2.0/TLS {self.local[0]}:{self.local[1]};branch={branch};rport",
                 "Max-Forwards: 70", f"From: <sip:{self.user}@{host}>;tag={tag}", f"To: {final.header('to')}",
                 f"Call-ID: {call_id}", f"CSeq: {final.cseq[0]} ACK", "Content-Length: 0"]
        self.send("\r\n".join(lines) + "\r\n\r\n")

    def _bye(self, final: SipMessage, call_id: str, tag: str) -> None:
        host = self.server[0]
        contact = (final.header("contact") or "").strip("<>").split(">")[0]
        branch = "z9hG4bK" + secrets.token_hex(8)
        lines = [f"BYE {contact} SIP/2.0", f"Via: SIP/2.0/TLS {self.local[0]}:{self.local[1]};branch={branch};rport",
                 "Max-Forwards: 70", f"From: <sip:{self.user}@{host}>;tag={tag}", f"To: {final.header('to')}",
                 f"Call-ID: {call_id}", f"CSeq: {final.cseq[0] + 1} BYE", "Content-Length: 0"]
        self.send("\r\n".join(lines) + "\r\n\r\n")

    def _authorization(self, challenge: SipMessage, method: str, uri: str) -> str:
        offers = challenge.all("www-authenticate")
        params = next((digest_params(o) for o in offers if "md5" in o.lower() or "algorithm" not in o.lower()),
                      digest_params(offers[0]) if offers else {})
        realm, nonce = params.get("realm", ""), params.get("nonce", "")
        ha1, ha2 = _md5(f"{self.user}:{realm}:{self.password}"), _md5(f"{method}:{uri}")
        value = f'Digest username="{self.user}", realm="{realm}", nonce="{nonce}", uri="{uri}", algorithm=MD5'
        if "auth" in params.get("qop", "").split(","):
            cnonce, nc = secrets.token_hex(8), "00000001"
            value += f', qop=auth, nc={nc}, cnonce="{cnonce}", response="{_md5(f"{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}")}"'
        else:
            value += f', response="{_md5(f"{ha1}:{nonce}:{ha2}")}"'
        if "opaque" in params:
            value += f', opaque="{params["opaque"]}"'
        return f"Authorization: {value}"
