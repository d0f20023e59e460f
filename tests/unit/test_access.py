"""Operators' access without HTTP: password hashes, the users file, the login throttle and sessions (explicit clocks)."""

from __future__ import annotations

import os
import pty
import select
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sip_refuge.config import load_site
from sip_refuge.config.passwords import (
    PARALLEL,
    Params,
    PasswordError,
    check_new_password,
    hash_password,
    parse_hash,
    verify,
)
from sip_refuge.config.secrets import init_secrets
from sip_refuge.config.users import UsersError, parse_users, read_users, remove_user, set_user
from sip_refuge.errors import ConfigError, RefugeError
from sip_refuge.sidecar.access.sessions import Sessions
from sip_refuge.sidecar.access.throttle import BY_ADDRESS, BY_USER, LoginThrottle
from tests.support.clock import Clock

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config" / "site.example.yaml"
FAST = Params(log2_n=10, r=8, p=1)  # a cheap hash where a test needs many; the sidecar reads params from each hash


# -- passwords ---------------------------------------------------------------------------------------------

def test_a_hash_is_scrypt_with_the_documented_parameters_and_verifies() -> None:
    encoded = hash_password("correct horse battery")
    assert encoded.startswith(f"$scrypt$ln=15,r=8,p={PARALLEL}$")
    params, salt, digest = parse_hash(encoded)
    assert (params.log2_n, params.r, params.p, params.memory) == (15, 8, 3, 32 * 1024 * 1024)
    assert len(salt) == 16 and len(digest) == 32
    assert verify("correct horse battery", encoded)
    assert not verify("correct horse batterY", encoded)
    assert hash_password("correct horse battery") != encoded  # a fresh salt each time


def test_the_same_password_typed_two_ways_is_the_same_password() -> None:
    composed, decomposed = "caf\u00e9 au lait 2024", "cafe\u0301 au lait 2024"
    assert verify(decomposed, hash_password(composed, FAST))


@pytest.mark.parametrize("encoded", [
    "", "plain", "$scrypt$ln=15,r=8,p=1$c2FsdHNhbHRzYWx0c2FsdA$", "$2b$12$abcdefghijklmnopqrstuv",
    "$scrypt$ln=31,r=8,p=1$c2FsdHNhbHRzYWx0c2FsdA$" + "A" * 43,  # 2^31 rounds: hours and 256 GiB
    "$scrypt$ln=15,r=8,p=1$c2FsdHNhbHRzYWx0c2FsdA$" + "A" * 20,  # too short a hash
])
def test_a_damaged_or_hostile_hash_never_matches(encoded: str) -> None:
    assert not verify("anything at all", encoded)
    with pytest.raises(PasswordError):
        parse_hash(encoded)


@pytest.mark.parametrize(("password", "why"), [
    ("short", "too short"), ("a" * 1025, "too long"), ("twelve chars\n!", "control character"),
    ("password1234", "well-known"), ("aaaabbbbaaaabbbb", "well-known"),
])
def test_weak_new_passwords_are_refused(password: str, why: str) -> None:
    with pytest.raises(PasswordError, match=why):
        check_new_password(password)


# -- the users file ----------------------------------------------------------------------------------------

