"""The operators' users file (``sidecar.users_file``): who may log in to the sidecar's pages.

One user a line, ``NAME:ROLE:HASH``; blank lines and lines starting with ``#`` are ignored::

    # written by sip-refuge users add
    alice:operator:$scrypt$ln=15,r=8,p=3$...$...
    bob:admin:$scrypt$ln=15,r=8,p=3$...$...

Roles: ``operator`` reads every page, camera, stream and export and makes the operators' writes (press,
acknowledge, close-out); ``admin`` may also read the audit log. The file holds hashes only (see
:mod:`.passwords`), but a hash still lets its holder guess offline: like a secret it must be a regular file
(never a link) of mode 0600. ``sip-refuge users add`` writes it atomically, so a sidecar that reads it at
the same moment sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sip_refuge.config.files import printable, read_regular
from sip_refuge.config.passwords import PasswordError, parse_hash
from sip_refuge.errors import RefugeError

ROLES = ("operator", "admin")
NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
NAME_HINT = "lowercase letters, digits, '.', '_' and '-' (at most 64, starting with a letter or digit)"
MAX_USERS_BYTES = 256 * 1024  # about 1,500 users


class UsersError(RefugeError):
    """The users file cannot be read, or a line of it is wrong (the message names FILE:LINE)."""


@dataclass(frozen=True)
class User:
    name: str
    role: str
    hash: str
    line: int


def parse_users(text: str, where: str) -> dict[str, User]:
    users: dict[str, User] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, role, hashed = (line.split(":", 2) + ["", ""])[:3]
        place = f"{where}:{number}"
        if NAME.fullmatch(name) is None:
            raise UsersError(f"{place}: user name {printable(name)!r} must be {NAME_HINT}")
        if name in users:
            raise UsersError(f"{place}: user {name} is listed twice (first on line {users[name].line})")
        if role not in ROLES:
            raise UsersError(f"{place}: user {name}: role {printable(role)!r} must be one of {', '.join(ROLES)}")
        try:
            parse_hash(hashed)
        except PasswordError as exc:
            raise UsersError(f"{place}: user {name}: {exc}") from None
        users[name] = User(name, role, hashed, number)
    return users


def _text(path: Path) -> str:
    data = read_regular(path, limit=MAX_USERS_BYTES, what="users file", follow_link=False)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsersError(f"users file {printable(str(path))} is not UTF-8 text") from None


def read_users(path: Path) -> dict[str, User]:
    """Every user in ``path``; UsersError for a file that is missing, readable by others, or wrong."""
    text = _text(path)  # refuses a link, a FIFO, a device, a huge file
    if os.stat(path, follow_symlinks=False).st_mode & 0o077:
        raise UsersError(f"users file {printable(str(path))} is readable by other users: chmod 600 it")
    return parse_users(text, printable(str(path)))


def check_name(name: str) -> str:
    if NAME.fullmatch(name) is None:
        raise UsersError(f"user name {printable(name)!r} must be {NAME_HINT}")
    return name


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One writer at a time: two `users add` at once must not lose one of the users."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _rewrite(path: Path, lines: list[str]) -> None:
    """Replace ``path`` by ``lines`` atomically (a new file, fsynced, renamed over the old one)."""
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write("".join(line + "\n" for line in lines))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


HEADER = "# sip-refuge operators: NAME:ROLE:HASH (sip-refuge users add/remove SITE NAME)"


def init_users_file(path: Path) -> bool:
    """Create an empty users file (mode 0600) unless something is at ``path`` (a link too: never written
    through); True when created. `sip-refuge secrets init` calls it with the other secret files."""
    if os.path.lexists(path):
        return False
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise UsersError(f"cannot create users file {printable(str(path))}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(HEADER + "\n")
    return True


def _current(path: Path) -> list[str]:
    if not os.path.lexists(path):
        return [HEADER]
    text = _text(path)
    parse_users(text, printable(str(path)))  # never rewrite a file we cannot read right: say what is wrong
    return text.splitlines()


def _name_of(line: str) -> str:
    stripped = line.strip()
    return "" if not stripped or stripped.startswith("#") else stripped.split(":", 1)[0]


def set_user(path: Path, name: str, role: str, hashed: str) -> bool:
    """Add ``name``, or replace its role and hash; True when the user is new."""
    check_name(name)
    if role not in ROLES:
        raise UsersError(f"role {role!r} must be one of {', '.join(ROLES)}")
    parse_hash(hashed)
    try:
        with _locked(path):
            lines = _current(path)
            entry = f"{name}:{role}:{hashed}"
            found = [i for i, line in enumerate(lines) if _name_of(line) == name]
            if found:
                lines[found[0]] = entry
            else:
                lines.append(entry)
            _rewrite(path, lines)
    except OSError as exc:
        raise UsersError(f"cannot write users file {printable(str(path))}: {exc.strerror or exc}") from None
    return not found


def remove_user(path: Path, name: str) -> bool:
    """Remove ``name``; False when there was no such user."""
    try:
        with _locked(path):
            if not os.path.lexists(path):
                return False
            lines = _current(path)
            kept = [line for line in lines if _name_of(line) != name]
            if len(kept) == len(lines):
                return False
            _rewrite(path, kept)
    except OSError as exc:
        raise UsersError(f"cannot write users file {printable(str(path))}: {exc.strerror or exc}") from None
    return True
