"""SIP messages for the pyVoIP backend: pyVoIP's parser for SDP, our own for the headers we must echo.

pyVoIP 1.6.8's ``SIPMessage`` raises on any method but INVITE/ACK/BYE/CANCEL (so Asterisk's qualify OPTIONS
were never answered and the post went Unavailable), keeps only the first of repeated headers, and raises on
status codes it does not list. Responses must copy every Via line byte for byte, so we keep the raw header
lines ourselves and ask pyVoIP only for what it parses well: the SDP body and the From/To name parts.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*audioop.*", category=DeprecationWarning)
    import pyVoIP
    import pyVoIP.VoIP  # noqa: F401 - first: importing pyVoIP.SIP alone fails on a circular import
    from pyVoIP import RTP, SIP

COMPACT = {"f": "from", "t": "to", "i": "call-id", "v": "via", "m": "contact", "l": "content-length",
           "c": "content-type", "k": "supported"}
# Methods we let pyVoIP's parser accept; what we do with each is decided in pyvoip_ua.
METHODS = ["INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "UPDATE", "INFO", "NOTIFY", "MESSAGE", "PRACK",
           "REFER", "SUBSCRIBE", "REGISTER", "PUBLISH"]
USER_AGENT = f"sip-refuge (pyVoIP {pyVoIP.__version__})"
_TOKEN = re.compile(r"[A-Za-z0-9.!%*_+`'~-]{1,32}")  # a SIP method (RFC 3261 token), kept short


class _SdpParser(SIP.SIPMessage):
    """pyVoIP's parser with every method allowed (its class attribute list is only INVITE/ACK/BYE/CANCEL)."""

    def parse(self, data: bytes) -> None:
        self.SIPCompatibleMethods = METHODS
        super().parse(data)


@dataclass
class Message:
    """One received SIP request or response, stamped with its arrival time (monotonic)."""

    start: str
    headers: list[tuple[str, str]]
    body: bytes
    raw: bytes
    at: float = field(default_factory=time.monotonic)

    @classmethod
    def parse(cls, data: bytes) -> Message:
        """Parse one datagram; ValueError (naming what is wrong) for anything our transactions could trip on
        later: every property below then works on the message it returns."""
        head, sep, body = data.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("no end of headers (CRLF CRLF)")
        lines = head.decode("utf-8", "replace").split("\r\n")
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            if line[:1] in (" ", "\t") and headers:  # folded continuation line
                headers[-1] = (headers[-1][0], headers[-1][1] + " " + line.strip())
            elif ":" in line:
                name, value = line.split(":", 1)
                name = name.strip().lower()
                headers.append((COMPACT.get(name, name), value.strip()))
        msg = cls(lines[0], headers, body, data)
        msg._check()
        return msg

    def _check(self) -> None:
        parts = self.start.split(" ", 2)
        if len(parts) < 3:
            raise ValueError(f"not a SIP start line: {self.start[:60]!r}")
        if self.is_response:
            if not (parts[1].isascii() and parts[1].isdigit() and len(parts[1]) == 3 and parts[1][0] in "123456"):
                raise ValueError(f"bad status code {parts[1][:20]!r}")
        elif not (_TOKEN.fullmatch(parts[0]) and parts[2] == "SIP/2.0"):
            raise ValueError(f"not a SIP request line: {self.start[:60]!r}")
        number, _, method = self.header("cseq").partition(" ")
        if not (number.isascii() and number.isdigit() and len(number) <= 10 and _TOKEN.fullmatch(method.strip())):
            raise ValueError(f"bad CSeq {self.header('cseq')[:40]!r}")
        if not self.is_response and method.strip() != parts[0]:
            raise ValueError(f"CSeq method {method.strip()[:20]!r} is not the request's {parts[0][:20]!r}")
        for name in ("call-id", "from", "to", "via"):
            if not self.header(name):
                raise ValueError(f"no {name} header")

    @property
    def is_response(self) -> bool:
        return self.start.startswith("SIP/2.0 ")

    @property
    def code(self) -> int:
        return int(self.start.split()[1]) if self.is_response else 0

    @property
    def reason(self) -> str:
        return self.start.split(" ", 2)[2] if self.is_response else ""

    @property
    def method(self) -> str:
        return self.cseq[1] if self.is_response else self.start.split()[0]

    @property
    def cseq(self) -> tuple[int, str]:
        number, _, method = self.header("cseq").partition(" ")
        return int(number or 0), method.strip()

    @property
    def call_id(self) -> str:
        return self.header("call-id")

    @property
    def branch(self) -> str:
        match = re.search(r";\s*branch=([^;,\s]+)", self.header("via"))
        return match.group(1) if match else ""

    def header(self, name: str) -> str:
        return next((v for n, v in self.headers if n == name), "")

    def all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n == name]

    def sdp(self) -> dict[str, Any] | None:
        """The SDP body as pyVoIP parses it (``c``, ``m`` with rtpmap attributes), or None."""
        if not self.body.strip() or "application/sdp" not in self.header("content-type"):
            return None
        try:
            body: dict[str, Any] = _SdpParser(self.raw).body
        except Exception:  # noqa: BLE001 - pyVoIP's parser raises what it likes on bad SDP: no usable offer
            return None
        return body if isinstance(body, dict) and body.get("m") else None


