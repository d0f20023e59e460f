"""A TLS/SRTP alarm call proven encrypted on the wire, from a capture of the loopback interface.

A pjsua2 post (the real backend, in this process) calls the queue of a real Asterisk 22 over TLS; a desk
robot on UDP answers and plays a chirp whose PCMU bytes are known. Everything on ``lo`` is captured with an
AF_PACKET socket (tests/support/capture.py). The chirp is found in the desk's plain RTP (so the detector and
the capture work) and nowhere between the post and the PBX; the SIP text readable on the desk's leg is
nowhere in the post's TLS stream; the post's RTP carries SRTP's authentication tag, and its silence reads as
random bytes.

Twice: with the endpoints as rendered (the post's leg is G.722, Asterisk transcodes), and with the posts'
codecs narrowed to PCMU in a copy of the templates, so that Asterisk relays the desk's frames unchanged and a
post leg in clear would carry the very bytes the detector looks for.
"""

from __future__ import annotations

import array
import math
import re
import shutil
import struct
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sip_refuge.config.model import Site
from sip_refuge.pbx.asterisk import Asterisk
from sip_refuge.pbx.render import TEMPLATES
from sip_refuge.post import events as ev
from tests.integration.test_post_pjsua2 import Events, start_backend, wait_until
from tests.support.capture import LoopbackCapture, Packet
from tests.support.desk_robot import DeskRobot
from tests.support.sites import tls_site

with warnings.catch_warnings():
    # The robot's PCMU encoder (pyVoIP's) is audioop's, deprecated since Python 3.11; use the very same one.
    warnings.filterwarnings("ignore", message=".*audioop.*", category=DeprecationWarning)
    import audioop

pytestmark = pytest.mark.integration

RATE, FRAME = 8000, 160
WINDOW = 12  # bytes of the chirp that must match in a row: never by chance in 12 random bytes (2^-96)
PCMU, G722 = 0, 9  # RTP payload types
SIP_TEXT = (b"SIP/2.0", b"Via:", b"INVITE sip:", b"REGISTER sip:", b"CSeq:", b"Contact:", b"application/sdp",
            b"a=crypto", b"Authorization:")
TLS_HANDSHAKE = b"\x16\x03"  # a TLS record of type handshake: how a TLS connection starts, both ways
SRTP_TAGS = (10, 4)  # bytes of the authentication tag: AES_CM_128_HMAC_SHA1_80, _32


def chirp(seconds: float = 2.0, low: float = 300.0, high: float = 3300.0) -> bytes:
    """16-bit 8 kHz audio of a linear sweep from ``low`` to ``high``: no two stretches of it alike."""
    count = int(seconds * RATE)
    rate = (high - low) / seconds
    samples = (int(9000 * math.sin(2 * math.pi * (low * t + rate * t * t / 2)))
               for t in (i / RATE for i in range(count)))
    return array.array("h", samples).tobytes()


CHIRP = chirp()
SIGNAL = audioop.lin2ulaw(CHIRP, 2)  # the PCMU bytes the robot sends
FRAMES = [SIGNAL[i:i + FRAME] for i in range(0, len(SIGNAL) - FRAME + 1, FRAME)]
WINDOWS = {SIGNAL[i:i + WINDOW] for i in range(len(SIGNAL) - WINDOW + 1)}


def carries_signal(data: bytes) -> bool:
    return any(data[i:i + WINDOW] in WINDOWS for i in range(len(data) - WINDOW + 1))


def rtp(packet: Packet) -> tuple[int, bytes] | None:
    """(payload type, what follows the header) of an RTP packet; None for RTCP or anything else."""
    data = packet.payload
    if len(data) < 12 or data[0] >> 6 != 2 or 200 <= data[1] <= 206:
        return None
    offset = 12 + 4 * (data[0] & 0x0F)
    if data[0] & 0x10 and len(data) >= offset + 4:
        offset += 4 + 4 * struct.unpack("!H", data[offset + 2:offset + 4])[0]
    return data[1] & 0x7F, data[offset:]


