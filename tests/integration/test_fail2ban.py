"""The shipped fail2ban filter and jail (asterisk/fail2ban) against a real brute force on a real Asterisk 22
(issue 8, finding 13): a raw SIP peer at 127.0.0.2 guesses passwords, tries unknown users, registers from
outside its network and forges addresses into the log; the legitimate phones register from 127.0.0.1."""

from __future__ import annotations

import configparser
import re
import secrets
import shutil
import socket
import subprocess
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from sip_refuge.config import Site, load_site
from sip_refuge.pbx.asterisk import Asterisk
from tests.integration.conftest import REPO, LogMark, every_phone, write_site
from tests.support.sipua import SipPeer
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

FAIL2BAN = REPO / "asterisk" / "fail2ban"
FILTER = FAIL2BAN / "filter.d" / "sip-refuge-asterisk.conf"
JAIL = FAIL2BAN / "jail.d" / "sip-refuge.conf"
ATTACKER, PHONES, FORGED = "127.0.0.2", "127.0.0.1", "10.9.9.9"


@pytest.fixture()
def acl_site(tmp_path: Path) -> Site:
    """The example site on free ports; desks only from 127.0.0.1, so 127.0.0.2 meets the desks' ACL."""
    path = write_site(tmp_path / "site").path
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["pbx"]["networks"] = {"posts": ["127.0.0.0/8"], "desks": [f"{PHONES}/32"]}
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return load_site(path)


@pytest.fixture()
def acl_pbx(acl_site: Site) -> Iterator[Asterisk]:
    with Asterisk(acl_site, command="pytest tests/integration/test_fail2ban.py") as pbx:
        yield pbx


def register_every_phone(site: Site) -> None:
    server = (site.pbx.host, site.pbx.sip_port)
    for phone in every_phone(site):
        with SipPeer(phone.id, phone.secret.read(), server, host=PHONES) as peer:
            assert peer.register().code == 200, phone.id


def guess(site: Site, user: str, count: int, password: str | None = None) -> None:
    """``count`` REGISTER attempts from the attacker, each answering the challenge with ``password``."""
    with SipPeer(user, password or "guess-" + secrets.token_hex(6), (site.pbx.host, site.pbx.sip_port),
                 host=ATTACKER) as peer:
        for _ in range(count):
            assert peer.register().code == 401


def forged_register(site: Site, user: str, call_id: str, authorization: str | None = None) -> None:
    """One raw REGISTER whose user, Call-ID or digest response try to write another address into the log."""
    server = (site.pbx.host, site.pbx.sip_port)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((ATTACKER, 0))
        sock.settimeout(5)
        port = sock.getsockname()[1]
        lines = [f"REGISTER sip:{server[0]}:{server[1]} SIP/2.0",
                 f"Via: SIP/2.0/UDP {ATTACKER}:{port};branch=z9hG4bK{secrets.token_hex(6)};rport",
                 "Max-Forwards: 70", f"From: <sip:{user}@{server[0]}>;tag={secrets.token_hex(4)}",
                 f"To: <sip:{user}@{server[0]}>", f"Call-ID: {call_id}", "CSeq: 1 REGISTER",
                 f"Contact: <sip:x@{ATTACKER}:{port}>", "Expires: 60", *([authorization] if authorization else []),
                 "Content-Length: 0"]
        sock.sendto(("\r\n".join(lines) + "\r\n\r\n").encode(), server)
        assert sock.recv(4096).startswith(b"SIP/2.0 401 ")


