"""A small SIP user agent on pyVoIP's parser and RTP, for the pyVoIP post backend and the desk robot.

Why not pyVoIP's ``VoIPPhone``/``SIPClient`` as they are (1.6.8, each seen on the wire against Asterisk 22):

* **The ~1 s late ANSWERED.** ``VoIPPhone._callback_MSG_Invite`` hands every incoming call to the application
  through ``threading.Timer(1, callCallback)``: a pyVoIP phone learns of a ringing call exactly 1.000 s after
  the INVITE. A pyVoIP desk robot that "answers at once" therefore answers 1 s late, and a post that dials
  the queue sees its 200 OK (ANSWERED) 1 s after the desk rang; the same timer delays call-backs to a pyVoIP
  post. ``SIPClient.start`` likewise starts its receive loop with ``Timer(1, recv_loop)``, so nothing sent in
  the first second after start-up is read. The post's own path from Asterisk's 200 OK to ``ANSWERED`` is not
  slow (3-14 ms: the receive loop polls a non-blocking socket every 10 ms with ``sleep(0.01)``).
* Its ACK for a 2xx carries a fresh random To-tag, so Asterisk never matches it, retransmits the 200 OK and
  hangs the call up after 32 s (timer H). Its INVITE retry after a 401 uses a new From-tag.
* OPTIONS cannot even be parsed, so Asterisk's qualify marks the post Unavailable; 180/183 are dropped
  (183 prints a "TODO" line on stdout); CANCEL of an unknown call raises; no DTMF can be sent.
* ``register()`` re-registers every ``default_expires - 5`` s whatever the registrar granted, sleeps 5 s
  and recurses on a 500, and stops for good after three failures; its lock makes a call wait behind a
  30 s registration ``select``.

So this module keeps pyVoIP's parsing and RTP (:mod:`.pyvoip_msg`, :mod:`.pyvoip_rtp`) and does the SIP
transactions itself: one thread per agent, blocked in ``select`` on the SIP socket, a wake-up socketpair
and a timer heap - no sleeps, no polling. Incoming requests are handled the moment they arrive.
Every callback of :class:`UaListener` runs on that thread and must only hand the news on.

Nothing from the network can stop that thread (issue 8): datagrams from anyone but the PBX are dropped
unread, every datagram is parsed and handled inside its own ``try``, and what was dropped, unreadable or
failed is counted (:class:`~.guard.Counters`). A new call must also pass the :class:`~.guard.Gate` (aimed at
this phone's registered contact, media at the PBX). :meth:`Ua.health` tells whether the thread (and every
call's RTP threads) still turns.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import re
import secrets
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from sip_refuge.post.sip.guard import Counters, Gate, normal_ip, resolve
from sip_refuge.post.sip.pyvoip_msg import (
    USER_AGENT,
    Message,
    digest,
    display_or_user,
    new_branch,
    new_tag,
    remote_media,
    sdp_body,
    tag_of,
    uri_of,
)
from sip_refuge.post.sip.pyvoip_rtp import OFFER, RtpSession

T1 = 0.5  # RFC 3261 retransmission base over UDP
REGISTER_TIMEOUT = 4.0  # no answer to a REGISTER within this: the PBX is unreachable
INVITE_TIMEOUT = 32.0  # timer B: no answer at all to an INVITE (the post's machine gives up long before)
REQUEST_TIMEOUT = 4.0  # BYE, CANCEL, un-REGISTER
ANSWER_TIMEOUT = 32.0  # retransmit our 200 OK to an INVITE until ACK, at most this long (timer H)
TURN = 1.0  # the thread's loop turns at least this often, so a stuck thread can be told from an idle one
STALL = 10.0  # no turn for this long: the thread is stuck (health says so)


class UaListener(Protocol):
    """What the agent reports; every method runs on the agent's thread."""

    def on_registered(self, expires: int) -> None: ...
    def on_registration_failed(self, reason: str, status: int | None) -> None: ...
    def on_unregistered(self, reason: str) -> None: ...
    def on_progress(self, call: Call, status: int) -> None: ...
    def on_answered(self, call: Call) -> None: ...
    def on_failed(self, call: Call, status: int | None, reason: str) -> None: ...
    def on_ended(self, call: Call, reason: str) -> None: ...
    def on_incoming(self, call: Call) -> None: ...
    def on_media_stalled(self, call: Call) -> None: ...
    def on_media_resumed(self, call: Call) -> None: ...


