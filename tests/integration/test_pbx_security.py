"""Authentication and toll fraud against the rendered example site in a real Asterisk 22."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from sip_refuge.config import Site
from sip_refuge.pbx.asterisk import Asterisk
from tests.integration.conftest import LogMark, Phones, peer, wait_until

pytestmark = pytest.mark.integration

# Any sign in Asterisk's log (verbose level 3 goes to messages.log) that a channel was dialled out.
DIALLED = re.compile(r"Called \S+|Executing \[[^\]]*\] (?:Dial|Queue|Originate|Page|FollowMe)\(", re.I)


def test_wrong_password_and_unknown_user_get_401_and_are_logged(pbx: Asterisk, site: Site) -> None:
    """A wrong password and an unknown user both get 401 and appear in Asterisk's security log."""
    post = site.posts[0]
    mark = LogMark(pbx.security_log)
    with peer(site, post.id, password="not-the-password-1234") as wrong, peer(site, "intruder-42") as unknown:
        assert wrong.register().code == 401
        assert unknown.register().code == 401
    wait_until(lambda: re.search(rf'ChallengeResponseFailed".*AccountID="{post.id}"', mark.text()), 5,
               "failed login of the post in security.log")
    wait_until(lambda: re.search(r'InvalidAccountID".*AccountID="intruder-42"', mark.text()), 5,
               "unknown user in security.log")


def _targets(site: Site) -> list[tuple[str, str]]:
    """(id, user part of the Request-URI) a post must never get through with."""
    other_post = site.posts[1].extension
    desk = site.desks[0].extension
    overflow = site.queue.overflow
    encoded = "".join(f"%{ord(c):02X}" for c in other_post)
    plain = [("999", "999"), ("112", "112"), ("intl-00", "00441234567890"), ("intl-plus", "+441234567890"),
             ("us-9011", "9011441234567890"), ("desk", desk), ("other-post", other_post), ("overflow", overflow),
             ("s", "s"), ("h", "h"), ("i", "i"), ("t", "t"), ("star97", "*97"), ("zero", "0"),
             ("200-chars", (site.queue.extension * 50)[:200]), ("dial-injection", f"{site.queue.extension}&PJSIP/x")]
    tricks = [("enc-dial-injection", f"{site.queue.extension}%26PJSIP%2Fx"), ("enc-999", "%39%39%39"),
              ("enc-plus", "%2B441234567890"), ("enc-other-post", encoded),
              ("enc-crlf", f"{site.queue.extension}%0D%0AX-Evil:%201"),
              ("enc-comma", f"{site.queue.extension}%2C1"), ("enc-overflow", "".join(f"%{ord(c):02X}" for c in overflow))]
    return plain + tricks


# The site is only known inside fixtures: the ids are fixed here, the values come from the site.
_EXAMPLE_IDS = [
    "999", "112", "intl-00", "intl-plus", "us-9011", "desk", "other-post", "overflow", "s", "h", "i", "t", "star97",
    "zero", "200-chars", "dial-injection", "enc-dial-injection", "enc-999", "enc-plus", "enc-other-post",
    "enc-crlf", "enc-comma", "enc-overflow"]


def _assert_nothing_dialled(pbx: Asterisk, phones: Phones, caller: str, mark: LogMark, what: str) -> None:
    for phone in phones.all():
        if phone.user != caller:
            assert not phone.invites(), f"{what}: {phone.user} got an INVITE"
    wait_until(lambda: "0 active channels" in pbx.cli("core show channels count"), 5, "no channel left")
    dialled = DIALLED.findall(mark.text())
    assert not dialled, f"{what}: Asterisk dialled out: {dialled}"