def entropy(data: bytes) -> float:
    """Shannon entropy in bits per byte of ``data``'s byte values: PCMU silence about 0, cipher text near 7."""
    counts = Counter(data)
    return -sum(n / len(data) * math.log2(n / len(data)) for n in counts.values())


def stream(packets: list[Packet], src_port: int, dst_port: int) -> bytes:
    """One direction of a TCP connection, its segments in sequence order (retransmissions once)."""
    mine = [p for p in packets if p.ports() == (src_port, dst_port) and p.payload]
    if not mine:
        return b""
    first = mine[0].seq  # sequence numbers start anywhere and wrap at 2^32
    segments = {(p.seq - first) % 2**32: p.payload for p in mine}
    return b"".join(segments[offset] for offset in sorted(segments))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    return tls_site(tmp_path_factory.mktemp("tls-wire"))


def pcmu_templates(folder: Path) -> Path:
    """A copy of the templates whose pjsua2 posts speak PCMU only (nothing else changed)."""
    shutil.copytree(TEMPLATES, folder)
    path = folder / "pjsip_refuge.conf.j2"
    text, count = re.subn(r"^(\[refuge-post-pjsua2\]\(!,refuge-phone\)\n)", r"\1disallow=all\nallow=ulaw\n",
                          path.read_text(encoding="utf-8"), flags=re.M)
    assert count == 1
    path.write_text(text, encoding="utf-8")
    return folder


@dataclass(frozen=True)
class Pbx:
    asterisk: Asterisk
    codec: int  # the RTP payload type of the post's leg


@pytest.fixture(scope="module", params=[G722, PCMU], ids=["as-rendered-g722", "posts-on-pcmu"])
def pbx(request: pytest.FixtureRequest, site: Site, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pbx]:
    templates = pcmu_templates(tmp_path_factory.mktemp("pcmu") / "templates") if request.param == PCMU else None
    with Asterisk(site, templates=templates) as ast:
        yield Pbx(ast, request.param)