class Prefixed(logging.LoggerAdapter[logging.Logger]):
    """Puts who is speaking (the post id, the desk id) at the start of every log line."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"{(self.extra or {}).get('who', '?')}: {msg}", kwargs


@dataclass
class Call:
    """One dialog (outgoing or incoming) and its media."""

    key: str
    outgoing: bool
    call_id: str
    local_tag: str
    dest: tuple[str, int]
    rtp: RtpSession
    local_uri: str = ""
    remote_uri: str = ""
    remote_tag: str = ""
    remote_target: str = ""
    caller: str = ""
    state: str = "calling"  # calling | early | cancelling | ringing | answering | confirmed | ended
    cseq: int = 1
    invite_cseq: int = 1
    invite_branch: str = ""
    invite_text: str = ""
    invite: Message | None = None  # the INVITE we received (incoming calls)
    final_response: str = ""  # our final response to that INVITE, retransmitted until ACK
    cancel_pending: bool = False
    progress_seen: set[int] = field(default_factory=set)
    session: int = field(default_factory=lambda: secrets.randbelow(2**31))
    sdp_version: int = 1
    invite_sent_at: float = 0.0
    answered_at: float = 0.0
    media_stalled: bool = False
    headers: dict[str, str] = field(default_factory=dict)  # of the INVITE received: call-info, alert-info...


@dataclass
class _Transaction:
    method: str
    text: str
    dest: tuple[str, int]
    on_final: Callable[[Message | None], None]  # None = timed out
    on_provisional: Callable[[Message], None] | None = None
    deadline: float = 0.0
    interval: float = T1
    retransmit: bool = True


class Ua:
    """A registered SIP phone on UDP. ``start`` spawns its thread; ``stop`` un-registers and joins it."""

    def __init__(self, *, user: str, password: str, server: tuple[str, int], listener: UaListener,
                 display: str = "", local_port: int = 0, name: str = "", expires: int = 120,
                 refresh_interval: float = 15.0, media_gap: float = 1.0, keep_audio: bool = False,
                 on_dtmf: Callable[[Call, str], None] | None = None, logger: logging.LoggerAdapter[Any] | None = None,
                 host: str | None = None, trusted: frozenset[str] | None = None,
                 counters: Counters | None = None) -> None:
        """``host``: the local address to bind (default: the one routing to ``server``). ``trusted``: the only
        addresses SIP and RTP are accepted from (default: ``server``'s addresses)."""
        self.user, self._password, self.server, self.display = user, password, server, display
        self.listener = listener
        self.expires = expires  # asked of the registrar; it may grant less (or more)
        self.refresh_interval = refresh_interval  # never longer between REGISTERs: a restarted PBX sees us soon
        self.media_gap = media_gap  # no RTP for this long: on_media_stalled (a fact; the owner decides)
        self.keep_audio = keep_audio
        self.on_dtmf = on_dtmf
        self.name = name or user
        self.log: logging.LoggerAdapter[Any] = logger or Prefixed(logging.getLogger(__name__), {"who": self.name})
        self.host = host or _local_ip_for(server)
        self.trusted = trusted if trusted is not None else _addresses_of(server[0])
        self.counters = counters or Counters(self.log)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((self.host, local_port))
        self.port: int = self.sock.getsockname()[1]
        self.gate = Gate(user, self.trusted, self.counters)
        self.gate.add_contact(self.host, self.port)
        self.beat = time.monotonic()  # the thread's last turn
        self.failure = ""  # why the thread died, if it did
        self.contact = f"<sip:{user}@{self.host}:{self.port};transport=udp>"
        self.aor = f"sip:{user}@{server[0]}"
        self.registered = False
        self.granted = 0
        self.calls: dict[str, Call] = {}  # by SIP Call-ID
        self._keys = itertools.count(1)
        self._wake_r, self._wake_w = socket.socketpair()
        self._commands: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        self._transactions: dict[tuple[str, str], _Transaction] = {}  # by Via branch and CSeq method
        self._register_call_id = secrets.token_hex(10)
        self._register_cseq = 0
        self._register_tag = new_tag()
        self._register_timer = 0
        self._failures = 0
        self._stopping = False
        self._done = False
        self._thread = threading.Thread(target=self._run, name=f"pyvoip-{self.name}", daemon=True)

    # -- life cycle, from any thread --------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        self.post(self._register)

    def stop(self, timeout: float = 5.0) -> None:
        """Hang up every call, un-register (waiting up to about a second), join the thread, close sockets."""
        if self._thread.is_alive():
            self.post(self._begin_stop)
            self._thread.join(timeout)
        for call in list(self.calls.values()):
            call.rtp.stop()
        self.calls.clear()
        for sock in (self.sock, self._wake_r, self._wake_w):
            sock.close()

    def post(self, command: Callable[[], None]) -> None:
        """Run ``command`` on the agent's thread as soon as it is free."""
        with self._lock:
            self._commands.append(command)
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # stopped: the command is dropped with the agent

    def call_later(self, delay: float, command: Callable[[], None]) -> None:
        """Run ``command`` on the agent's thread after ``delay`` seconds (call it from that thread)."""
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_seq), command))

    def health(self) -> str:
        """Empty while the SIP thread and the RTP threads of every call turn; else what is wrong."""
        if self.failure:
            return f"SIP thread {self._thread.name} died: {self.failure}"
        if not self._thread.is_alive():
            return f"SIP thread {self._thread.name} is not running"
        stalled = time.monotonic() - self.beat
        if stalled > STALL:
            return f"SIP thread {self._thread.name} has not turned for {stalled:.0f} s"
        for call in list(self.calls.values()):
            problem = call.rtp.health()
            if problem:
                return f"media of call {call.key}: {problem}"
        return ""

    # -- the thread -------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - the thread's boundary: say why it ends, health reports it
            self.failure = f"{type(exc).__name__}: {exc}"
            self.log.critical("SIP thread died: %s", self.failure, exc_info=not isinstance(exc, SystemExit))

    def _loop(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self.sock, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._done:
                self.beat = time.monotonic()
                timeout = min(TURN, max(0.0, self._timers[0][0] - time.monotonic())) if self._timers else TURN
                for key, _ in sel.select(timeout):
                    if key.fileobj is self._wake_r:
                        self._wake_r.recv(4096)
                    else:
                        self._read()
                self._guard(self._run_commands)
                while self._timers and self._timers[0][0] <= time.monotonic():
                    self._guard(heapq.heappop(self._timers)[2])

    def _guard(self, work: Callable[[], None]) -> None:
        # The thread boundary: a bug in handling one message must not kill the post's SIP stack.
        try:
            work()
        except Exception:
            self.log.exception("SIP agent error (continuing)")

    def _run_commands(self) -> None:
        with self._lock:
            commands, self._commands = self._commands, []
        for command in commands:
            self._guard(command)

    def _read(self) -> None:
        try:
            data, source = self.sock.recvfrom(65535)
        except OSError:
            return  # ICMP port unreachable from an earlier send (the PBX is down): timers handle it
        if not data.strip():
            return  # CRLF keep-alive
        if normal_ip(source[0]) not in self.trusted:
            # Unread and unanswered: a stranger learns nothing, and gets nothing to amplify.
            self.counters.count("refused", "%d bytes of SIP from %s:%s dropped: not the PBX", len(data), *source)
            return
        try:
            msg = Message.parse(data)
        except ValueError as exc:
            self.counters.count("malformed", "unreadable SIP from %s:%s dropped: %s", source[0], source[1], exc)
            return
        self.log.debug("<- %s", msg.start)
        try:
            if msg.is_response:
                self._on_response(msg)
            else:
                self._on_request(msg, source)
        except Exception:  # noqa: BLE001 - per message: one odd message must not cost the phone its SIP
            self.counters.count("errors", "SIP %r from %s:%s could not be handled", msg.start[:60], *source,
                                exc_info=True)

    def _send(self, text: str, dest: tuple[str, int]) -> None:
        self.log.debug("-> %s", text.split("\r\n", 1)[0])
        try:
            self.sock.sendto(text.encode(), dest)
        except OSError as exc:
            self.log.debug("send to %s:%s failed: %s", dest[0], dest[1], exc)

    # -- client transactions ----------------------------------------------------------------------------
    def _request(self, method: str, uri: str, *, call: Call | None, dest: tuple[str, int],
                 on_final: Callable[[Message | None], None], timeout: float,
                 on_provisional: Callable[[Message], None] | None = None, extra: tuple[str, ...] = (),
                 body: str = "", branch: str | None = None, cseq: int | None = None, to: str | None = None,
                 from_: str | None = None, call_id: str | None = None) -> str:
        branch = branch or new_branch()
        if call is not None:
            if cseq is None:
                call.cseq += 1
                cseq = call.cseq
            from_ = from_ or f"<{call.local_uri}>;tag={call.local_tag}"
            to = to or (f"<{call.remote_uri}>" + (f";tag={call.remote_tag}" if call.remote_tag else ""))
            call_id = call.call_id
        lines = [f"{method} {uri} SIP/2.0", f"Via: SIP/2.0/UDP {self.host}:{self.port};branch={branch};rport",
                 "Max-Forwards: 70", f"From: {from_}", f"To: {to}", f"Call-ID: {call_id}",
                 f"CSeq: {cseq} {method}", f"User-Agent: {USER_AGENT}", *extra]
        text = self._finish(lines, body)
        if method != "ACK":
            tx = _Transaction(method, text, dest, on_final, on_provisional, time.monotonic() + timeout)
            self._transactions[(branch, method)] = tx
            self.call_later(T1, lambda: self._retransmit((branch, method)))
        self._send(text, dest)
        return text

    def _finish(self, lines: list[str], body: str) -> str:
        if body:
            lines.append("Content-Type: application/sdp")
        lines.append(f"Content-Length: {len(body.encode())}")
        return "\r\n".join(lines) + "\r\n\r\n" + body

    def _retransmit(self, key: tuple[str, str]) -> None:
        tx = self._transactions.get(key)
        if tx is None:
            return
        if time.monotonic() >= tx.deadline:
            del self._transactions[key]
            tx.on_final(None)
            return
        if not tx.retransmit and tx.deadline == float("inf"):
            return  # a proceeding INVITE: only its final response ends it
        if tx.retransmit:
            self._send(tx.text, tx.dest)
        tx.interval = min(tx.interval * 2, 4.0)
        self.call_later(min(tx.interval, max(0.0, tx.deadline - time.monotonic())), lambda: self._retransmit(key))

    def _on_response(self, msg: Message) -> None:
        key = (msg.branch, msg.method)
        tx = self._transactions.get(key)
        if tx is None:
            call = self.calls.get(msg.call_id)
            if call is not None and msg.method == "INVITE" and 200 <= msg.code < 300:
                self._ack_2xx(call, msg)  # a retransmitted 200 OK: our ACK was lost
            return
        if msg.code < 200:
            tx.retransmit = tx.method != "INVITE"  # RFC 3261 17.1.1.2: a provisional stops INVITE retransmits
            if tx.method == "INVITE":
                tx.deadline = float("inf")  # the PBX has it; the queue's own timeouts govern from here
            if tx.on_provisional is not None:
                tx.on_provisional(msg)
            return
        del self._transactions[key]
        tx.on_final(msg)

    # -- registration -----------------------------------------------------------------------------------
    def _register(self, challenge: Message | None = None, expires: int | None = None) -> None:
        self._register_cseq += 1
        expires = self.expires if expires is None else expires
        uri = f"sip:{self.server[0]}:{self.server[1]}"
        extra = [f"Contact: {self.contact}", f"Expires: {expires}", "Allow: INVITE, ACK, BYE, CANCEL, OPTIONS, UPDATE, INFO"]
        if challenge is not None:
            header = "authorization" if challenge.code == 401 else "proxy-authorization"
            value = challenge.header("www-authenticate" if challenge.code == 401 else "proxy-authenticate")
            extra.append(f"{header.title()}: "
                         + digest(value, method="REGISTER", uri=uri, user=self.user, password=self._password))
        self._request("REGISTER", uri, call=None, dest=self.server, timeout=REGISTER_TIMEOUT,
                      on_final=lambda r: self._on_register(r, challenge is not None, expires),
                      extra=tuple(extra), cseq=self._register_cseq, call_id=self._register_call_id,
                      from_=f"<{self.aor}>;tag={self._register_tag}", to=f"<{self.aor}>")

    def _on_register(self, resp: Message | None, authed: bool, expires: int) -> None:
        if resp is not None and resp.code in (401, 407) and not authed:
            self._register(resp, expires)
            return
        if expires == 0:  # our un-REGISTER on stop: done whatever the answer
            self._done = self._done or self._stopping
            return
        if resp is not None and 200 <= resp.code < 300:
            self.gate.learn_registration(resp.header("via"))
            self.granted = _granted_expiry(resp, self.host, self.port, expires)
            self.registered, self._failures = True, 0
            # Refresh well before the registrar's expiry, and at least every refresh_interval so that a PBX
            # that restarted (and lost its contacts) has us back within that time.
            self._schedule_register(max(1.0, min(self.granted * 0.5, self.refresh_interval)))
            self.listener.on_registered(self.granted)
            return
        status = None if resp is None else resp.code
        reason = "no answer from the PBX" if resp is None else f"{resp.code} {resp.reason}"
        self.listener.on_registration_failed(reason, status)
        if self.registered:
            self.registered = False
            self.listener.on_unregistered(reason)
        self._failures += 1
        self._schedule_register(min(2.0 ** (self._failures - 1), 8.0))  # 1, 2, 4, 8, 8 ... s

    def _schedule_register(self, delay: float) -> None:
        self._register_timer += 1
        token = self._register_timer
        self.call_later(delay, lambda: None if token != self._register_timer or self._stopping else self._register())

    def _begin_stop(self) -> None:
        self._stopping = True
        for call in list(self.calls.values()):
            self.hangup_now(call)
        if self.registered:
            self._register(expires=0)
            self.call_later(1.0, self._finish_stop)  # a PBX that does not answer must not hold us up
        else:
            self._done = True

    def _finish_stop(self) -> None:
        self._done = True

    # -- outgoing calls ---------------------------------------------------------------------------------
    def dial(self, extension: str, host: str | None = None, key: str | None = None) -> Call:
        """Place a call (from any thread); events follow on the listener."""
        dest = (host or self.server[0], self.server[1])
        call = Call(key or f"c{next(self._keys)}", True, secrets.token_hex(12), new_tag(), dest,
                    self._rtp_session())
        call.rtp.dtmf = lambda digit: self.on_dtmf(call, digit) if self.on_dtmf else None
        call.local_uri, call.remote_uri = self.aor, f"sip:{extension}@{dest[0]}"
        call.remote_target = call.remote_uri
        self.post(lambda: self._invite(call))
        return call

    def _rtp_session(self) -> RtpSession:
        return RtpSession(self.host, name=self.name, keep_audio=self.keep_audio, trusted=self.trusted,
                          counters=self.counters)

    def _invite(self, call: Call, challenge: Message | None = None) -> None:
        self.calls[call.call_id] = call
        call.invite_branch = new_branch()
        call.cseq += 0 if challenge is None else 1
        call.invite_cseq = call.cseq
        body = sdp_body(self.host, call.rtp.port, call.session, call.sdp_version, OFFER)
        name = self.display.replace('"', "")
        extra = [f"Contact: {self.contact}", "Allow: INVITE, ACK, BYE, CANCEL, OPTIONS, UPDATE, INFO"]
        if challenge is not None:
            header = "Authorization" if challenge.code == 401 else "Proxy-Authorization"
            value = challenge.header("www-authenticate" if challenge.code == 401 else "proxy-authenticate")
            extra.append(f"{header}: " + digest(value, method="INVITE", uri=call.remote_uri, user=self.user,
                                                password=self._password))
        call.invite_sent_at = time.monotonic()
        call.invite_text = self._request(
            "INVITE", call.remote_uri, call=call, dest=call.dest, timeout=INVITE_TIMEOUT, body=body,
            on_final=lambda r: self._on_invite_final(call, r, challenge is not None),
            on_provisional=lambda r: self._on_invite_provisional(call, r), extra=tuple(extra),
            branch=call.invite_branch, cseq=call.invite_cseq, to=f"<{call.remote_uri}>",
            from_=(f'"{name}" ' if name else "") + f"<{call.local_uri}>;tag={call.local_tag}")

    def _on_invite_provisional(self, call: Call, resp: Message) -> None:
        if call.state in ("ended", "cancelling"):
            return
        if call.cancel_pending:
            self._cancel(call)
            return
        tag = tag_of(resp.header("to"))
        if tag and not call.remote_tag and resp.code > 100:  # an early dialog: it can be probed
            call.remote_tag = tag
            call.remote_target = uri_of(resp.header("contact")) or call.remote_target
        if resp.code in (180, 183):
            call.state = "early"
            self._use_remote_sdp(call, resp)  # 183 brings early media: the ring tone of Queue(r)
        if resp.code not in call.progress_seen:  # 100 Trying too: it tells the owner the PBX is there
            call.progress_seen.add(resp.code)
            self.listener.on_progress(call, resp.code)

    def _on_invite_final(self, call: Call, resp: Message | None, authed: bool) -> None:
        if resp is None:
            self._end(call)
            self.listener.on_failed(call, None, "no answer from the PBX")
            return
        if 200 <= resp.code < 300:
            if call.state not in ("confirmed", "ended"):
                call.remote_tag = tag_of(resp.header("to"))
                call.remote_target = uri_of(resp.header("contact")) or call.remote_target
            self._ack_2xx(call, resp)
            if call.state in ("confirmed", "ended"):
                return  # a retransmitted 200 OK: ACKed again, nothing new
            if call.cancel_pending:  # hung up while ringing and the answer crossed our CANCEL: BYE it
                call.state = "confirmed"
                self.hangup_now(call)
                return
            call.state = "confirmed"
            call.answered_at = time.monotonic()
            self._use_remote_sdp(call, resp)
            call.rtp.start()
            self._watch_media(call)
            self.listener.on_answered(call)
            return
        # RFC 3261 17.1.1.3: a non-2xx final response is ACKed in the INVITE's own transaction.
        to = resp.header("to")
        self._request("ACK", call.remote_uri, call=call, dest=call.dest, on_final=lambda r: None, timeout=0,
                      branch=call.invite_branch, cseq=call.invite_cseq, to=to)
        if resp.code in (401, 407) and not authed and call.state != "ended":
            self._invite(call, resp)
            return
        was_cancelled = call.cancel_pending
        self._end(call)
        if not was_cancelled:
            self.listener.on_failed(call, resp.code, resp.reason)

    def _ack_2xx(self, call: Call, resp: Message) -> None:
        # The 2xx ACK is a new transaction to the remote target, with the dialog's tags (pyVoIP got this wrong).
        self._request("ACK", call.remote_target or call.remote_uri, call=call, dest=call.dest,
                      on_final=lambda r: None, timeout=0, cseq=resp.cseq[0])

    def _use_remote_sdp(self, call: Call, msg: Message) -> None:
        sdp = msg.sdp()
        media = remote_media(sdp) if sdp else None
        if media is not None:
            call.rtp.set_remote(*media)
            if not call.rtp.started and call.state == "early":
                call.rtp.start()

    def _watch_media(self, call: Call) -> None:
        """While the call is up: report when its RTP stops (for ``media_gap``) and when it comes back."""
        if call.state != "confirmed":
            return
        silent = time.monotonic() - max(call.rtp.last_rx, call.answered_at) >= self.media_gap
        if silent != call.media_stalled:
            call.media_stalled = silent
            (self.listener.on_media_stalled if silent else self.listener.on_media_resumed)(call)
        self.call_later(min(0.25, self.media_gap / 4), lambda: self._watch_media(call))

    # -- commands on calls (post them; hangup_now etc. run on the agent's thread) -----------------------
    def probe_now(self, call: Call, on_result: Callable[[int | None], None]) -> None:
        """OPTIONS inside the call's dialog (early or confirmed): does the PBX still have it? ``on_result`` gets
        the response's status, or None when nothing answered within the request timeout."""
        if call.state == "ended":
            on_result(None)
            return
        def done(resp: Message | None) -> None:
            on_result(None if resp is None else resp.code)
        if call.remote_tag:
            self._request("OPTIONS", call.remote_target or call.remote_uri, call=call, dest=call.dest,
                          timeout=REQUEST_TIMEOUT, on_final=done, extra=("Accept: application/sdp",))
            return
        # No dialog yet (no tagged provisional): at least ask whether the PBX itself is still there.
        uri = f"sip:{call.dest[0]}:{call.dest[1]}"
        self._request("OPTIONS", uri, call=None, dest=call.dest, timeout=REQUEST_TIMEOUT, on_final=done,
                      from_=f"<{self.aor}>;tag={new_tag()}", to=f"<{uri}>", call_id=secrets.token_hex(10), cseq=1,
                      extra=("Accept: application/sdp",))

    def hangup_now(self, call: Call) -> None:
        if call.state in ("ended", "cancelling"):
            return
        if call.outgoing and call.state in ("calling", "early"):
            call.cancel_pending = True
            if call.state == "early" or call.progress_seen:
                self._cancel(call)
            return  # CANCEL waits for a provisional (RFC 3261 9.1); a late 2xx is ACKed and BYEd
        if not call.outgoing and call.state == "ringing":
            self.reject_now(call, 603, "Decline")
            return
        if call.state in ("confirmed", "answering"):
            self._request("BYE", call.remote_target, call=call, dest=call.dest, on_final=lambda r: None,
                          timeout=REQUEST_TIMEOUT)
        self._end(call)

    def _cancel(self, call: Call) -> None:
        if call.state in ("ended", "cancelling", "confirmed"):
            return
        lines = call.invite_text.split("\r\n")
        keep = [ln for ln in lines if ln.split(":")[0].lower() in ("via", "from", "to", "call-id", "max-forwards")]
        text = self._finish([f"CANCEL {call.remote_uri} SIP/2.0", *keep, f"CSeq: {call.invite_cseq} CANCEL",
                             f"User-Agent: {USER_AGENT}"], "")
        key = (call.invite_branch, "CANCEL")  # a CANCEL shares its INVITE's branch (RFC 3261 9.1)
        self._transactions[key] = _Transaction("CANCEL", text, call.dest, lambda r: None,
                                               deadline=time.monotonic() + REQUEST_TIMEOUT)
        self.call_later(T1, lambda: self._retransmit(key))
        self._send(text, call.dest)
        call.state = "cancelling"  # the 487 that follows is ACKed and reported as nothing: we hung up

    def answer_now(self, call: Call) -> None:
        if call.state != "ringing" or call.invite is None:
            return
        media = remote_media(call.invite.sdp() or {})
        if media is None:
            self.reject_now(call, 488, "Not Acceptable Here")
            return
        call.rtp.set_remote(*media)
        chosen = {pt: kind for pt, kind in media[2].items()}
        body = sdp_body(self.host, call.rtp.port, call.session, call.sdp_version, chosen)
        call.final_response = self._response(call.invite, 200, "OK", to_tag=call.local_tag, body=body,
                                             contact=True)
        call.state = "answering"
        call.answered_at = time.monotonic()
        call.rtp.start()
        self._send(call.final_response, call.dest)
        self._retransmit_answer(call, T1, time.monotonic() + ANSWER_TIMEOUT)

    def reject_now(self, call: Call, status: int, reason: str = "") -> None:
        if call.state != "ringing" or call.invite is None:
            return
        call.final_response = self._response(call.invite, status, reason or _REASONS.get(status, "Rejected"),
                                             to_tag=call.local_tag)
        self._send(call.final_response, call.dest)
        self._end(call, forget=False)
        self.call_later(ANSWER_TIMEOUT, lambda: self._forget(call))

    def _retransmit_answer(self, call: Call, interval: float, deadline: float) -> None:
        if call.state != "answering":
            return
        if time.monotonic() >= deadline:
            self.log.warning("no ACK for our 200 OK to %s: hanging up", call.caller)
            self.hangup_now(call)
            self.listener.on_ended(call, "no ACK")
            return
        self.call_later(interval, lambda: self._retransmit_answer_step(call, interval, deadline))

    def _retransmit_answer_step(self, call: Call, interval: float, deadline: float) -> None:
        if call.state == "answering":
            self._send(call.final_response, call.dest)
            self._retransmit_answer(call, min(interval * 2, 4.0), deadline)

    def _end(self, call: Call, *, forget: bool = True) -> None:
        call.state = "ended"
        call.rtp.stop()
        if forget:
            # Keep the dialog a little: a retransmitted BYE or 200 OK still finds it (and is answered).
            self.call_later(ANSWER_TIMEOUT, lambda: self._forget(call))

    def _forget(self, call: Call) -> None:
        if self.calls.get(call.call_id) is call:
            del self.calls[call.call_id]

    # -- requests from the PBX --------------------------------------------------------------------------
    def _on_request(self, msg: Message, source: tuple[str, int]) -> None:
        method = msg.method
        call = self.calls.get(msg.call_id)
        if method == "ACK":
            if call is not None and call.state == "answering":
                call.state = "confirmed"
                self._watch_media(call)
                self.listener.on_answered(call)
            return
        if method == "OPTIONS":
            self._send(self._response(msg, 200, "OK", to_tag=new_tag(), contact=True,
                                      extra=("Allow: INVITE, ACK, BYE, CANCEL, OPTIONS, UPDATE, INFO",
                                             "Accept: application/sdp")), source)
        elif method == "INVITE" and call is None:
            self._on_new_invite(msg, source)
        elif method in ("INVITE", "UPDATE") and call is not None:
            self._on_refresh(call, msg, source)
        elif method == "BYE":
            self._on_bye(call, msg, source)
        elif method == "CANCEL":
            self._on_cancel(call, msg, source)
        elif method in ("INFO", "NOTIFY") and call is not None:
            self._send(self._response(msg, 200, "OK"), source)
        else:
            self._send(self._response(msg, 481 if call is None and method in ("INFO", "NOTIFY") else 405,
                                      "Call Does Not Exist" if call is None else "Method Not Allowed",
                                      to_tag=new_tag(), extra=("Allow: INVITE, ACK, BYE, CANCEL, OPTIONS, UPDATE, INFO",)),
                       source)

    def _on_new_invite(self, msg: Message, source: tuple[str, int]) -> None:
        reason = self.gate.callback_refusal(msg.start.split()[1], msg.body.decode("utf-8", "replace"))
        if reason is not None:
            self.counters.count("refused", "INVITE from %s:%s refused: %s", source[0], source[1], reason)
            self._send(self._response(msg, 403, "Forbidden", to_tag=new_tag()), source)
            return
        call = Call(f"in{next(self._keys)}", False, msg.call_id, new_tag(), source,
                    self._rtp_session())
        call.rtp.dtmf = lambda digit: self.on_dtmf(call, digit) if self.on_dtmf else None
        call.invite = msg
        call.remote_tag = tag_of(msg.header("from"))
        call.remote_uri, call.local_uri = uri_of(msg.header("from")), uri_of(msg.header("to"))
        call.remote_target = uri_of(msg.header("contact")) or call.remote_uri
        call.caller = display_or_user(msg.header("from"))
        call.cseq = 0
        call.state = "ringing"
        call.headers = {n: v for n, v in msg.headers if n in ("call-info", "alert-info")}
        self.calls[msg.call_id] = call
        self._send(self._response(msg, 180, "Ringing", to_tag=call.local_tag, contact=True), source)
        self.listener.on_incoming(call)  # at once: pyVoIP waited a second here (Timer(1, callCallback))

    def _on_refresh(self, call: Call, msg: Message, source: tuple[str, int]) -> None:
        if msg.method == "INVITE" and call.state == "ringing":
            return  # a retransmission of the INVITE we are ringing for
        sdp = msg.sdp()
        media = remote_media(sdp) if sdp else None
        body = ""
        if media is not None:
            call.rtp.set_remote(*media)
            call.sdp_version += 1
            body = sdp_body(self.host, call.rtp.port, call.session, call.sdp_version, dict(media[2]))
        elif msg.method == "INVITE":  # an offerless re-INVITE: we offer, the ACK answers
            call.sdp_version += 1
            body = sdp_body(self.host, call.rtp.port, call.session, call.sdp_version, OFFER)
        call.remote_target = uri_of(msg.header("contact")) or call.remote_target
        self._send(self._response(msg, 200, "OK", contact=True, body=body), source)

    def _on_bye(self, call: Call | None, msg: Message, source: tuple[str, int]) -> None:
        if call is None:
            self._send(self._response(msg, 481, "Call/Transaction Does Not Exist"), source)
            return
        self._send(self._response(msg, 200, "OK"), source)
        if call.state != "ended":
            self._end(call)
            self.listener.on_ended(call, "bye")

    def _on_cancel(self, call: Call | None, msg: Message, source: tuple[str, int]) -> None:
        if call is None or call.invite is None:
            self._send(self._response(msg, 481, "Call/Transaction Does Not Exist"), source)
            return
        self._send(self._response(msg, 200, "OK", to_tag=call.local_tag), source)
        if call.state == "ringing":
            call.final_response = self._response(call.invite, 487, "Request Terminated", to_tag=call.local_tag)
            self._send(call.final_response, source)
            self._end(call)
            self.listener.on_ended(call, "cancelled")

    def _response(self, req: Message, code: int, reason: str, *, to_tag: str | None = None,
                  contact: bool = False, body: str = "", extra: tuple[str, ...] = ()) -> str:
        lines = [f"SIP/2.0 {code} {reason}"] + [f"Via: {v}" for v in req.all("via")]
        lines += [f"Record-Route: {v}" for v in req.all("record-route")] if code < 300 else []
        to = req.header("to")
        if to_tag and not tag_of(to):
            to += f";tag={to_tag}"
        lines += [f"From: {req.header('from')}", f"To: {to}", f"Call-ID: {req.call_id}", f"CSeq: {req.header('cseq')}",
                  f"User-Agent: {USER_AGENT}", *extra]
        if contact:
            lines.append(f"Contact: {self.contact}")
        return self._finish(lines, body)


_REASONS = {403: "Forbidden", 480: "Temporarily Unavailable", 486: "Busy Here", 488: "Not Acceptable Here",
            603: "Decline"}


def _granted_expiry(resp: Message, host: str, port: int, asked: int) -> int:
    """The expiry the registrar granted our contact: its ``expires`` parameter, else the Expires header."""
    for value in resp.all("contact"):
        for contact in value.split(","):
            if f"{host}:{port}" in contact:
                match = re.search(r";\s*expires=(\d+)", contact)
                if match:
                    return int(match.group(1))
    header = resp.header("expires")
    return int(header) if header.isascii() and header.isdigit() else asked


def _addresses_of(host: str) -> frozenset[str]:
    try:
        return resolve(host)
    except OSError:
        return frozenset({normal_ip(host)})


def _local_ip_for(server: tuple[str, int]) -> str:
    """The local address the kernel routes to the PBX from: what goes in Contact, Via and SDP."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(server)  # UDP connect sends nothing; it only picks the route
        return str(probe.getsockname()[0])
    except OSError:
        return "0.0.0.0"
    finally:
        probe.close()