@pytest.mark.parametrize("target_id", _EXAMPLE_IDS)
def test_post_cannot_dial_anything_but_the_queue_and_self_test(pbx: Asterisk, site: Site, phones: Phones,
                                                              target_id: str) -> None:
    """A registered post dialling a number it must not reach is refused and nothing is dialled out."""
    target = dict(_targets(site))[target_id]
    caller = site.posts[0].id
    mark = LogMark(pbx.messages_log)
    call = phones.posts[caller].call(target)
    final = call.wait_final(10)
    assert final.code >= 400, f"{target!r}: {call.codes}"
    _assert_nothing_dialled(pbx, phones, caller, mark, repr(target))


@pytest.mark.parametrize("trick", ["encoded", "nul-suffix"])
def test_uri_encoded_queue_extension_only_reaches_the_queue(pbx: Asterisk, site: Site, phones: Phones,
                                                            trick: str) -> None:
    """A percent-encoded queue extension is the queue extension (RFC 3261 19.1.4) and rings only the desks."""
    post = site.posts[0]
    # Asterisk decodes the user part; an encoded NUL ends the C string, so "7000%00" is plain 7000.
    encoded = {"encoded": "".join(f"%{ord(c):02X}" for c in site.queue.extension),
               "nul-suffix": f"{site.queue.extension}%00"}[trick]
    call = phones.posts[post.id].call(encoded)
    for desk in site.desks:
        invite = phones.desks[desk.id].wait_incoming(10).invite
        assert post.name in (invite.header("from") or "")
    call.hangup()
    assert call.wait_final(5).code == 487
    for other in site.posts[1:]:
        assert not phones.posts[other.id].invites()


def test_refused_calls_are_in_the_security_log(pbx: Asterisk, site: Site, phones: Phones) -> None:
    """A refused number is written to the security log (for fail2ban and the operator's audit)."""
    mark = LogMark(Path(pbx.security_log))
    call = phones.posts[site.posts[0].id].call("00441234567890")
    assert call.wait_final(10).code >= 400
    wait_until(lambda: "00441234567890" in mark.text(), 5, "refused number in security.log")


def ami_replies(site: Site, actions: list[str]) -> dict[str, str]:
    """Log in as the sidecar's AMI user and send each action; the Response line of each, by action."""
    with socket.create_connection(("127.0.0.1", site.pbx.ami.port), timeout=10) as conn:
        stream = conn.makefile("rwb")
        stream.readline()  # the banner

        def send(fields: dict[str, str]) -> None:
            stream.write(("".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n").encode())
            stream.flush()

        def reply(action_id: str) -> str:
            block: dict[str, str] = {}
            while True:
                line = stream.readline().decode().strip()
                if line:
                    key, _, value = line.partition(": ")
                    block[key] = value
                elif block:
                    if "Response" in block and block.get("ActionID") == action_id:
                        return block["Response"]
                    block = {}

        send({"Action": "Login", "Username": site.pbx.ami.username, "Secret": site.pbx.ami.secret.read(),
              "Events": "off", "ActionID": "login"})
        assert reply("login") == "Success"
        out = {}
        for action in actions:
            send({"Action": action, "ActionID": action, "Channel": "PJSIP/desk-1", "Exten": "999",
                  "Context": "refuge-desk", "Priority": "1", "Command": "core show version"})
            out[action] = reply(action)
        return out


@pytest.mark.integration
def test_sidecar_ami_user_reads_status_but_changes_nothing(pbx: Asterisk, site: Site) -> None:
    """The sidecar's AMI user may list channels, device states and the queue, and may not originate,
    run CLI commands, reload, or change queue members."""
    replies = ami_replies(site, ["CoreShowChannels", "DeviceStateList", "QueueStatus", "Originate", "Command",
                                 "Reload", "QueuePause", "Redirect", "Hangup"])
    assert {a: replies[a] for a in ("CoreShowChannels", "DeviceStateList", "QueueStatus")} == \
        dict.fromkeys(("CoreShowChannels", "DeviceStateList", "QueueStatus"), "Success")
    refused = ("Originate", "Command", "Reload", "QueuePause", "Redirect", "Hangup")
    assert {a: replies[a] for a in refused} == dict.fromkeys(refused, "Error")
