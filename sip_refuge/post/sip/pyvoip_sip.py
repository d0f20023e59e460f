"""The pyVoIP agent's SIP thread: one thread per agent, blocked in ``select`` on the SIP socket, a wake-up
socketpair and a timer heap (no sleeps, no polling); the guard on what arrives; client transactions with
their retransmissions; responses. The layers above (:mod:`.pyvoip_register`, :mod:`.pyvoip_calls`,
:mod:`.pyvoip_ua`) add registration, calls and requests from the PBX; :mod:`.pyvoip_ua` says why this is not
pyVoIP's own ``SIPClient``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sip_refuge.post.sip.guard import Counters, Gate, normal_ip, resolve
from sip_refuge.post.sip.pyvoip_dialog import Call, Registration, UaListener
from sip_refuge.post.sip.pyvoip_msg import USER_AGENT, Message, new_branch, tag_of

T1 = 0.5  # RFC 3261 retransmission base over UDP
REGISTER_TIMEOUT = 4.0  # no answer to a REGISTER within this: the PBX is unreachable
INVITE_TIMEOUT = 32.0  # timer B: no answer at all to an INVITE (the post's machine gives up long before)
REQUEST_TIMEOUT = 4.0  # BYE, CANCEL, un-REGISTER
ANSWER_TIMEOUT = 32.0  # retransmit our 200 OK to an INVITE until ACK, at most this long (timer H)
TURN = 1.0  # the thread's loop turns at least this often, so a stuck thread can be told from an idle one
STALL = 10.0  # no turn for this long: the thread is stuck (health says so)


class Prefixed(logging.LoggerAdapter[logging.Logger]):
    """Puts who is speaking (the post id, the desk id) at the start of every log line."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"{(self.extra or {}).get('who', '?')}: {msg}", kwargs


@dataclass
class Transaction:
    method: str
    text: str
    dest: tuple[str, int]
    on_final: Callable[[Message | None], None]  # None = timed out
    on_provisional: Callable[[Message], None] | None = None
    deadline: float = 0.0
    interval: float = T1
    retransmit: bool = True


class SipAgent:
    """The thread, the socket and the transactions every layer of the agent sends through."""

    def __init__(self, *, user: str, password: str, server: tuple[str, int], listener: UaListener,
                 display: str = "", local_port: int = 0, name: str = "", expires: int = 120,
                 refresh_interval: float = 15.0, media_gap: float = 1.0, keep_audio: bool = False,
                 on_dtmf: Callable[[Call, str], None] | None = None, logger: logging.LoggerAdapter[Any] | None = None,
                 host: str | None = None, trusted: frozenset[str] | None = None,
                 counters: Counters | None = None, also: tuple[tuple[str, int], ...] = ()) -> None:
        """``host``: the local address to bind (default: the one routing to ``server``). ``trusted``: the only
        addresses SIP and RTP are accepted from (default: ``server``'s addresses). ``also``: more registrars (the
        secondary PBX of a pair) this phone registers with at the same time, from the same address and port, so
        that a call to either finds it and a call from it goes out on a registration that PBX knows."""
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
        self.trusted = trusted if trusted is not None \
            else frozenset().union(*(_addresses_of(r[0]) for r in (server, *also)))
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
        self._registrations = {r[0]: Registration(r, f"sip:{user}@{r[0]}") for r in (server, *also)}
        self.calls: dict[str, Call] = {}  # by SIP Call-ID
        self._keys = itertools.count(1)
        self._wake_r, self._wake_w = socket.socketpair()
        self._commands: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        self._transactions: dict[tuple[str, str], Transaction] = {}  # by Via branch and CSeq method
        self._stopping = False
        self._done = False
        self._thread = threading.Thread(target=self._run, name=f"pyvoip-{self.name}", daemon=True)

    # -- life cycle, from any thread --------------------------------------------------------------------
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

    def _on_request(self, msg: Message, source: tuple[str, int]) -> None:
        """A request from the PBX, past the guard: :class:`.pyvoip_ua.Ua` answers it."""
        raise NotImplementedError

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
            tx = Transaction(method, text, dest, on_final, on_provisional, time.monotonic() + timeout)
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

    def _ack_2xx(self, call: Call, resp: Message) -> None:
        # The 2xx ACK is a new transaction to the remote target, with the dialog's tags (pyVoIP got this wrong).
        self._request("ACK", call.remote_target or call.remote_uri, call=call, dest=call.dest,
                      on_final=lambda r: None, timeout=0, cseq=resp.cseq[0])

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
