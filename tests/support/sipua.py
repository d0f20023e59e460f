"""A small, real SIP user agent over UDP for integration tests against Asterisk.

Written raw (not pjsua2) so a test controls every byte of the Request-URI (toll-fraud strings, URI-encoded
tricks) and sees every provisional and final response in the order it arrived. It registers with digest
auth, places calls, answers calls (keeping their headers), answers OPTIONS/BYE/CANCEL by itself and sends and
receives RFC 4733 DTMF over RTP. One reader thread per peer handles the SIP socket and every RTP socket.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")
COMPACT = {"f": "from", "t": "to", "i": "call-id", "v": "via", "m": "contact", "l": "content-length",
           "c": "content-type", "k": "supported"}
DTMF_EVENTS = "0123456789*#ABCD"
TELEPHONE_EVENT = 101


@dataclass
class SipMessage:
    """One parsed SIP request or response, stamped with when it arrived (monotonic)."""

    start: str
    headers: list[tuple[str, str]]
    body: str = ""
    at: float = 0.0

    @classmethod
    def parse(cls, data: bytes) -> SipMessage:
        text = data.decode("utf-8", "replace")
        head, _, body = text.partition("\r\n\r\n")
        lines = head.split("\r\n")
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            if line[:1] in (" ", "\t") and headers:  # folded continuation line
                name, value = headers[-1]
                headers[-1] = (name, value + " " + line.strip())
            elif ":" in line:
                name, value = line.split(":", 1)
                name = name.strip().lower()
                headers.append((COMPACT.get(name, name), value.strip()))
        return cls(lines[0], headers, body, time.monotonic())

    @property
    def is_response(self) -> bool:
        return self.start.startswith("SIP/2.0 ")

    @property
    def code(self) -> int:
        return int(self.start.split()[1]) if self.is_response else 0

    @property
    def method(self) -> str:
        return self.cseq[1] if self.is_response else self.start.split()[0]

    @property
    def uri(self) -> str:
        return "" if self.is_response else self.start.split()[1]

    @property
    def cseq(self) -> tuple[int, str]:
        number, method = (self.header("cseq") or "0 NONE").split()
        return int(number), method

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for n, v in self.headers if n == name]

    def __str__(self) -> str:
        return self.start


def tag_of(value: str) -> str | None:
    m = re.search(r";\s*tag=([^;>\s]+)", value)
    return m.group(1) if m else None


def uri_of(value: str) -> str:
    m = re.search(r"<([^>]+)>", value)
    return m.group(1) if m else value.split(";")[0].strip()


def digest_params(value: str) -> dict[str, str]:
    return {k.lower(): v1 or v2 for k, v1, v2 in re.findall(r'(\w+)\s*=\s*(?:"([^"]*)"|([^\s,]+))', value)}


def _md5(text: str) -> str:
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


def sdp_media(body: str) -> tuple[tuple[str, int] | None, int | None]:
    """The (address, port) media goes to and the telephone-event payload type of an SDP body."""
    host = re.search(r"^c=IN IP4 (\S+)", body, re.M)
    port = re.search(r"^m=audio (\d+)", body, re.M)
    event = re.search(r"^a=rtpmap:(\d+) telephone-event/8000", body, re.M)
    address = (host.group(1), int(port.group(1))) if host and port else None
    return address, int(event.group(1)) if event else None


class Rtp:
    """One RTP stream: sends RFC 4733 DTMF (with a little PCMU silence first) and records what arrives."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.setblocking(False)
        self.port: int = self.sock.getsockname()[1]
        self.remote: tuple[str, int] | None = None
        self.event_pt = TELEPHONE_EVENT
        self.packets = 0
        self.digits: list[str] = []
        self._seen_events: set[int] = set()
        self._seq = secrets.randbelow(0x8000)
        self._ts = secrets.randbelow(0x10000000)
        self._ssrc = secrets.randbits(32)

    def _send(self, pt: int, payload: bytes, *, marker: bool = False, advance: int = 160) -> None:
        if self.remote is None:
            raise RuntimeError("no remote RTP address yet (no SDP answer)")
        header = struct.pack("!BBHII", 0x80, (0x80 if marker else 0) | pt, self._seq & 0xFFFF,
                             self._ts & 0xFFFFFFFF, self._ssrc)
        self.sock.sendto(header + payload, self.remote)
        self._seq += 1
        self._ts += advance

    def send_silence(self, frames: int = 5) -> None:
        for _ in range(frames):
            self._send(0, b"\xff" * 160)
            time.sleep(0.02)

    def send_dtmf(self, digit: str, duration_ms: int = 120) -> None:
        """Send one digit as RFC 4733 events: same timestamp, growing duration, end flag sent three times."""
        event = DTMF_EVENTS.index(digit.upper())
        start = self._ts
        steps = max(1, duration_ms // 20)
        for i in range(1, steps + 1):
            end = i == steps
            payload = struct.pack("!BBH", event, (0x80 if end else 0) | 10, i * 160)
            for _ in range(3 if end else 1):
                self._ts = start
                self._send(self.event_pt, payload, marker=i == 1, advance=0)
            time.sleep(0.02)
        self._ts = start + steps * 160

    def receive(self) -> None:
        """Called by the peer's reader thread when the socket is readable."""
        while True:
            try:
                data, source = self.sock.recvfrom(4096)
            except BlockingIOError:
                return
            if len(data) < 12:
                continue
            self.packets += 1
            if self.remote is None:
                self.remote = source
            pt = data[1] & 0x7F
            cc = data[0] & 0x0F
            offset = 12 + 4 * cc
            if data[0] & 0x10 and len(data) >= offset + 4:  # header extension
                offset += 4 + 4 * struct.unpack("!H", data[offset + 2:offset + 4])[0]
            if pt != self.event_pt or len(data) < offset + 4:
                continue
            timestamp = struct.unpack("!I", data[4:8])[0]
            event = data[offset]
            # Every packet of one event shares its timestamp: count the digit once.
            if timestamp not in self._seen_events and event < len(DTMF_EVENTS):
                self._seen_events.add(timestamp)
                self.digits.append(DTMF_EVENTS[event])

    def sdp(self, session: int) -> str:
        return ("v=0\r\n"
                f"o=- {session} {session} IN IP4 {self.host}\r\n"
                "s=sipua\r\n"
                f"c=IN IP4 {self.host}\r\n"
                "t=0 0\r\n"
                f"m=audio {self.port} RTP/AVP 0 {TELEPHONE_EVENT}\r\n"
                "a=rtpmap:0 PCMU/8000\r\n"
                f"a=rtpmap:{TELEPHONE_EVENT} telephone-event/8000\r\n"
                f"a=fmtp:{TELEPHONE_EVENT} 0-16\r\n"
                "a=ptime:20\r\n"
                "a=sendrecv\r\n")

    def use_answer(self, body: str) -> None:
        address, event_pt = sdp_media(body)
        if address:
            self.remote = address
        if event_pt is not None:
            self.event_pt = event_pt


@dataclass
class Dialog:
    call_id: str
    local_tag: str
    remote_tag: str | None = None
    local_uri: str = ""
    remote_uri: str = ""
    remote_target: str = ""
    cseq: int = 1


class OutgoingCall:
    """A call this peer placed: every response in arrival order, then ACK/BYE/CANCEL as the dialog needs."""

    def __init__(self, peer: SipPeer, uri: str, media_host: str | None = None) -> None:
        self.peer, self.uri = peer, uri
        self.dialog = Dialog(secrets.token_hex(8) + "@sipua", secrets.token_hex(4), local_uri=peer.aor, remote_uri=uri,
                             remote_target=uri)
        self.rtp = Rtp(media_host or peer.host)
        self.responses: list[SipMessage] = []
        self.final: SipMessage | None = None  # the final response to the last INVITE sent (after auth)
        self.sent_at = 0.0
        self.branch = ""
        self.authorized = False
        self.ended = False

    @property
    def codes(self) -> list[int]:
        return [r.code for r in self.responses]

    @property
    def confirmed(self) -> bool:
        return self.final is not None and 200 <= self.final.code < 300 and not self.ended

    def wait_final(self, timeout: float = 10.0) -> SipMessage:
        return self.peer.wait_for(lambda: self.final, timeout, f"final response to INVITE {self.uri}")

    def wait_code(self, code: int, timeout: float = 10.0) -> SipMessage:
        return self.peer.wait_for(lambda: next((r for r in self.responses if r.code == code), None), timeout,
                                  f"{code} to INVITE {self.uri}")

    def hangup(self, timeout: float = 5.0) -> None:
        """BYE when answered, CANCEL while still ringing, nothing when already over."""
        with self.peer.lock:
            final, ended = self.final, self.ended
        if ended or (final is not None and final.code >= 300):
            return
        if final is None:
            self.peer.send_cancel(self)
            self.wait_final(timeout)
        else:
            self.peer.request_in_dialog("BYE", self.dialog, timeout=timeout)
            with self.peer.lock:
                self.ended = True


class IncomingCall:
    """An INVITE this peer received; the INVITE (and its headers) stays in ``invite``."""

    def __init__(self, peer: SipPeer, invite: SipMessage, source: tuple[str, int]) -> None:
        self.peer, self.invite, self.source = peer, invite, source
        self.rtp = Rtp(peer.host)
        self.rtp.use_answer(invite.body)
        self.dialog = Dialog(invite.header("call-id") or "", secrets.token_hex(4),
                             remote_tag=tag_of(invite.header("from") or ""),
                             local_uri=uri_of(invite.header("to") or ""), remote_uri=uri_of(invite.header("from") or ""),
                             remote_target=uri_of(invite.header("contact") or invite.header("from") or ""), cseq=1)
        self.state = "ringing"  # ringing | answered | confirmed | cancelled | ended | rejected

    def answer(self, timeout: float = 5.0) -> None:
        # Mark the call answered before the 200 leaves: on loopback the ACK can come back first.
        with self.peer.lock:
            if self.state != "ringing":  # a cancelled call answered would look answered and connect nobody
                raise AssertionError(f"answering an incoming call that is {self.state}")
            self.state = "answered"
        self.peer.respond(self.invite, self.source, 200, "OK", tag=self.dialog.local_tag,
                          body=self.rtp.sdp(int(time.time())))
        self.peer.wait_for(lambda: self.state != "answered" or None, timeout, "ACK to our 200 OK")

    def reject(self, code: int = 486, reason: str = "Busy Here") -> None:
        self.peer.respond(self.invite, self.source, code, reason, tag=self.dialog.local_tag)
        with self.peer.lock:
            self.state = "rejected"

    def hangup(self, timeout: float = 5.0) -> None:
        if self.state in ("answered", "confirmed"):
            self.peer.request_in_dialog("BYE", self.dialog, timeout=timeout)
            with self.peer.lock:
                self.state = "ended"

    def wait_state(self, state: str, timeout: float = 10.0) -> None:
        self.peer.wait_for(lambda: self.state == state or None, timeout, f"incoming call {state}")


@dataclass
class _Transaction:
    method: str
    responses: list[SipMessage] = field(default_factory=list)


class SipPeer:
    """A registered SIP phone: a post or a desk in tests. Use as a context manager."""

    def __init__(self, user: str, password: str, server: tuple[str, int], *, host: str = "127.0.0.1",
                 display: str | None = None, ring: bool = True) -> None:
        self.user, self.password, self.server, self.host = user, password, server, host
        self.display = display
        self.ring = ring  # answer incoming INVITEs with 180 Ringing at once (a desk phone does)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.port: int = self.sock.getsockname()[1]
        self.aor = f"sip:{user}@{server[0]}:{server[1]}"
        self.contact = f"<sip:{user}@{host}:{self.port};transport=udp>"
        self.lock = threading.Condition()
        self.incoming: list[IncomingCall] = []
        self.requests: list[SipMessage] = []  # every request Asterisk sent us, OPTIONS included
        self.calls: list[OutgoingCall] = []
        self._transactions: dict[tuple[str, str], _Transaction] = {}
        self._rtp: dict[int, Rtp] = {}
        self._register_call_id = secrets.token_hex(8) + "@sipua"
        self._register_cseq = 0
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.sock, selectors.EVENT_READ)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"sipua-{user}", daemon=True)
        self._thread.start()

    # -- plumbing ---------------------------------------------------------------------------------------
    def __enter__(self) -> SipPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for call in list(self.calls):
            try:
                call.hangup(timeout=2)
            except TimeoutError:
                pass
        self._stopping = True
        self._thread.join(timeout=2)
        self._selector.close()
        self.sock.close()
        for rtp in self._rtp.values():
            rtp.sock.close()

    def wait_for(self, probe: Callable[[], T | None], timeout: float, what: str) -> T:
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                value = probe()
                if value is not None and value is not False:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{self.user}: no {what} within {timeout} s")
                self.lock.wait(remaining)

    def _add_rtp(self, rtp: Rtp) -> None:
        self._rtp[rtp.sock.fileno()] = rtp
        self._selector.register(rtp.sock, selectors.EVENT_READ)

    def _run(self) -> None:
        while not self._stopping:
            for key, _ in self._selector.select(timeout=0.1):
                if key.fileobj is self.sock:
                    try:
                        data, source = self.sock.recvfrom(65535)
                    except OSError:
                        continue
                    if data.strip():  # keep-alive CRLFs carry nothing
                        self._handle(SipMessage.parse(data), source)
                else:
                    with self.lock:
                        self._rtp[key.fd].receive()
                        self.lock.notify_all()

    def _send(self, text: str, to: tuple[str, int] | None = None) -> None:
        self.sock.sendto(text.encode(), to or self.server)

    def _via(self, branch: str) -> str:
        return f"SIP/2.0/UDP {self.host}:{self.port};branch={branch};rport"

    def _from(self, tag: str) -> str:
        name = f'"{self.display}" ' if self.display else ""
        return f"{name}<{self.aor}>;tag={tag}"

    def _request(self, method: str, uri: str, headers: list[str], body: str = "",
                 branch: str | None = None) -> str:
        branch = branch or "z9hG4bK" + secrets.token_hex(8)
        with self.lock:
            self._transactions[(branch, method)] = _Transaction(method)
        lines = [f"{method} {uri} SIP/2.0", f"Via: {self._via(branch)}", "Max-Forwards: 70", *headers,
                 "User-Agent: sip-refuge-test-ua"]
        if body:
            lines.append("Content-Type: application/sdp")
        lines.append(f"Content-Length: {len(body.encode())}")
        self._send("\r\n".join(lines) + "\r\n\r\n" + body)
        return branch

    def _wait_transaction(self, branch: str, method: str, timeout: float) -> SipMessage:
        def final() -> SipMessage | None:
            t = self._transactions.get((branch, method))
            return next((r for r in t.responses if r.code >= 200), None) if t else None
        return self.wait_for(final, timeout, f"final response to {method}")

    def _authorization(self, challenge: SipMessage, method: str, uri: str) -> str:
        header = "proxy-authorization" if challenge.code == 407 else "authorization"
        offers = challenge.all("www-authenticate" if challenge.code == 401 else "proxy-authenticate")
        params = next((digest_params(o) for o in offers if "md5" in o.lower() or "algorithm" not in o.lower()),
                      digest_params(offers[0]) if offers else {})
        realm, nonce = params.get("realm", ""), params.get("nonce", "")
        ha1 = _md5(f"{self.user}:{realm}:{self.password}")
        ha2 = _md5(f"{method}:{uri}")
        value = f'Digest username="{self.user}", realm="{realm}", nonce="{nonce}", uri="{uri}", algorithm=MD5'
        if "auth" in params.get("qop", "").split(","):
            cnonce, nc = secrets.token_hex(8), "00000001"
            response = _md5(f"{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}")
            value += f', qop=auth, nc={nc}, cnonce="{cnonce}"'
        else:
            response = _md5(f"{ha1}:{nonce}:{ha2}")
        value += f', response="{response}"'
        if "opaque" in params:
            value += f', opaque="{params["opaque"]}"'
        return f"{header.title()}: {value}"

    # -- registration -----------------------------------------------------------------------------------
    def sign_off(self) -> None:
        """A test's clean-up: unregister (if the PBX answers within 2 s), then close, whatever the test left."""
        try:
            self.register(expires=0, timeout=2)
        except TimeoutError:
            pass
        self.close()

    def register(self, expires: int = 300, timeout: float = 5.0) -> SipMessage:
        """REGISTER, answering one digest challenge; returns the final response (200, or 401 when refused)."""
        uri = f"sip:{self.server[0]}:{self.server[1]}"
        auth: list[str] = []
        tag = secrets.token_hex(4)
        response: SipMessage | None = None
        for _ in range(2):
            self._register_cseq += 1
            headers = [f"From: {self._from(tag)}", f"To: <{self.aor}>", f"Call-ID: {self._register_call_id}",
                       f"CSeq: {self._register_cseq} REGISTER", f"Contact: {self.contact}", f"Expires: {expires}",
                       *auth]
            branch = self._request("REGISTER", uri, headers)
            response = self._wait_transaction(branch, "REGISTER", timeout)
            if response.code not in (401, 407) or auth:
                break
            auth = [self._authorization(response, "REGISTER", uri)]
        assert response is not None
        return response

    # -- calls ------------------------------------------------------------------------------------------
    def call(self, target: str, *, uri: str | None = None, media_host: str | None = None) -> OutgoingCall:
        """INVITE ``target`` (inserted verbatim as the user part) or a whole Request-URI ``uri``; the SDP offers
        media on ``media_host`` (default: this peer's own address)."""
        call = OutgoingCall(self, uri or f"sip:{target}@{self.server[0]}:{self.server[1]}", media_host)
        with self.lock:
            self.calls.append(call)
            self._add_rtp(call.rtp)
        self._send_invite(call, [])
        return call

    def _send_invite(self, call: OutgoingCall, auth: list[str]) -> None:
        d = call.dialog
        headers = [f"From: {self._from(d.local_tag)}", f"To: <{call.uri}>", f"Call-ID: {d.call_id}",
                   f"CSeq: {d.cseq} INVITE", f"Contact: {self.contact}", "Allow: INVITE, ACK, CANCEL, BYE, OPTIONS",
                   *auth]
        call.sent_at = time.monotonic()
        # The branch is the call's before the INVITE leaves: the reader thread may answer a 401 with the
        # authenticated INVITE (a new branch) before _request returns here, and a CANCEL must use the latest.
        call.branch = "z9hG4bK" + secrets.token_hex(8)
        self._request("INVITE", call.uri, headers, call.rtp.sdp(int(time.time())), branch=call.branch)

    def send_cancel(self, call: OutgoingCall) -> None:
        d = call.dialog
        headers = [f"From: {self._from(d.local_tag)}", f"To: <{call.uri}>", f"Call-ID: {d.call_id}",
                   f"CSeq: {d.cseq} CANCEL"]
        self._request("CANCEL", call.uri, headers, branch=call.branch)

    def request_in_dialog(self, method: str, d: Dialog, timeout: float = 5.0) -> SipMessage:
        with self.lock:
            d.cseq += 1
            cseq = d.cseq
        to = f"<{d.remote_uri}>" + (f";tag={d.remote_tag}" if d.remote_tag else "")
        local = f"<{d.local_uri}>;tag={d.local_tag}"
        headers = [f"From: {local}", f"To: {to}", f"Call-ID: {d.call_id}", f"CSeq: {cseq} {method}"]
        branch = self._request(method, d.remote_target, headers)
        return self._wait_transaction(branch, method, timeout)

    def _ack(self, call: OutgoingCall, response: SipMessage) -> None:
        d = call.dialog
        ok = 200 <= response.code < 300
        # A 2xx ACK is its own transaction to the remote target; a non-2xx ACK reuses the INVITE's branch.
        uri = d.remote_target if ok else call.uri
        headers = [f"From: {self._from(d.local_tag)}", f"To: {response.header('to')}", f"Call-ID: {d.call_id}",
                   f"CSeq: {response.cseq[0]} ACK"]
        lines = [f"ACK {uri} SIP/2.0", f"Via: {self._via(call.branch if not ok else 'z9hG4bK' + secrets.token_hex(8))}",
                 "Max-Forwards: 70", *headers, "Content-Length: 0"]
        self._send("\r\n".join(lines) + "\r\n\r\n")

    def respond(self, request: SipMessage, to: tuple[str, int], code: int, reason: str, *, tag: str | None = None,
                body: str = "") -> None:
        lines = [f"SIP/2.0 {code} {reason}", *(f"Via: {v}" for v in request.all("via"))]
        to_header = request.header("to") or ""
        if tag and not tag_of(to_header):
            to_header += f";tag={tag}"
        lines += [f"From: {request.header('from')}", f"To: {to_header}", f"Call-ID: {request.header('call-id')}",
                  f"CSeq: {request.header('cseq')}"]
        if request.method == "INVITE" and code < 300:
            lines.append(f"Contact: {self.contact}")
        if body:
            lines.append("Content-Type: application/sdp")
        lines.append(f"Content-Length: {len(body.encode())}")
        self._send("\r\n".join(lines) + "\r\n\r\n" + body, to)

    # -- the reader thread's dispatch ---------------------------------------------------------------------
    def _handle(self, msg: SipMessage, source: tuple[str, int]) -> None:
        with self.lock:
            if msg.is_response:
                self._on_response(msg)
            else:
                self.requests.append(msg)
                self._on_request(msg, source)
            self.lock.notify_all()

    def _on_response(self, msg: SipMessage) -> None:
        via = msg.header("via") or ""
        found = re.search(r"branch=([^;\s]+)", via)
        branch = found.group(1) if found else ""
        transaction = self._transactions.get((branch, msg.method))
        if transaction is None:
            return
        transaction.responses.append(msg)
        if msg.method != "INVITE":
            return
        call = next((c for c in self.calls if c.branch == branch or c.dialog.call_id == msg.header("call-id")), None)
        if call is None:
            return
        if call.final is not None and msg.code >= 200:  # a retransmitted final response: ACK it again
            if 200 <= msg.code < 300:
                self._ack(call, msg)
            return
        call.responses.append(msg)
        if msg.code < 200:
            if msg.body:
                call.rtp.use_answer(msg.body)  # early media (183)
            return
        if msg.code in (401, 407) and not call.authorized:
            self._ack(call, msg)
            call.authorized = True
            call.dialog.cseq += 1
            self._send_invite(call, [self._authorization(msg, "INVITE", call.uri)])
            return
        call.final = msg
        if 200 <= msg.code < 300:
            call.dialog.remote_tag = tag_of(msg.header("to") or "")
            call.dialog.remote_target = uri_of(msg.header("contact") or call.uri)
            if msg.body:
                call.rtp.use_answer(msg.body)
        else:
            call.ended = True
        self._ack(call, msg)

    def _on_request(self, msg: SipMessage, source: tuple[str, int]) -> None:
        call_id = msg.header("call-id")
        incoming = next((c for c in self.incoming if c.dialog.call_id == call_id), None)
        outgoing = next((c for c in self.calls if c.dialog.call_id == call_id), None)
        if msg.method == "INVITE":
            if incoming is not None:
                if tag_of(msg.header("to") or ""):  # re-INVITE in the dialog: accept whatever it changes
                    self.respond(msg, source, 200, "OK", body=incoming.rtp.sdp(int(time.time())))
                return  # else a retransmission of the initial INVITE: we already answered it
            if outgoing is not None:
                self.respond(msg, source, 200, "OK", body=outgoing.rtp.sdp(int(time.time())))
                return
            call = IncomingCall(self, msg, source)
            self.incoming.append(call)
            self._add_rtp(call.rtp)
            self.respond(msg, source, 100, "Trying")
            if self.ring:
                self.respond(msg, source, 180, "Ringing", tag=call.dialog.local_tag)
        elif msg.method == "ACK":
            if incoming is not None and incoming.state == "answered":
                incoming.state = "confirmed"
        elif msg.method == "CANCEL":
            self.respond(msg, source, 200, "OK")
            if incoming is not None and incoming.state == "ringing":
                self.respond(incoming.invite, incoming.source, 487, "Request Terminated", tag=incoming.dialog.local_tag)
                incoming.state = "cancelled"
        elif msg.method == "BYE":
            self.respond(msg, source, 200, "OK")
            if incoming is not None:
                incoming.state = "ended"
            if outgoing is not None:
                outgoing.ended = True
        else:  # OPTIONS (qualify), UPDATE, INFO, NOTIFY: say yes, a phone would
            self.respond(msg, source, 200, "OK")

    def wait_incoming(self, timeout: float = 10.0, index: int = 0) -> IncomingCall:
        return self.wait_for(lambda: self.incoming[index] if len(self.incoming) > index else None, timeout,
                             "incoming INVITE")

    def invites(self) -> list[SipMessage]:
        with self.lock:
            return [r for r in self.requests if r.method == "INVITE"]
