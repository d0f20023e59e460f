"""Calls through the rendered example site in a real Asterisk 22, placed and answered by real SIP peers."""

from __future__ import annotations

import re
import time

import pytest

from sip_refuge.config import Site
from sip_refuge.pbx.asterisk import Asterisk
from tests.integration.conftest import LogMark, Phones, every_phone, wait_until
from tests.support.sipua import SipMessage

pytestmark = pytest.mark.integration


def display_name(header: str | None) -> str:
    m = re.match(r'\s*"([^"]*)"', header or "")
    return m.group(1) if m else ""


def test_every_post_and_desk_registers(pbx: Asterisk, site: Site, phones: Phones) -> None:
    """Every post and desk of the example site registers with digest auth and shows as a reachable contact."""
    def contacts() -> dict[str, str]:
        # "Contact:  ID/URI  HASH  STATUS  RTT"; the URI column is cut at a fixed width.
        rows = [line.split() for line in pbx.cli("pjsip show contacts").splitlines()]
        return {row[1]: row[3] for row in rows if len(row) >= 4 and row[0] == "Contact:" and "/sip:" in row[1]}

    expected = {f"{p.user}/sip:{p.user}@127.0.0.1:{p.port}": p.user for p in phones.all()}
    assert sorted(expected.values()) == sorted(p.id for p in every_phone(site))

    def all_available() -> bool:
        found = contacts()
        return all(any(want.startswith(uri) and status == "Avail" for uri, status in found.items())
                   for want in expected)

    wait_until(all_available, 10, "every post and desk as an Avail contact at its own address")


def test_desks_ring_with_the_posts_name(pbx: Asterisk, site: Site, phones: Phones) -> None:
    """A post dialling the queue extension rings every desk, showing the post's name as caller ID."""
    post = site.posts[0]
    mark = LogMark(pbx.messages_log)
    call = phones.posts[post.id].call(site.queue.extension)
    for desk in site.desks:
        invite = phones.desks[desk.id].wait_incoming(10).invite
        assert display_name(invite.header("from")) == post.name
        assert post.extension in (invite.header("from") or "")
        pai = invite.header("p-asserted-identity")
        assert pai is not None and display_name(pai) == post.name
    # The same log that must stay silent in the toll-fraud tests does show a real dial-out.
    wait_until(lambda: all(f"PJSIP/{d.id}" in mark.text() for d in site.desks), 5, "desks in Asterisk's log")
    call.hangup()
    assert call.wait_final(5).code == 487


def test_ringing_reaches_the_post_before_the_answer(pbx: Asterisk, site: Site, phones: Phones) -> None:
    """The post gets 180/183 while the desks ring and its 200 OK only after a desk answers."""
    post, desk = site.posts[1], site.desks[0]
    call = phones.posts[post.id].call(site.queue.extension)
    incoming = phones.desks[desk.id].wait_incoming(10)
    early = phones.posts[post.id].wait_for(
        lambda: next((r for r in call.responses if r.code in (180, 183)), None), 5, "180/183 at the post")
    time.sleep(1.0)  # the desk lets it ring: nothing may answer the post meanwhile
    assert call.final is None, f"the post's call was answered before any desk answered: {call.codes}"
    answered_at = time.monotonic()
    incoming.answer()
    ok: SipMessage = call.wait_final(5)
    assert ok.code == 200
    assert early.at < answered_at <= ok.at
    assert call.codes.index(early.code) < call.codes.index(200)
    # The other desk stops ringing: ringall, first answer wins.
    other = phones.desks[site.desks[1].id].wait_incoming(5)
    other.wait_state("cancelled", 5)
    call.hangup()
    incoming.wait_state("ended", 5)


def test_unanswered_call_overflows_after_max_wait(pbx: Asterisk, site: Site, phones: Phones) -> None:
    """An alarm call nobody answers leaves the queue after max_wait and reaches the overflow extension."""
    post = site.posts[0]
    mark = LogMark(pbx.messages_log)
    call = phones.posts[post.id].call(site.queue.extension)
    for desk in site.desks:
        phones.desks[desk.id].wait_incoming(10)  # they ring, nobody answers
    # The sandbox's overflow route answers (echo), so the post's first 200 OK is the overflow.
    ok = call.wait_final(site.queue.max_wait + 10)
    assert ok.code == 200
    assert ok.at - call.sent_at >= site.queue.max_wait - 1, "overflowed before max_wait"
    for desk in site.desks:
        phones.desks[desk.id].incoming[0].wait_state("cancelled", 5)
    log = wait_until(lambda: (t := mark.text()) and f"{site.queue.overflow}@refuge-overflow-route" in t and t,
                     5, "overflow route in the log")
    assert f"overflow to {site.queue.overflow}" in log
    call.hangup()


def test_desk_callback_carries_auto_answer_headers(pbx: Asterisk, site: Site, phones: Phones) -> None:
    """A desk dialling a post's extension sends the post an INVITE with Call-Info answer-after=0 and Alert-Info."""
    post, desk = site.posts[2], site.desks[1]
    call = phones.desks[desk.id].call(post.extension)
    invite = phones.posts[post.id].wait_incoming(10).invite
    assert "answer-after=0" in (invite.header("call-info") or "")
    assert "info=alert-autoanswer" in (invite.header("alert-info") or "")
    phones.posts[post.id].incoming[0].answer()
    assert call.wait_final(5).code == 200
    call.hangup()


def test_self_test_extension_echoes_dtmf(pbx: Asterisk, site: Site, phones: Phones) -> None:
    """The self-test extension answers and echoes RFC 4733 DTMF digits back to the post."""
    post = phones.posts[site.posts[0].id]
    call = post.call(site.self_test.extension)
    assert call.wait_final(5).code == 200
    call.rtp.send_silence(5)  # lets Asterisk learn our RTP address (rtp_symmetric)
    digits = "1590*7"  # no '#': it ends Echo()
    for digit in digits:
        call.rtp.send_dtmf(digit)
    post.wait_for(lambda: "".join(call.rtp.digits) == digits or None, 5, f"echo of {digits} (got {call.rtp.digits})")
    call.hangup()