def fail2ban_regex(log: Path, *options: str) -> str:
    done = subprocess.run(["fail2ban-regex", "-r", *options, str(log), str(FILTER)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def hits_per_regex(report: str) -> list[int]:
    """The hit count of each failregex, in the filter's order, from fail2ban-regex's report."""
    section = report.split("Failregex:", 1)[1].split("Ignoreregex:", 1)[0]
    return [int(n) for n in re.findall(r"^\|\s+\d+\) \[(\d+)\] ", section, re.M)]


def test_fail2ban_regex_counts_every_failed_login_against_the_attacker_only(acl_site: Site,
                                                                          acl_pbx: Asterisk) -> None:
    """fail2ban-regex with the shipped filter finds each failure of a real brute force, all from 127.0.0.2."""
    site = acl_site
    register_every_phone(site)
    post, desk = site.posts[0], site.desks[0]
    guesses, unknown, outside = 200, 3, 2
    guess(site, post.id, guesses)
    for i in range(unknown):
        guess(site, f"intruder-{i}", 1)
    guess(site, desk.id, outside, password=desk.secret.read())  # the right password, from outside desks' network
    forged = f'x",LocalAddress="IPV4/UDP/127.0.0.1/5060",RemoteAddress="IPV4/UDP/{FORGED}/5060'
    forged_register(site, "intruder-cid", forged + "@a")
    forged_register(site, f"a%22,LocalAddress=%22IPV4/UDP/1.1.1.1/1%22,RemoteAddress=%22IPV4/UDP/{FORGED}/1", "c4")
    forged_register(site, post.id, "c5", f'Authorization: Digest username="{post.id}", realm="asterisk", '
                    f'nonce="1/2", uri="sip:x", algorithm=MD5, response="ab\\",RemoteAddress=\\"IPV4/UDP/'
                    f'{FORGED}/5060\\",ExpectedResponse=\\""')
    # Asterisk answers each unknown user's or outsider's attempt (a REGISTER, then one with credentials)
    # with two InvalidAccountID or FailedACL events and, for the second, a ChallengeResponseFailed.
    expected = {"ChallengeResponseFailed": guesses + unknown + outside + 1, "InvalidAccountID": 2 * unknown + 2,
                "FailedACL": 2 * outside}

    def logged() -> Counter[str]:
        return Counter(re.findall(r'SecurityEvent="(\w+)"', acl_pbx.security_log.read_text(encoding="utf-8")))

    wait_for(lambda: all(logged()[k] >= v for k, v in expected.items()), 20, "every attempt in security.log")
    log = acl_pbx.security_log.read_text(encoding="utf-8")
    assert {k: logged()[k] for k in expected} == expected
    assert re.search(rf'SecurityEvent="SuccessfulAuth".*RemoteAddress="IPV4/UDP/{PHONES}/', log)  # legit logins
    assert f"/{FORGED}/" in log  # the forged address is in the log ...

    found = Counter(fail2ban_regex(acl_pbx.security_log, "-o", "ip").split())
    assert found == Counter({ATTACKER: sum(expected.values())})  # ... but only the attacker is ever found
    report = fail2ban_regex(acl_pbx.security_log)
    assert hits_per_regex(report) == [expected["ChallengeResponseFailed"], expected["InvalidAccountID"],
                                      expected["FailedACL"]]


@dataclass
class Fail2ban:
    """A real fail2ban-server in the foreground with its own config folder, socket and in-memory database.

    Debian's own fail2ban configuration plus the shipped jail and filter; the only overrides are where the
    log is, polling (no inotify needed) and an action that writes each ban to a file: no firewall is touched.
    """

    folder: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def bans(self) -> Path:
        return self.folder / "bans"

    @property
    def socket(self) -> Path:
        return self.folder / "fail2ban.sock"

    def start(self) -> None:
        conf = self.folder / "conf"
        shutil.copytree("/etc/fail2ban", conf)
        # Debian enables sshd in jail.d, an admin may enable more in jail.local: never run the host's jails.
        for path in [*(conf / "jail.d").iterdir(), *conf.glob("jail.local")]:
            path.unlink()
        shutil.copy(FILTER, conf / "filter.d")
        shutil.copy(JAIL, conf / "jail.d")
        (conf / "fail2ban.local").write_text("[DEFAULT]\ndbfile = :memory:\nallowipv6 = auto\n")
        (conf / "action.d" / "sip-refuge-test-record.conf").write_text(
            "[Definition]\nactionstart =\nactionstop =\nactioncheck =\nactionban = echo <ip> >> <banfile>\n"
            "actionunban =\n[Init]\nbanfile = /dev/null\n")
        (conf / "jail.d" / "sip-refuge.local").write_text(
            f"[sip-refuge-asterisk]\nlogpath = {self.log}\nbackend = polling\n"
            # The attacker stands at a loopback address: fail2ban must not skip it as one of its own.
            "ignoreself = false\n"
            f'action = sip-refuge-test-record[banfile="{self.bans}"]\n')
        self.process = subprocess.Popen(
            ["fail2ban-server", "-f", "-x", "-c", str(conf), "-s", str(self.socket), "-p",
             str(self.folder / "fail2ban.pid"), "--logtarget", str(self.folder / "fail2ban.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: "sip-refuge-asterisk" in self.client("status"), 30, "fail2ban jail started")

    def client(self, *words: str) -> str:
        done = subprocess.run(["fail2ban-client", "-s", str(self.socket), *words], capture_output=True, text=True,
                              timeout=30, check=False)
        return done.stdout if done.returncode == 0 else ""

    def status(self) -> dict[str, str]:
        text = self.client("status", "sip-refuge-asterisk")
        return {m["key"]: m["value"].strip() for m in re.finditer(r"[|`]- (?P<key>[A-Za-z ]+):\s*(?P<value>.*)", text)}

    def stop(self) -> None:
        if self.process is None:
            return
        self.client("stop")
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture()
def fail2ban(acl_pbx: Asterisk, tmp_path: Path) -> Iterator[Fail2ban]:
    server = Fail2ban(tmp_path / "fail2ban", acl_pbx.security_log)
    server.folder.mkdir()
    try:
        server.start()
        yield server
    finally:
        server.stop()


def test_fail2ban_server_bans_the_attacker_after_maxretry(acl_site: Site, acl_pbx: Asterisk,
                                                          fail2ban: Fail2ban) -> None:
    """A real fail2ban-server with the shipped jail bans 127.0.0.2 at its maxretry-th failure, not before,
    and never the phones that registered properly from 127.0.0.1."""
    jail = configparser.ConfigParser(interpolation=None)
    jail.read(JAIL)
    maxretry = jail.getint("sip-refuge-asterisk", "maxretry")
    mark = LogMark(acl_pbx.security_log)
    register_every_phone(acl_site)
    guess(acl_site, acl_site.posts[0].id, maxretry - 1)

    def failed() -> int:
        return int(fail2ban.status().get("Total failed", "0"))

    wait_for(lambda: failed() >= maxretry - 1, 30, f"{maxretry - 1} failures counted by fail2ban")
    assert "SuccessfulAuth" in mark.text()  # the phones' logins were read first, and counted for nothing
    assert failed() == maxretry - 1
    assert fail2ban.status()["Currently banned"] == "0" and not fail2ban.bans.exists()

    guess(acl_site, acl_site.posts[0].id, 1)
    wait_for(fail2ban.bans.exists, 30, "a ban written by the jail's action")
    assert fail2ban.bans.read_text().split() == [ATTACKER]
    assert fail2ban.status()["Banned IP list"] == ATTACKER
    assert failed() == maxretry
