"""The few places where the two Python bindings of pjsua2 disagree, behind one set of small functions.

Here (x86_64) the post runs ``pjsua2-pybind11``; on a Raspberry Pi it runs the official SWIG binding that a
pjproject build makes. The C++ API underneath is the same, but (``notes/platform.md``):

* pybind11 exposes getters as properties (``call.info``, ``ep.audDevManager``, ``adm.playbackDevMedia``)
  where SWIG has methods (``call.getInfo()``, ``ep.audDevManager()``, ``adm.getPlaybackDevMedia()``);
* pybind11 gives enums (``prm.code.value``, ``pj.InvState.CONFIRMED``) where SWIG gives plain ints and
  module constants (``pj.PJSIP_INV_STATE_CONFIRMED``);
* pybind11 has no ``libHandleEvents`` (and keeps the GIL inside pjsua): :class:`Poller` calls pjsua's C
  event loop through ctypes instead, so with both bindings the owner thread runs every callback itself;
* pybind11 lacks the account media/NAT configs (no SRTP setting), the TLS settings and stream statistics.

Everything pjsua2-specific that :mod:`sip_refuge.post.sip.pjsua2` needs goes through this module, so that
module reads the same for both bindings. Objects of the binding are typed ``Any``: neither binding ships
types that mypy could check against both.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import pjsua2 as _pjsua2

# Typed Any: the stubs describe only the pybind11 wheel, and this module speaks to both bindings.
pj: Any = _pjsua2

# SWIG's Endpoint always has libHandleEvents; the pybind11 wheel has none (it cannot poll).
SWIG = hasattr(pj.Endpoint, "libHandleEvents")
BINDING = "swig" if SWIG else "pybind11"


def _get(obj: Any, name: str) -> Any:
    """``obj.name`` (pybind11 property) or ``obj.getName()`` / ``obj.name()`` (SWIG method)."""
    getter = getattr(obj, "get" + name[0].upper() + name[1:], None)
    if SWIG and getter is not None:
        return getter()
    value = getattr(obj, name)
    return value() if SWIG and callable(value) else value


def number(value: Any) -> int:
    """A status code or enum as a plain int (pybind11 enum -> ``.value``; SWIG is already an int)."""
    if isinstance(value, int):
        return value
    return int(getattr(value, "value", value))


def _const(pybind_enum: str, member: str, swig_name: str) -> int:
    if SWIG:
        return int(getattr(pj, swig_name))
    return number(getattr(getattr(pj, pybind_enum), member))


# Enum values used by the backend, as ints so comparisons look the same for both bindings.
INV_EARLY = _const("InvState", "EARLY", "PJSIP_INV_STATE_EARLY")
INV_CONNECTING = _const("InvState", "CONNECTING", "PJSIP_INV_STATE_CONNECTING")
INV_CONFIRMED = _const("InvState", "CONFIRMED", "PJSIP_INV_STATE_CONFIRMED")
INV_DISCONNECTED = _const("InvState", "DISCONNECTED", "PJSIP_INV_STATE_DISCONNECTED")
ROLE_UAC = _const("Role", "UAC", "PJSIP_ROLE_UAC")
MEDIA_AUDIO = _const("MediaType", "AUDIO", "PJMEDIA_TYPE_AUDIO")
MEDIA_ACTIVE = _const("CallMediaStatus", "ACTIVE", "PJSUA_CALL_MEDIA_ACTIVE")
EVENT_TSX_STATE = _const("EventId", "TSX_STATE", "PJSIP_EVENT_TSX_STATE")
EVENT_TIMER = _const("EventId", "TIMER", "PJSIP_EVENT_TIMER")
EVENT_TRANSPORT_ERROR = _const("EventId", "TRANSPORT_ERROR", "PJSIP_EVENT_TRANSPORT_ERROR")
EVENT_RX_MSG = _const("EventId", "RX_MSG", "PJSIP_EVENT_RX_MSG")
# pjsip_tsx_state_e; plain ints because the pybind11 wheel's name for the enum is not known here.
TSX_COMPLETED = int(getattr(pj, "PJSIP_TSX_STATE_COMPLETED", 4))
TSX_TERMINATED = int(getattr(pj, "PJSIP_TSX_STATE_TERMINATED", 6))
TRANSPORTS = {
    "udp": (lambda: pj.PJSIP_TRANSPORT_UDP) if SWIG else (lambda: pj.TransportType.UDP),
    "tcp": (lambda: pj.PJSIP_TRANSPORT_TCP) if SWIG else (lambda: pj.TransportType.TCP),
    "tls": (lambda: pj.PJSIP_TRANSPORT_TLS) if SWIG else (lambda: pj.TransportType.TLS),
}


# -- library set-up and the event loop ----------------------------------------------------------------
def configure_threads(ep_cfg: Any) -> None:
    """No pjsip or media worker threads: the owner thread runs every SIP and RTP event itself (:class:`Poller`).

    pybind11's wrappers keep the GIL while inside pjsua. With a pjsip worker thread, the owner thread could
    hold the GIL waiting for a dialog lock that the worker holds while it waits for the GIL to run a Python
    callback: a 2 s stall (pjsua's acquire_call gives up) or a deadlock. With one thread there is no such pair.
    """
    ua = _get(ep_cfg, "uaConfig")
    ua.maxCalls = 16  # calls given up on (no response) linger in pjsua until Timer B; the default 4 is tight
    ua.threadCnt = 0
    ua.mainThreadOnly = False
    med = _get(ep_cfg, "medConfig")
    med.hasIoqueue = False  # RTP (and so received DTMF) shares the SIP ioqueue, polled by the owner thread
    med.threadCnt = 0


class Poller:
    """Runs pjsip's pending events for up to ``msec`` on the calling (owner) thread.

    SWIG has ``libHandleEvents``. The pybind11 wheel has none, so the C function ``pjsua_handle_events`` of
    the wheel's own libpjsua is called through ctypes, which also releases the GIL while pjsip waits for
    packets: other Python threads (the runner, the panel) keep running.
    """

    def __init__(self, ep: Any) -> None:
        self._ep = ep
        self._handle: Callable[[int], int] | None = None
        if not SWIG:
            lib = ctypes.CDLL(_loaded_library("libpjsua-"))
            handle = lib.pjsua_handle_events
            handle.argtypes = [ctypes.c_uint]
            handle.restype = ctypes.c_int
            self._handle = handle

    def __call__(self, msec: int) -> None:
        if self._handle is not None:
            self._handle(msec)
        else:
            self._ep.libHandleEvents(msec)


def _loaded_library(prefix: str) -> str:
    """Path of the already loaded shared library whose file name starts with ``prefix`` (not libpjsua2)."""
    with open("/proc/self/maps", encoding="utf-8") as maps:
        for line in maps:
            path = line.split()[-1] if line.count("/") else ""
            name = path.rsplit("/", 1)[-1]
            if name.startswith(prefix) and ".so" in name:
                return path
    raise OSError(f"no {prefix}*.so loaded by the pjsua2 module")


def transport_address(ep: Any, transport_id: int) -> tuple[str, int]:
    """(host, port) a transport listens on."""
    info = ep.transportGetInfo(transport_id)
    host, _, port = str(info.localName).rpartition(":")
    return host.strip("[]"), int(port)


def media_config(ep_cfg: Any) -> Any:
    return _get(ep_cfg, "medConfig")


def log_config(ep_cfg: Any) -> Any:
    return _get(ep_cfg, "logConfig")


def audio_manager(ep: Any) -> Any:
    return _get(ep, "audDevManager")


def playback_media(ep: Any) -> Any:
    return _get(audio_manager(ep), "playbackDevMedia")


def capture_media(ep: Any) -> Any:
    return _get(audio_manager(ep), "captureDevMedia")


def sound_device_count(ep: Any) -> int:
    """Audio devices pjmedia found (0 on a machine without a sound card)."""
    try:
        return int(_get(audio_manager(ep), "devCount"))
    except (AttributeError, TypeError):
        return 0


def transport_config(port: int, bound_address: str, tls: Any = None) -> Any:
    """A transport config; ``tls`` (the site's :class:`~sip_refuge.config.model.Tls`) only for TLS."""
    cfg = pj.TransportConfig()
    cfg.port = port
    if bound_address:
        cfg.boundAddress = bound_address
    if tls is not None and hasattr(cfg, "tlsConfig"):
        tc = cfg.tlsConfig
        if tls.ca_file is not None:
            tc.CaListFile = str(tls.ca_file)
            tc.verifyServer = True  # a post must not hand its alarm to whoever answers on port 5061
        # pybind11's wheel has no tlsConfig: its TLS transport uses pjsip's defaults (no server check).
    return cfg


def account_config() -> Any:
    return pj.AccountConfig()


def reg_config(acc_cfg: Any) -> Any:
    return _get(acc_cfg, "regConfig")


def sip_config(acc_cfg: Any) -> Any:
    return _get(acc_cfg, "sipConfig")


def digest_credentials(user: str, password: str) -> Any:
    return pj.AuthCredInfo("digest", "*", user, 0, password)


def require_srtp(acc_cfg: Any) -> bool:
    """Make SRTP (SDES over TLS) mandatory; False when the binding cannot (pybind11 has no mediaConfig)."""
    media = getattr(acc_cfg, "mediaConfig", None)
    if media is None:
        return False
    media.srtpUse = pj.PJMEDIA_SRTP_MANDATORY
    media.srtpSecureSignaling = 1  # SDES keys only over TLS
    return True


def account_info(account: Any) -> Any:
    return _get(account, "info")


# -- calls -------------------------------------------------------------------------------------------
def call_info(call: Any) -> Any:
    return _get(call, "info")


def call_op(code: int | None = None, reason: str = "") -> Any:
    prm = pj.CallOpParam(True)
    if code is not None:
        prm.statusCode = code if SWIG else pj.StatusCode(code)
    if reason:
        prm.reason = reason
    return prm


def audio_media_slots(call: Any) -> list[Any]:
    """The call's active audio streams as conference-bridge media."""
    ci = call_info(call)
    media = ci.media
    out = []
    for i in range(len(media)):
        mi = media[i]
        if number(mi.type) == MEDIA_AUDIO and number(mi.status) == MEDIA_ACTIVE:
            out.append(call.getAudioMedia(mi.index))
    return out


def rx_packets(call: Any) -> int | None:
    """RTP packets received on the call's first stream, or None when the binding cannot tell (pybind11)."""
    stat = getattr(call, "getStreamStat", None)
    if stat is None:
        return None
    try:
        return int(stat(0).rtcp.rxStat.pkt)
    except Exception:  # noqa: BLE001 - no stream (yet) raises pj.Error in SWIG; "unknown" is the answer
        return None


def local_failure(prm: Any) -> bool:
    """Whether an on-call-state event came from pjsip itself (timer, transport error), not from a response."""
    try:
        e = _get(prm, "e")
        kind = number(e.type)
        if kind in (EVENT_TIMER, EVENT_TRANSPORT_ERROR):
            return True
        if kind == EVENT_TSX_STATE:
            body = _get(e.body, "tsxState")
            return number(body.type) in (EVENT_TIMER, EVENT_TRANSPORT_ERROR)
    except Exception:  # noqa: BLE001 - a binding without these fields: treat the status as a real response
        return False
    return False


def invite_response(prm: Any) -> bool:
    """Whether an on-call-tsx-state event is a response (100 Trying included) to our INVITE."""
    try:
        e = _get(prm, "e")
        if number(e.type) != EVENT_TSX_STATE:
            return False
        tsx = _get(_get(e.body, "tsxState"), "tsx")
        return str(tsx.method) == "INVITE" and int(tsx.statusCode) >= 100
    except Exception:  # noqa: BLE001 - a binding without these fields: rely on the call states instead
        return False


# -- issue 8: where requests come from, probes, media binding --------------------------------------------
def rx_source(prm: Any) -> tuple[str, str]:
    """(``ip:port`` the request came from, the whole request) of an on-incoming-call event."""
    rdata = _get(prm, "rdata")
    return str(_get(rdata, "srcAddress")), str(_get(rdata, "wholeMsg"))


def rx_message(prm: Any) -> str:
    """The whole received message of an on-reg-state event (the REGISTER's response), or ""."""
    try:
        return str(_get(_get(prm, "rdata"), "wholeMsg"))
    except Exception:  # noqa: BLE001 - a timeout has no response: nothing to learn
        return ""


# The pybind11 wheel cannot send a request inside a call's dialog (no CallSendRequestParam).
CAN_PROBE = hasattr(pj, "CallSendRequestParam")


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
    try:
        e = _get(prm, "e")
        if number(e.type) != EVENT_TSX_STATE:
            return None
        state = _get(e.body, "tsxState")
        tsx = _get(state, "tsx")
        if str(tsx.method) != method or number(tsx.role) != ROLE_UAC:
            return None
        if number(tsx.state) == TSX_TERMINATED and number(state.prevState) == TSX_COMPLETED:
            return None
        code = int(tsx.statusCode)
        received = number(state.type) == EVENT_RX_MSG
    except Exception:  # noqa: BLE001 - a binding without these fields cannot tell
        return None
    return (code, received) if code >= 200 else None


def bind_media(acc_cfg: Any, address: str) -> None:
    """RTP on ``address`` only (pybind11's wheel has no account media config: it binds RTP everywhere)."""
    media = getattr(acc_cfg, "mediaConfig", None)
    if media is not None and address:
        media.transportConfig.boundAddress = address
