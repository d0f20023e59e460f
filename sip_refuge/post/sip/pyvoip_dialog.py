"""What the pyVoIP agent (:mod:`.pyvoip_ua`) keeps of each dialog, a call's or a registration's, and what it
reports to its owner.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Protocol

from sip_refuge.post.sip.pyvoip_msg import Message, new_tag
from sip_refuge.post.sip.pyvoip_rtp import RtpSession


class UaListener(Protocol):
    """What the agent reports; every method runs on the agent's thread."""

    def on_registered(self, expires: int, host: str) -> None: ...
    def on_registration_failed(self, reason: str, status: int | None, host: str) -> None: ...
    def on_unregistered(self, reason: str, host: str) -> None: ...
    def on_progress(self, call: Call, status: int) -> None: ...
    def on_answered(self, call: Call) -> None: ...
    def on_failed(self, call: Call, status: int | None, reason: str) -> None: ...
    def on_ended(self, call: Call, reason: str) -> None: ...
    def on_incoming(self, call: Call) -> None: ...
    def on_media_stalled(self, call: Call) -> None: ...
    def on_media_resumed(self, call: Call) -> None: ...


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
class Registration:
    """This phone's registration with one registrar (a PBX of the pair): its own dialog and timers."""

    server: tuple[str, int]
    aor: str
    call_id: str = field(default_factory=lambda: secrets.token_hex(10))
    tag: str = field(default_factory=new_tag)
    cseq: int = 0
    timer: int = 0  # the token of the one pending re-REGISTER
    failures: int = 0
    registered: bool = False
    granted: int = 0
