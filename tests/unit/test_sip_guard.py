"""What a post accepts (issue 8): the Gate's questions, the helpers it asks them with, and the pyVoIP parser's
refusal of what our transactions would trip on. Pure functions: no sockets but a route lookup on loopback."""

from __future__ import annotations

import logging

import pytest

from sip_refuge.post.sip.guard import (
    Counters,
    Gate,
    local_address_for,
    normal_ip,
    parse_uri,
    sdp_addresses,
    split_hostport,
    via_public_address,
)
from sip_refuge.post.sip.pyvoip_msg import Message, remote_media

log = logging.getLogger("test.guard")
SDP = "v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n"


def gate() -> Gate:
    g = Gate("sutton-market", frozenset({"10.0.0.1", "10.0.0.2"}), Counters(log))
    g.add_contact("10.20.5.7", 5060)
    return g


@pytest.mark.parametrize(("uri", "parsed"), [
    ("sip:sutton-market@10.20.5.7:5060;ob", ("sutton-market", "10.20.5.7", 5060)),
    ("<sip:a@[::1]:5070;transport=udp>", ("a", "::1", 5070)),
    ("sip:a@10.0.0.1", ("a", "10.0.0.1", 5060)),
    ("sips:a@10.0.0.1", ("a", "10.0.0.1", 5061)),
    ("sip:a@10.0.0.1;transport=tls", ("a", "10.0.0.1", 5061)),
    ("sip:10.0.0.1:5080", ("", "10.0.0.1", 5080)),
    ("SIP:A@Host.Example", ("A", "host.example", 5060)),
])
def test_sip_uris_are_read_into_user_host_port(uri: str, parsed: tuple[str, str, int]) -> None:
    assert parse_uri(uri) == parsed


@pytest.mark.parametrize("uri", ["tel:+441234", "not-a-uri", "", "http://x"])
def test_what_is_not_a_sip_uri_is_none(uri: str) -> None:
    assert parse_uri(uri) is None


def test_addresses_have_one_spelling() -> None:
    assert normal_ip("[::FFFF:10.0.0.1]") == "10.0.0.1"
    assert normal_ip(" ::1 ") == "::1"
    assert split_hostport("10.0.0.1:5060") == ("10.0.0.1", 5060)
    assert split_hostport("[::1]:5070") == ("::1", 5070)
    assert split_hostport("10.0.0.1", 5060) == ("10.0.0.1", 5060)


def test_sdp_connection_addresses_at_session_and_media_level() -> None:
    body = SDP + "c=IN IP4 203.0.113.5/127\r\nc=IN IP6 ::1\r\n"
    assert sdp_addresses(body) == ["10.0.0.1", "203.0.113.5", "::1"]


def test_where_the_registrar_saw_us_comes_from_received_and_rport() -> None:
    assert via_public_address("SIP/2.0/UDP 10.20.5.7:5060;branch=z9;received=198.51.100.4;rport=40001") \
        == ("198.51.100.4", 40001)
    assert via_public_address("SIP/2.0/UDP 10.20.5.7:5062;rport=40001;branch=z9") == ("10.20.5.7", 40001)
    assert via_public_address("SIP/2.0/UDP 10.20.5.7:5060;branch=z9") is None


def test_a_call_back_through_the_registration_with_media_at_the_pbx_is_accepted() -> None:
    assert gate().refuse_callback("10.0.0.2:5060", "sip:sutton-market@10.20.5.7:5060;ob", SDP) is None


@pytest.mark.parametrize(("source", "uri", "sdp", "why"), [
    ("127.0.0.2:5060", "sip:sutton-market@10.20.5.7:5060", SDP, "not the PBX"),
    ("10.0.0.1:5060", "sip:someone-else@10.20.5.7:5060", SDP, "is not for sutton-market"),
    ("10.0.0.1:5060", "sip:sutton-market@10.20.5.7:5999", SDP, "not the contact this post registered"),
    ("10.0.0.1:5060", "sip:sutton-market@10.20.5.7", SDP.replace("c=IN IP4 10.0.0.1", "c=IN IP4 127.0.0.2"),
     "media would go to 127.0.0.2"),
    ("10.0.0.1:5060", "tel:9001", SDP, "not a SIP URI"),
])
def test_everything_else_is_refused_and_counted(source: str, uri: str, sdp: str, why: str) -> None:
    g = gate()
    reason = g.refuse_callback(source, uri, sdp)
    assert reason is not None and why in reason
    assert g.counters.snapshot() == {"refused": 1}