def test_tls_call_carries_no_readable_sip_and_no_plain_rtp_between_post_and_pbx(
        site: Site, pbx: Pbx, record_property: Callable[[str, object], None]) -> None:
    """A TLS/SRTP alarm call shows no SIP text and no trace of the desk's chirp between post and PBX on lo.

    Positive controls: the chirp and the SIP are plain on the desk's UDP leg, and the post hears the desk's
    DTMF sent after the chirp."""
    assert site.pbx.tls is not None
    tls_port, sip_port = site.pbx.tls.port, site.pbx.sip_port
    media = range(site.pbx.rtp_start, site.pbx.rtp_end + 1)

    def ours(p: Packet) -> bool:
        a, b = p.ports()
        if p.proto == "tcp":
            return tls_port in (a, b)
        return sip_port in (a, b) or a in media or b in media

    desk = site.desk("desk-1")
    events = Events()
    heard: list[str] = []
    got_digit = threading.Event()
    with LoopbackCapture(ours) as capture, \
            DeskRobot(desk.id, desk.secret.read(), (site.pbx.host, sip_port), answer_after=0.0) as robot:
        robot.wait_registered()
        wait_until(lambda: "(Not in use)" in pbx.asterisk.cli(f"queue show {site.queue.name}"), 10, "desk-1 free in the queue")
        backend = start_backend(site, events)
        try:
            backend.on_dtmf = lambda call_id, digit: (heard.append(digit), got_digit.set())
            events.wait(ev.Registered, timeout=15)
            backend.dial("alarm-wire", site.queue.extension, site.pbx.host, False)
            ring = robot.wait_ring()
            robot.wait_answered(ring)
            events.wait(ev.CallAnswered, where=lambda e: e.call_id == "alarm-wire")
            desk_rtp = {ring.call.rtp.port, ring.call.rtp.port + 1}
            robot.play_pcm(CHIRP, ring)
            # Positive control, and the moment the whole chirp has gone to the PBX: every frame of it in the
            # desk's RTP, exactly as sent.
            capture.wait_for(lambda packets: set(FRAMES) <= {
                r[1] for p in packets if p.proto == "udp" and p.src[1] == ring.call.rtp.port and (r := rtp(p))},
                15, "the whole chirp in the desk's RTP")
            # RTP keeps its order: a digit the post hears after the chirp came through the leg the chirp took.
            robot.send_dtmf("7", ring)
            assert got_digit.wait(10), "the desk's DTMF after the chirp never reached the post"
            robot.hangup(ring)
            events.wait(ev.CallEnded, where=lambda e: e.call_id == "alarm-wire")
        finally:
            backend.stop()
        dropped = capture.drops()
    packets = capture.snapshot()
    assert heard == ["7"]

    desk_sip = [p for p in packets if p.proto == "udp" and p.between(robot.ua.port, sip_port)]
    desk_media = [p for p in packets if p.proto == "udp" and desk_rtp & set(p.ports())]
    post_tls = [p for p in packets if p.proto == "tcp"]
    post_media = [p for p in packets if p.proto == "udp" and not desk_rtp & set(p.ports())
                  and sip_port not in p.ports()]
    stray_sip = [p for p in packets if p.proto == "udp" and sip_port in p.ports() and p not in desk_sip]

    # (a) The detectors work where things are in clear: the desk's UDP leg.
    assert sum(carries_signal(p.payload) for p in desk_media) >= len(FRAMES)
    desk_text = b"".join(p.payload for p in desk_sip)
    assert b"INVITE sip:" in desk_text and b"Via:" in desk_text

    # (b) Between the post and the PBX: TLS only, no SIP text, no chirp; no SIP over UDP at all.
    assert not stray_sip, f"SIP over UDP besides the desk's: {stray_sip[:3]}"
    post_port = next(p.src[1] for p in post_tls if p.dst[1] == tls_port)
    upstream, downstream = stream(post_tls, post_port, tls_port), stream(post_tls, tls_port, post_port)
    assert upstream.startswith(TLS_HANDSHAKE) and downstream.startswith(TLS_HANDSHAKE)
    assert len(upstream) > 2000 and len(downstream) > 2000  # REGISTER, INVITE, ACK, BYE ... went this way
    post_id = site.posts[0].id.encode()
    for text in (*SIP_TEXT, post_id):
        assert text not in upstream and text not in downstream, f"{text!r} readable in the post's TLS stream"
    assert not carries_signal(upstream) and not carries_signal(downstream)
    to_post = [p for p in post_media if p.src[1] in media]
    from_post = [p for p in post_media if p.dst[1] in media]
    assert len(to_post) >= len(FRAMES) and len(from_post) >= len(FRAMES)  # the call's media went this way
    leaked = [p for p in post_media if carries_signal(p.payload)]
    assert not leaked, f"{len(leaked)} packets between post and PBX carry the chirp in clear"

    # (c) That media is SRTP: the codec expected (with PCMU, in clear it would be the desk's very bytes), each
    # packet 160 bytes of cipher text (20 ms of PCMU or G.722) plus an authentication tag, and the post's
    # silence reads as random bytes.
    codec = pbx.codec
    audio_to = [r[1] for p in to_post if (r := rtp(p)) and r[0] == codec]
    audio_from = [r[1] for p in from_post if (r := rtp(p)) and r[0] == codec]
    kinds = Counter(r[0] for p in to_post if (r := rtp(p)))
    assert len(audio_to) >= len(FRAMES), f"the post's leg is not payload type {codec}: {kinds}"
    lengths = Counter(len(a) for a in audio_to + audio_from)
    assert set(lengths) <= {FRAME + tag for tag in SRTP_TAGS}, f"RTP payload sizes {lengths}: not SRTP"
    silence = sum(entropy(a[:FRAME]) for a in audio_from) / len(audio_from)
    assert silence > 6.5, f"the post's audio averages {silence:.2f} bits per byte: not cipher text"
    record_property("packets", {"all": len(packets), "dropped": dropped, "desk_sip": len(desk_sip),
                                "desk_rtp": len(desk_media), "post_tls": len(post_tls), "post_srtp": len(post_media),
                                "post_audio_bits_per_byte": round(silence, 2)})
