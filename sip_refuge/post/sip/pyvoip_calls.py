"""The pyVoIP agent's calls: outgoing INVITEs and their answers, CANCEL, BYE, answering and rejecting a
call-back, and the wiring of each call's media (the remote SDP to its RTP session, and a watch on its silence).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

from sip_refuge.post.sip.pyvoip_dialog import Call
from sip_refuge.post.sip.pyvoip_msg import (
    USER_AGENT,
    Message,
    digest,
    new_branch,
    new_tag,
    remote_media,
    sdp_body,
    tag_of,
    uri_of,
)
from sip_refuge.post.sip.pyvoip_register import Registering
from sip_refuge.post.sip.pyvoip_rtp import OFFER, RtpSession
from sip_refuge.post.sip.pyvoip_sip import ANSWER_TIMEOUT, INVITE_TIMEOUT, REQUEST_TIMEOUT, T1, Transaction


class Calling(Registering):
    """Places, answers, probes and ends calls; every ``*_now`` method runs on the agent's thread."""

    # -- outgoing calls ---------------------------------------------------------------------------------
    def dial(self, extension: str, host: str | None = None, key: str | None = None) -> Call:
        """Place a call (from any thread); events follow on the listener."""
        dest = (host or self.server[0], self.server[1])
        call = Call(key or f"c{next(self._keys)}", True, secrets.token_hex(12), new_tag(), dest,
                    self._rtp_session())
        call.rtp.dtmf = lambda digit: self.on_dtmf(call, digit) if self.on_dtmf else None
        # From: the address of record that PBX registered (each PBX of a pair knows the phone by its own).
        reg = self._registrations.get(dest[0])
        call.local_uri, call.remote_uri = reg.aor if reg else self.aor, f"sip:{extension}@{dest[0]}"
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
        # A challenge to an attempt the post has already given up (hung up before any provisional: the PBX was
        # silent, then came back and answered a retransmission) ends it here: answering the challenge would
        # place a second, ghost alarm in the queue beside the one the post re-sends.
        if resp.code in (401, 407) and not authed and call.state != "ended" and not call.cancel_pending:
            self._invite(call, resp)
            return
        was_cancelled = call.cancel_pending
        self._end(call)
        if not was_cancelled:
            self.listener.on_failed(call, resp.code, resp.reason)

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
        self._transactions[key] = Transaction("CANCEL", text, call.dest, lambda r: None,
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


_REASONS = {403: "Forbidden", 480: "Temporarily Unavailable", 486: "Busy Here", 488: "Not Acceptable Here",
            603: "Decline"}
