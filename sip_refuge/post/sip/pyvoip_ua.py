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

import functools

from sip_refuge.post.sip.pyvoip_calls import Calling
from sip_refuge.post.sip.pyvoip_dialog import Call, UaListener
from sip_refuge.post.sip.pyvoip_msg import (
    Message,
    display_or_user,
    new_tag,
    remote_media,
    sdp_body,
    tag_of,
    uri_of,
)
from sip_refuge.post.sip.pyvoip_rtp import OFFER
from sip_refuge.post.sip.pyvoip_sip import Prefixed

__all__ = ["Call", "Prefixed", "Ua", "UaListener"]


class Ua(Calling):
    """A registered SIP phone on UDP. ``start`` spawns its thread; ``stop`` un-registers and joins it."""

    # -- life cycle, from any thread --------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        for reg in self._registrations.values():
            self.post(functools.partial(self._register, reg))

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

    def _begin_stop(self) -> None:
        self._stopping = True
        for call in list(self.calls.values()):
            self.hangup_now(call)
        if self.registered:
            for reg in self._registrations.values():
                if reg.registered:
                    self._register(reg, expires=0)
            self.call_later(1.0, self._finish_stop)  # a PBX that does not answer must not hold us up
        else:
            self._done = True

    def _finish_stop(self) -> None:
        self._done = True

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