def tag_of(value: str) -> str:
    match = re.search(r";\s*tag=([^;>\s]+)", value)
    return match.group(1) if match else ""


def uri_of(value: str) -> str:
    match = re.search(r"<([^>]*)>", value)
    return match.group(1) if match else value.split(";")[0].strip()


def display_or_user(value: str) -> str:
    """What a phone shows for a From header: the display name, else the user part."""
    match = re.match(r'\s*"([^"]*)"', value) or re.match(r"\s*([^<\"]+?)\s*<", value)
    if match and match.group(1).strip():
        return match.group(1).strip()
    user = re.search(r"sips?:([^@;>]+)@", value)
    return user.group(1) if user else uri_of(value)


def new_tag() -> str:
    return secrets.token_hex(6)


def new_branch() -> str:
    return "z9hG4bK" + secrets.token_hex(10)


def digest(challenge: str, *, method: str, uri: str, user: str, password: str, nc: int = 1) -> str:
    """An ``Authorization`` value for a ``WWW-Authenticate``/``Proxy-Authenticate`` challenge (MD5, qop=auth).

    pyVoIP's own ``gen_authorization`` ignores qop and signs a fixed ``sip:server;transport=UDP`` URI.
    """
    params = {k.lower(): a or b for k, a, b in re.findall(r'(\w+)\s*=\s*(?:"([^"]*)"|([^\s,]+))', challenge)}
    realm, nonce = params.get("realm", ""), params.get("nonce", "")
    ha1 = _md5(f"{user}:{realm}:{password}")
    ha2 = _md5(f"{method}:{uri}")
    parts = [f'username="{user}"', f'realm="{realm}"', f'nonce="{nonce}"', f'uri="{uri}"', "algorithm=MD5"]
    if "auth" in [q.strip() for q in params.get("qop", "").split(",")]:
        cnonce = secrets.token_hex(8)
        response = _md5(f"{ha1}:{nonce}:{nc:08x}:{cnonce}:auth:{ha2}")
        parts += ["qop=auth", f"nc={nc:08x}", f'cnonce="{cnonce}"']
    else:
        response = _md5(f"{ha1}:{nonce}:{ha2}")
    parts.append(f'response="{response}"')
    if "opaque" in params:
        parts.append(f'opaque="{params["opaque"]}"')
    return "Digest " + ", ".join(parts)


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()  # noqa: S324 - SIP digest is MD5 by definition


def remote_media(sdp: dict[str, Any]) -> tuple[str, int, dict[int, Any]] | None:
    """Address, port and payload map (number -> pyVoIP PayloadType) of the first audio stream we can use;
    None when there is none, or the SDP is too odd to tell."""
    try:
        return _remote_media(sdp)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        return None


def _remote_media(sdp: dict[str, Any]) -> tuple[str, int, dict[int, Any]] | None:
    conns = sdp.get("c") or []
    for media in sdp.get("m", []):
        if media.get("type") != "audio" or not media.get("port"):
            continue
        assoc: dict[int, Any] = {}
        for fmt in media.get("methods", []):
            name = ((media.get("attributes", {}).get(fmt) or {}).get("rtpmap") or {}).get("name", "")
            try:
                kind = RTP.PayloadType(name) if name else RTP.PayloadType(int(fmt))
            except ValueError:
                try:
                    kind = RTP.PayloadType(int(fmt))
                except ValueError:
                    continue
            if kind in (RTP.PayloadType.PCMU, RTP.PayloadType.PCMA, RTP.PayloadType.EVENT):
                assoc[int(fmt)] = kind
        port = int(media["port"])
        if conns and 0 < port < 65536 and any(k != RTP.PayloadType.EVENT for k in assoc.values()):
            return str(conns[0]["address"]), port, assoc
    return None


def sdp_body(host: str, port: int, session: int, version: int, assoc: dict[int, Any]) -> str:
    """Our SDP offer or answer: one audio stream with the payloads in ``assoc``."""
    lines = ["v=0", f"o=- {session} {version} IN IP4 {host}", "s=sip-refuge", f"c=IN IP4 {host}", "t=0 0",
             f"m=audio {port} RTP/AVP " + " ".join(str(pt) for pt in assoc)]
    for pt, kind in assoc.items():
        lines.append(f"a=rtpmap:{pt} {kind}/{kind.rate}")
        if kind == RTP.PayloadType.EVENT:
            lines.append(f"a=fmtp:{pt} 0-16")
    lines += ["a=ptime:20", "a=sendrecv"]
    return "\r\n".join(lines) + "\r\n"
