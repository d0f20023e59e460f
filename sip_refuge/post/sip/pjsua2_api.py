"""What the pjsua2 backend asks of pjsua2 itself: library, transport and account settings, and call facts.

The binding is pjproject's official SWIG one (``pjsip-apps/src/swig/python``), built from source by
:mod:`sip_refuge.post.sip.pjsua2_build`: getters are methods (``call.getInfo()``), config structs have plain
attributes, enums are ints and module constants (``pj.PJSIP_INV_STATE_CONFIRMED``). It ships no type
information, so its objects are typed ``Any`` here.

A struct member read from a SWIG object (``info.media``, ``stat.rtcp``) points into that object: keep the
object in a name while reading it, never ``call.getInfo().media`` (the temporary is freed at once and the
member then reads garbage).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pjsua2 as _pjsua2

from sip_refuge.config.model import Pbx, Post, Tls

pj: Any = _pjsua2

INV_EARLY = int(pj.PJSIP_INV_STATE_EARLY)
INV_CONNECTING = int(pj.PJSIP_INV_STATE_CONNECTING)
INV_CONFIRMED = int(pj.PJSIP_INV_STATE_CONFIRMED)
INV_DISCONNECTED = int(pj.PJSIP_INV_STATE_DISCONNECTED)
_LOCAL_EVENTS = (int(pj.PJSIP_EVENT_TIMER), int(pj.PJSIP_EVENT_TRANSPORT_ERROR))
TRANSPORTS = {"udp": int(pj.PJSIP_TRANSPORT_UDP), "tcp": int(pj.PJSIP_TRANSPORT_TCP),
              "tls": int(pj.PJSIP_TRANSPORT_TLS)}


@dataclass(frozen=True)
class MediaSettings:
    """Audio settings. ``codecs``: codec ids (``G722/16000``, ``PCMU/8000``...) to offer, first preferred; empty
    keeps pjsua's order (G.722 first). Which card is used is the account's ``sound``."""

    codecs: tuple[str, ...] = ()
    ec_tail_ms: int = 200  # a metal post box rings: 200 ms covers its echo tail
    jb_init_ms: int = -1  # -1: pjmedia's adaptive default
    jb_min_pre_ms: int = 60  # LTE routers jitter: keep a little more in the buffer than pjmedia's default
    jb_max_pre_ms: int = 240
    jb_max_ms: int = 500


def endpoint_config(media: MediaSettings, log_file: str, log_level: int, *, sound_card: bool = False) -> Any:
    """The library settings: no worker threads, quiet logs, the post's media settings.

    No pjsip or media threads (``threadCnt = 0``, no media ioqueue) and ``mainThreadOnly``: the owner thread
    that calls ``libHandleEvents`` runs every SIP and RTP event and every callback itself, so callbacks never
    race the commands (pjsua may only be called from its own thread, ``notes/platform.md``).
    """
    cfg = pj.EpConfig()
    ua = cfg.uaConfig
    ua.maxCalls = 16  # calls given up on (no response) linger in pjsua until Timer B; the default 4 is tight
    ua.threadCnt = 0
    ua.mainThreadOnly = True
    logc = cfg.logConfig
    # pjsua writes to stdout by itself; keep it quiet. msgLogging off: no SIP message (with its digest
    # headers) ever reaches a log. A file is for debugging a site only.
    logc.consoleLevel = 0
    logc.msgLogging = 0
    logc.level = log_level if log_file else 0
    if log_file:
        logc.filename = log_file
    med = cfg.medConfig
    med.hasIoqueue = False  # RTP (and so received DTMF) shares the SIP ioqueue, polled by the owner thread
    med.threadCnt = 0
    # RTP keeps flowing through silence: a quiet post must not look dead to the PBX's rtp_timeout, and
    # the media timeout (stream statistics) can only judge a stream that never pauses.
    med.noVad = True
    med.clockRate = 16000  # the bridge (pjsua2_audio.BRIDGE_RATE): wideband end to end for G.722
    # pjmedia's canceller (speex, Debian's libspeexdsp) sits at a real sound device; with the mock card the card's
    # port runs the same library itself (pjsua2_audio.CardPort), and without a card there is no echo.
    med.ecTailLen = media.ec_tail_ms if sound_card else 0
    med.jbInit, med.jbMinPre = media.jb_init_ms, media.jb_min_pre_ms
    med.jbMaxPre, med.jbMax = media.jb_max_pre_ms, media.jb_max_ms
    return cfg


def codec_priorities(ep: Any, media: MediaSettings) -> None:
    """Offer only ``media.codecs``, in that order (nothing to do when it is empty)."""
    if not media.codecs:
        return
    infos = ep.codecEnum2()  # kept in a name while read (SWIG)
    known = [str(info.codecId) for info in infos]
    for codec in known:
        ep.codecSetPriority(codec, 0)
    for rank, wanted in enumerate(media.codecs):
        match = next((c for c in known if c.lower().startswith(wanted.lower())), None)
        if match is None:
            raise ValueError(f"codec {wanted!r} unknown to pjsua2 (it has {', '.join(known)})")
        ep.codecSetPriority(match, 250 - rank)


def transport_config(port: int, bound_address: str, tls: Tls | None = None) -> Any:
    """A transport config; ``tls`` (the site's TLS settings) only for the TLS transport."""
    cfg = pj.TransportConfig()
    cfg.port = port
    if bound_address:
        cfg.boundAddress = bound_address
    if tls is not None:
        tc = cfg.tlsConfig
        tc.proto = int(pj.PJ_SSL_SOCK_PROTO_TLS1_2) | int(pj.PJ_SSL_SOCK_PROTO_TLS1_3)  # as the PBX's method
        if tls.ca_file is not None:
            tc.CaListFile = str(tls.ca_file)
            tc.verifyServer = True  # a post must not hand its alarm to whoever answers on the TLS port
    return cfg


def transport_address(ep: Any, transport_id: int) -> tuple[str, int]:
    """(host, port) a transport listens on."""
    info = ep.transportGetInfo(transport_id)
    host, _, port = str(info.localName).rpartition(":")
    return host.strip("[]"), int(port)


def pbx_port(pbx: Pbx) -> tuple[int, str]:
    """The PBX's SIP port for the site's transport, and the URI parameter that selects the transport.
    Over TLS that is ``pbx.tls.port``: Asterisk's TLS transport listens there, not on ``sip_port``."""
    if pbx.transport == "tls" and pbx.tls is not None:
        return pbx.tls.port, ";transport=tls"
    return pbx.sip_port, "" if pbx.transport == "udp" else f";transport={pbx.transport}"


def account_config(post: Post, pbx: Pbx, password: str, transport_id: int, *, expiry: int, refresh_every: int,
                   retry_interval: int) -> Any:
    """The post's account: registration timing, digest credentials and, over TLS, mandatory SDES-SRTP."""
    cfg = pj.AccountConfig()
    port, suffix = pbx_port(pbx)
    name = re.sub(r'["\\<>\r\n]', "", post.name)
    cfg.idUri = f'"{name}" <sip:{post.id}@{pbx.host}:{port}>'
    reg = cfg.regConfig
    reg.registrarUri = f"sip:{pbx.host}:{port}{suffix}"
    reg.timeoutSec = expiry
    # Refresh well before expiry: a PBX that lost its contacts (restart on a fresh disk, failover) learns
    # the post again within refresh_every seconds, not within the expiry.
    reg.delayBeforeRefreshSec = max(5, expiry - refresh_every)
    reg.retryIntervalSec = retry_interval
    reg.firstRetryIntervalSec = min(2, retry_interval)  # a restarted PBX is usually back at once
    reg.randomRetryIntervalSec = 1
    reg.dropCallsOnFail = False  # never drop an alarm call because a registration refresh failed
    sip = cfg.sipConfig
    sip.authCreds.append(pj.AuthCredInfo("digest", "*", post.id, 0, password))
    sip.transportId = transport_id
    if pbx.transport == "tls":
        # The PBX renders media_encryption=sdes for TLS sites: keys in the TLS-protected SDP, never in clear.
        cfg.mediaConfig.srtpUse = pj.PJMEDIA_SRTP_MANDATORY
        cfg.mediaConfig.srtpSecureSignaling = 1  # SDES keys only over TLS
    return cfg


def call_op(code: int | None = None, reason: str = "") -> Any:
    prm = pj.CallOpParam(True)
    if code is not None:
        prm.statusCode = code
    if reason:
        prm.reason = reason
    return prm


def call_state(call: Any) -> tuple[int, int, str]:
    """(invite state, last status code, last reason) of a call."""
    ci = call.getInfo()
    return int(ci.state), int(ci.lastStatusCode), str(ci.lastReason)


def remote_uri(call: Any) -> str:
    info = call.getInfo()
    return str(info.remoteUri)


def _audio_indexes(call: Any) -> list[int]:
    """Indexes of the call's active audio streams."""
    info = call.getInfo()  # kept in a name: SWIG's ``info.media`` points into it, and must not outlive it
    return [int(mi.index) for mi in info.media
            if int(mi.type) == pj.PJMEDIA_TYPE_AUDIO and int(mi.status) == pj.PJSUA_CALL_MEDIA_ACTIVE]


def call_audio(call: Any) -> Any:
    """The call's (first active) audio stream on the conference bridge, or None."""
    indexes = _audio_indexes(call)
    return call.getAudioMedia(indexes[0]) if indexes else None


def codec_of(call: Any) -> str:
    """The codec the call's audio stream uses (``G722/16000``...), or ""."""
    indexes = _audio_indexes(call)
    if not indexes:
        return ""
    info = call.getStreamInfo(indexes[0])  # kept in a name while read (SWIG)
    return f"{info.codecName}/{info.codecClockRate}"


def rx_packets(call: Any) -> int | None:
    """RTP packets received on the call's audio stream (its RTCP statistics), or None without a stream."""
    try:
        indexes = _audio_indexes(call)
        if not indexes:
            return None
        stat = call.getStreamStat(indexes[0])  # kept alive while its nested structs are read (SWIG)
        return int(stat.rtcp.rxStat.pkt)
    except pj.Error:  # the stream went away between the two calls: nothing to judge
        return None


def local_failure(prm: Any) -> bool:
    """Whether an on-call-state event came from pjsip itself (timer, transport error), not from a response."""
    e = prm.e
    kind = int(e.type)
    if kind in _LOCAL_EVENTS:
        return True
    return kind == pj.PJSIP_EVENT_TSX_STATE and int(e.body.tsxState.type) in _LOCAL_EVENTS


def invite_response(prm: Any) -> bool:
    """Whether an on-call-tsx-state event is a response (100 Trying included) to our INVITE."""
    e = prm.e
    if int(e.type) != pj.PJSIP_EVENT_TSX_STATE:
        return False
    tsx = e.body.tsxState.tsx
    return str(tsx.method) == "INVITE" and int(tsx.statusCode) >= 100


# -- where requests come from, probes inside a call, media binding ----------------------------------------
def rx_source(prm: Any) -> tuple[str, str]:
    """(``ip:port`` the request came from, the whole request) of an on-incoming-call event."""
    rdata = prm.rdata  # kept in a name while its fields are read (SWIG)
    return str(rdata.srcAddress), str(rdata.wholeMsg)


def rx_message(prm: Any) -> str:
    """The whole received message of an on-reg-state event (the REGISTER's response), or "" (a timeout)."""
    try:
        rdata = prm.rdata
        return str(rdata.wholeMsg)
    except (AttributeError, pj.Error):
        return ""


def request_param(method: str) -> Any:
    prm = pj.CallSendRequestParam()
    prm.method = method
    return prm


def request_final(prm: Any, method: str) -> tuple[int, bool] | None:
    """(final status, whether it is a response that arrived) of our ``method`` request in a call's dialog, from
    an on-call-tsx-state event; None for any other event.

    pjsip makes up a final status itself (408 on its timer, 503 on a transport error): only a received
    response shows the far end is there. A transaction that already had its answer ends again later
    (COMPLETED -> TERMINATED after timer K, 5 s over UDP): that is no news, and must not be taken for the
    answer to a newer request."""
    e = prm.e
    if int(e.type) != pj.PJSIP_EVENT_TSX_STATE:
        return None
    state = e.body.tsxState
    tsx = state.tsx
    if str(tsx.method) != method or int(tsx.role) != pj.PJSIP_ROLE_UAC:
        return None
    if int(tsx.state) == pj.PJSIP_TSX_STATE_TERMINATED and int(state.prevState) == pj.PJSIP_TSX_STATE_COMPLETED:
        return None
    code = int(tsx.statusCode)
    received = int(state.type) == pj.PJSIP_EVENT_RX_MSG
    return (code, received) if code >= 200 else None


def bind_media(acc_cfg: Any, address: str) -> None:
    """RTP on ``address`` only, never 0.0.0.0."""
    if address:
        acc_cfg.mediaConfig.transportConfig.boundAddress = address