def test_the_public_contact_learnt_from_the_registration_is_accepted_too() -> None:
    g = gate()
    uri = "sip:sutton-market@198.51.100.4:40001"
    assert g.callback_refusal(uri, SDP) is not None
    g.learn_registration("SIP/2.0/UDP 10.20.5.7:5060;branch=z9;received=198.51.100.4;rport=40001")
    assert g.callback_refusal(uri, SDP) is None


def test_counters_warn_once_per_kind_then_count_quietly(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="test.guard")
    counters = Counters(log)
    for n in range(5):
        counters.count("malformed", "datagram %d unreadable", n)
    counters.count("refused", "stranger")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["datagram 0 unreadable [malformed: 1 so far]", "stranger [refused: 1 so far]"]
    assert counters.snapshot() == {"malformed": 5, "refused": 1}


def test_a_post_binds_where_the_route_to_the_pbx_starts() -> None:
    assert local_address_for("127.0.0.1", 5060) == "127.0.0.1"


# -------------------------------------------------------------------------------------------------- pyVoIP parser

def response(cseq: str = "1 INVITE", status: str = "200 OK", extra: str = "") -> bytes:
    return (f"SIP/2.0 {status}\r\nVia: SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bKx\r\nFrom: <sip:a@b>;tag=1\r\n"
            f"To: <sip:c@d>;tag=2\r\nCall-ID: x\r\nCSeq: {cseq}\r\n{extra}Content-Length: 0\r\n\r\n").encode()


def test_the_parser_reads_a_good_response_and_request() -> None:
    msg = Message.parse(response())
    assert (msg.code, msg.method, msg.cseq) == (200, "INVITE", (1, "INVITE"))
    req = Message.parse(b"BYE sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9\r\nFrom: <sip:x@y>;tag=1\r\n"
                        b"To: <sip:a@b>;tag=2\r\nCall-ID: c\r\nCSeq: 7 BYE\r\n\r\n")
    assert (req.method, req.cseq) == ("BYE", (7, "BYE"))


@pytest.mark.parametrize(("data", "why"), [
    (response(cseq="abc INVITE"), "bad CSeq"),  # finding 4: this one killed the SIP thread
    (response(cseq=""), "bad CSeq"),
    (response(cseq="99999999999 INVITE"), "bad CSeq"),
    (response(status="2OO OK"), "bad status code"),
    (response(status="999 Nine"), "bad status code"),
    (response().replace(b"Call-ID: x\r\n", b""), "no call-id header"),
    (response()[:-4], "no end of headers"),
    (b"BYE sip:a@b SIP/2.0\r\nVia: v\r\nFrom: f\r\nTo: t\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\n\r\n", "CSeq method"),
    (b"INVITE sip:a@b SIP/3.0\r\nCSeq: 1 INVITE\r\n\r\n", "not a SIP request line"),
    (b"\x00\xff\r\n\r\n", "not a SIP start line"),
])
def test_the_parser_refuses_what_our_transactions_would_trip_on(data: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        Message.parse(data)


@pytest.mark.parametrize("sdp", [
    {"c": [{"address": "10.0.0.1"}], "m": [{"type": "audio", "port": "x", "methods": ["0"]}]},
    {"c": [{}], "m": [{"type": "audio", "port": 4000, "methods": ["0"]}]},
    {"c": None, "m": [None]},
    {"c": [{"address": "10.0.0.1"}], "m": [{"type": "audio", "port": 99999, "methods": ["0"]}]},
])
def test_odd_sdp_gives_no_media_rather_than_an_error(sdp: dict[str, object]) -> None:
    assert remote_media(sdp) is None
