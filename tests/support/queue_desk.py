"""desk-1 as a raw SIP robot in the site's queue, for the tests of a whole post agent against a real Asterisk:
registered and free in the queue, then answering the post's alarm when it rings."""

from __future__ import annotations

import re

from sip_refuge.config import Site
from sip_refuge.pbx.asterisk import Asterisk
from tests.support.agent import AgentProcess, InProcessAgent, lights
from tests.support.sipua import IncomingCall, SipPeer
from tests.support.waiting import wait_for

DESK = "desk-1"


def desk_ready(pbx: Asterisk, site: Site) -> bool:
    return bool(re.search(rf"\(PJSIP/{DESK}\).*\(Not in use\)", pbx.cli(f"queue show {site.queue.name}")))


def register_desk(desk: SipPeer, pbx: Asterisk, site: Site) -> None:
    assert desk.register(expires=300).code == 200
    # The queue lets nobody join while its only desk is unknown: wait until it would ring desk-1.
    wait_for(lambda: desk_ready(pbx, site), 15, "desk-1 free in the queue")


def answer_alarm(agent: InProcessAgent | AgentProcess, desk: SipPeer, index: int = 0) -> IncomingCall:
    """The desk rings with the alarm and answers it; the post is connected, yellow and green on.

    The ring answered is the newest still ringing from ``index`` on once the post is queued: a ring the PBX has
    cancelled since (an attempt the post gave up as the PBX came back, cancelled in milliseconds) is not the alarm.
    """
    try:
        desk.wait_incoming(15, index=index)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; the post's status: {agent.status()}") from None
    agent.wait_status(lambda s: s["state"] == "queued" and lights(s, yellow="on"), 10, "queued, yellow on")
    ring = desk.wait_for(lambda: next((c for c in reversed(desk.incoming[index:]) if c.state == "ringing"), None),
                         15, "the alarm ringing at the desk")
    ring.answer()
    agent.wait_status(lambda s: s["state"] == "connected" and lights(s, yellow="on", green="on"), 10,
                      "connected, yellow and green on")
    return ring