def test_users_file_lines_are_checked_naming_file_and_line() -> None:
    good = hash_password("correct horse battery", FAST)
    assert set(parse_users(f"# comment\n\nalice:operator:{good}\nbob:admin:{good}\n", "u")) == {"alice", "bob"}
    cases = {
        f"Alice:operator:{good}": "u:1: user name 'Alice' must be",
        f"alice:boss:{good}": "u:1: user alice: role 'boss' must be one of operator, admin",
        "alice:operator:plaintext": "u:1: user alice: not a password hash",
        f"alice:operator:{good}\nalice:admin:{good}": "u:2: user alice is listed twice (first on line 1)",
    }
    for text, message in cases.items():
        with pytest.raises(UsersError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_users(text, "u")


def test_set_and_remove_rewrite_the_file_atomically_with_mode_600(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "users"
    assert set_user(path, "alice", "operator", hash_password("first password!", FAST)) is True
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with open(path, encoding="utf-8") as old:  # what a sidecar reading at this moment holds
        assert set_user(path, "alice", "admin", hash_password("second password!", FAST)) is False
        assert os.fstat(old.fileno()).st_ino != path.stat().st_ino  # a new file renamed over the old one
        assert "alice:operator:" in old.read()  # never written in place: the reader sees the whole old file
    assert set_user(path, "bob", "operator", hash_password("bobs password!!", FAST)) is True
    users = read_users(path)
    assert (users["alice"].role, verify("second password!", users["alice"].hash)) == ("admin", True)
    assert remove_user(path, "alice") is True and remove_user(path, "alice") is False
    assert list(read_users(path)) == ["bob"]
    assert path.read_text().startswith("# sip-refuge operators")
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_a_users_file_readable_by_others_or_a_link_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "users"
    set_user(path, "alice", "operator", hash_password("first password!", FAST))
    path.chmod(0o644)
    with pytest.raises(UsersError, match="readable by other users: chmod 600"):
        read_users(path)
    path.chmod(0o600)
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(RefugeError, match="is a symbolic link"):
        read_users(link)
    with pytest.raises(RefugeError):
        set_user(link, "bob", "operator", hash_password("bobs password!!", FAST))  # a bad file is never rewritten


# -- the site file ---------------------------------------------------------------------------------------------

def site_with(tmp_path: Path, **sidecar: object) -> Path:
    path = tmp_path / "site.yaml"
    data = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    data["sidecar"].update(sidecar)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    init_secrets(load_site(path, check_secrets=False))
    return path


def test_site_keys_for_access_have_safe_defaults_and_are_checked(tmp_path: Path) -> None:
    conf = load_site(site_with(tmp_path)).sidecar
    assert conf is not None and conf.users_file == tmp_path / "secrets" / "sidecar.users"
    assert (conf.session_idle, conf.session_lifetime) == (1800, 43200)
    assert conf.monitoring_networks == ("127.0.0.1/32", "::1/128") and conf.proxies == ()
    with pytest.raises(ConfigError) as caught:
        load_site(site_with(tmp_path, session_idle="2h", session_lifetime="1h", proxies=["nowhere"],
                            monitoring_networks=["10.0.0.0/33"]))
    text = str(caught.value)
    assert "sidecar.session_idle: 7200 s is longer than session_lifetime (3600 s)" in text
    assert "sidecar.proxies[0]: 'nowhere' is not a network" in text
    assert "sidecar.monitoring_networks[0]: '10.0.0.0/33' is not a network" in text


def test_a_missing_or_bad_users_file_is_named_by_config_check(tmp_path: Path) -> None:
    site = site_with(tmp_path)
    users = tmp_path / "secrets" / "sidecar.users"
    users.write_text("alice:operator:plaintext\n")
    with pytest.raises(ConfigError, match=r"site.yaml:\d+: sidecar.users_file: .*sidecar.users:1: user alice: not a"):
        load_site(site)
    users.unlink()
    with pytest.raises(ConfigError, match="does not exist; run: sip-refuge secrets init SITE"):
        load_site(site)


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sip_refuge.cli", *args], input=stdin, capture_output=True,
                          text=True, check=False, cwd=REPO)


def test_users_add_reads_the_password_from_stdin_never_the_command_line(tmp_path: Path) -> None:
    site = site_with(tmp_path)
    added = run_cli("users", "add", str(site), "alice", "--role", "admin", stdin="a long enough password\n")
    assert added.returncode == 0, added.stderr
    assert "added admin alice" in added.stdout
    user = read_users(tmp_path / "secrets" / "sidecar.users")["alice"]
    assert user.role == "admin" and verify("a long enough password", user.hash)
    assert "a long enough password" not in (tmp_path / "secrets" / "sidecar.users").read_text()
    weak = run_cli("users", "add", str(site), "bob", stdin="short\n")
    assert weak.returncode == 2 and "the password is too short" in weak.stderr
    bad = run_cli("users", "add", str(site), "Bob!", stdin="a long enough password\n")
    assert bad.returncode == 2 and "user name 'Bob!' must be" in bad.stderr
    check = run_cli("config", "check", str(site))
    assert check.returncode == 0 and "1 operators" in check.stdout
    assert run_cli("users", "remove", str(site), "alice").returncode == 0
    gone = run_cli("users", "remove", str(site), "alice")
    assert gone.returncode == 2 and "no user 'alice'" in gone.stderr


def in_a_terminal(argv: list[str], answers: list[bytes]) -> tuple[int, str]:
    """Run the CLI on a pseudo-terminal, typing each answer once its prompt shows; (exit status, what it showed)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI, with the terminal as its stdin (getpass reads /dev/tty)
        os.chdir(REPO)
        os.execv(sys.executable, [sys.executable, "-m", "sip_refuge.cli", *argv])
    shown, asked = b"", 0

    def read() -> bool:
        nonlocal shown
        ready, _, _ = select.select([fd], [], [], 30)
        try:
            chunk = os.read(fd, 1024) if ready else b""
        except OSError:  # the child has closed the terminal
            chunk = b""
        shown += chunk
        return bool(chunk)

    for answer in answers:
        # getpass flushes what was typed before its prompt: wait for the prompt, then type.
        while shown.count(b": ") <= asked and read():
            pass
        asked += 1
        os.write(fd, answer)
    while read():
        pass
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), shown.decode(errors="replace")


def test_users_add_in_a_terminal_asks_twice_without_echo(tmp_path: Path) -> None:
    site = site_with(tmp_path)
    status, shown = in_a_terminal(["users", "add", str(site), "carol"], [b"typed in a terminal\n"] * 2)
    assert status == 0 and "New password for carol:" in shown and "The same again:" in shown
    assert "typed in a terminal" not in shown  # never echoed
    assert verify("typed in a terminal", read_users(tmp_path / "secrets" / "sidecar.users")["carol"].hash)
    status, shown = in_a_terminal(["users", "add", str(site), "carol"], [b"another password!\n", b"a typo!\n"])
    assert status == 2 and "the two passwords differ; nothing was changed" in shown
    assert verify("typed in a terminal", read_users(tmp_path / "secrets" / "sidecar.users")["carol"].hash)


def test_users_add_without_a_users_file_in_the_site_says_what_to_add(tmp_path: Path) -> None:
    shutil.copy(EXAMPLE, tmp_path / "site.yaml")
    text = (tmp_path / "site.yaml").read_text().replace("  users_file: secrets/sidecar.users", "  # no users")
    (tmp_path / "site.yaml").write_text(text)
    result = run_cli("users", "add", str(tmp_path / "site.yaml"), "alice", stdin="a long enough password\n")
    assert result.returncode == 2 and "add `users_file: secrets/sidecar.users`" in result.stderr
    assert not os.path.exists(tmp_path / "secrets" / "sidecar.users")


# -- the throttle --------------------------------------------------------------------------------------------

def test_failures_from_one_address_make_it_wait_longer_and_longer() -> None:
    clock = Clock()
    throttle = LoginThrottle(clock)
    for _ in range(BY_ADDRESS.free):
        assert throttle.wait("127.0.0.2", "alice")[0] == 0
        throttle.failed("127.0.0.2", "x")
    assert throttle.wait("127.0.0.2", "alice") == (0.0, False)  # five free
    waits = []
    for _ in range(12):
        throttle.failed("127.0.0.2", "y")
        waits.append(throttle.wait("127.0.0.2", "alice")[0])
        clock.now += waits[-1]
    assert waits == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 900, 900]
    assert throttle.wait("127.0.0.3", "alice") == (0.0, False)  # another address is not held back


def test_only_the_first_refusal_of_a_wait_is_reported() -> None:
    clock = Clock()
    throttle = LoginThrottle(clock)
    for _ in range(BY_ADDRESS.free + 1):
        throttle.failed("127.0.0.2", "alice")
    assert [throttle.wait("127.0.0.2", "alice")[1] for _ in range(3)] == [True, False, False]


def test_a_user_guessed_at_from_many_addresses_waits_at_most_a_minute_and_not_at_a_known_desk() -> None:
    clock = Clock()
    throttle = LoginThrottle(clock)
    throttle.succeeded("10.0.0.5", "alice")  # alice's own desk
    for n in range(BY_USER.free + 10):
        throttle.failed(f"10.9.{n}.1", "alice")
    wait, _ = throttle.wait("10.9.200.1", "alice")
    assert wait == BY_USER.longest
    assert throttle.wait("10.0.0.5", "alice")[0] == 0  # the operator at their desk gets in meanwhile
    clock.now += BY_USER.longest
    assert throttle.wait("10.9.200.1", "alice")[0] == 0


def test_a_success_clears_the_counts_and_old_failures_are_forgotten() -> None:
    clock = Clock()
    throttle = LoginThrottle(clock, window=900)
    for _ in range(BY_ADDRESS.free):
        throttle.failed("127.0.0.2", "alice")
    clock.now += 901
    assert throttle.failed("127.0.0.2", "alice") == (1, 1)  # the window passed: counting starts again
    throttle.succeeded("127.0.0.2", "alice")
    assert throttle.failed("127.0.0.2", "alice") == (1, 1)


# -- sessions --------------------------------------------------------------------------------------------------

def test_a_session_ends_when_idle_at_its_lifetime_and_at_logout() -> None:
    clock = Clock()
    sessions = Sessions(idle=60, lifetime=300, clock=clock)
    cookie, session = sessions.open("alice", "operator", "hash", "127.0.0.1", "2026-01-01T00:00:00.000Z")
    assert sessions.get(cookie) is session and len(session.csrf) >= 32
    assert sessions.get(cookie + "x") is None and sessions.get("") is None
    for _ in range(4):  # in use: each request counts
        clock.now += 59
        assert sessions.get(cookie) is session
    assert sessions.expires_in(session) == 60 - 0  # idle ends it before the lifetime does
    clock.now += 65  # 301 s after login: past the lifetime, though used a moment ago
    assert sessions.get(cookie) is None
    cookie, session = sessions.open("alice", "operator", "hash", "127.0.0.1", "2026-01-01T00:00:00.000Z")
    clock.now += 61
    assert sessions.get(cookie) is None  # idle
    cookie, session = sessions.open("alice", "operator", "hash", "127.0.0.1", "2026-01-01T00:00:00.000Z")
    assert sessions.close(cookie) is session and sessions.get(cookie) is None


def test_sessions_of_a_changed_user_can_be_ended_together() -> None:
    sessions = Sessions(idle=60, lifetime=300, clock=Clock())
    a, _ = sessions.open("alice", "operator", "h1", "127.0.0.1", "t")
    b, _ = sessions.open("bob", "operator", "h2", "127.0.0.1", "t")
    assert [s.user for s in sessions.end(lambda s: s.user != "alice")] == ["alice"]
    assert sessions.get(a) is None and sessions.get(b) is not None
