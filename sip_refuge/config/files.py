"""Reading the files a site names, and the text that may go from them into generated files.

A site file or a secret may be anything a path can point at: a FIFO that never answers, ``/dev/zero``,
a link to ``/etc/shadow``, a directory, a file of gigabytes. Each is opened without blocking, checked
to be a regular file and read up to a limit, so every one of them ends in a clear message instead of a
hang, a ``MemoryError`` or a secret read from somewhere it should not be.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

from sip_refuge.errors import RefugeError

MAX_SITE_BYTES = 1024 * 1024  # the example site is 6 KB; 1,500 posts take 0.7 MB
MAX_SECRET_BYTES = 4096  # a secret file holds one value of a few dozen characters

# Characters that end or bend a line of a generated file (Asterisk config, headers): C0 and C1 controls,
# DEL, the Unicode line and paragraph separators, and the bidirectional overrides that make an editor
# show a line other than it is.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMES = {"\n": "a line break", "\r": "a carriage return", "\t": "a tab", "\x00": "a NUL byte",
          "\x1b": "an escape character"}
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def control_character(text: str, allowed: str = "") -> str | None:
    """A description of the first control character in ``text`` (ignoring ``allowed``), or None."""
    for match in _CONTROL.finditer(text):
        char = match.group()
        if char not in allowed:
            return f"U+{ord(char):04X}, {_NAMES.get(char, 'a control character')}"
    return None


def printable(text: str) -> str:
    """``text`` with every control character written as an escape, to show it in one message line."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def read_regular(path: Path, *, limit: int, what: str, follow_link: bool) -> bytes:
    """The bytes of ``path``, which must be a regular file of at most ``limit`` bytes.

    Opened non-blocking, so a FIFO is refused at once instead of waiting for a writer; with
    ``follow_link=False`` a symbolic link (as the last part of the path) is refused.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC | (0 if follow_link else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_link and os.path.islink(path):
            raise RefugeError(f"{what} {printable(str(path))} is a symbolic link (to {printable(os.readlink(path))}), "
                              "and a secret is only read from a regular file (nor does `secrets init` write "
                              "through a link): remove the link, or give the path of the file itself") from None
        raise RefugeError(f"cannot read {what} {printable(str(path))}: {exc.strerror or exc}") from None
    except ValueError:  # a NUL byte in the path
        raise RefugeError(f"cannot read {what} {printable(str(path))}: the path holds a NUL byte") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
            raise RefugeError(f"{what} {printable(str(path))} is {kind}, not a regular file")
        chunks: list[bytes] = []
        size = 0
        while size <= limit and (chunk := os.read(fd, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
        data = b"".join(chunks)
    except OSError as exc:
        raise RefugeError(f"cannot read {what} {printable(str(path))}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise RefugeError(f"{what} {printable(str(path))} is larger than {_size(limit)}")
    return data


# Pictures a page may show as they are (the site plan). No SVG: an SVG is a document that can run scripts.
_IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF87a", "image/gif"),
                (b"GIF89a", "image/gif"))


def image_type(data: bytes) -> str | None:
    """The MIME type of a PNG, JPEG, GIF or WebP picture, from its first bytes; None for anything else."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((kind for magic, kind in _IMAGE_MAGIC if data.startswith(magic)), None)


def read_image(path: Path, *, limit: int, what: str) -> tuple[bytes, str]:
    """A picture file (a regular file, links followed, at most ``limit`` bytes): its bytes and MIME type."""
    data = read_regular(path, limit=limit, what=what, follow_link=True)
    kind = image_type(data)
    if kind is None:
        raise RefugeError(f"{what} {printable(str(path))} is not a PNG, JPEG, GIF or WebP picture "
                          "(an SVG plan: export it as PNG)")
    return data, kind


def read_secret_file(path: Path) -> str:
    """One secret value: a regular file (never a link) of UTF-8 text, one line, surrounding space stripped."""
    data = read_regular(path, limit=MAX_SECRET_BYTES, what="secret file", follow_link=False)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise RefugeError(f"secret file {printable(str(path))} is not UTF-8 text") from None
    return checked_secret(text, f"file {printable(str(path))}")


def checked_secret(value: str, where: str) -> str:
    """``value`` stripped; refused when it holds a control character (it would break a config line)."""
    value = value.strip()
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # an environment variable of non-UTF-8 bytes (Python's surrogate escapes)
        raise RefugeError(f"the secret in {where} is not UTF-8 text") from None
    bad = control_character(value)
    if bad:
        raise RefugeError(f"the secret in {where} holds a control character ({bad}): a secret is one line of text")
    return value


def create_file(path: Path, data: bytes, mode: int, what: str) -> None:
    """Write a new file of ``mode``: never over anything already there, never through a symbolic link
    (``O_EXCL``, ``O_NOFOLLOW``); a private key or secret is never readable by others, not even briefly."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:  # something appeared there meanwhile, or the folder is not writable
        raise RefugeError(f"cannot create {what} file {printable(str(path))}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
    except OSError as exc:
        raise RefugeError(f"cannot write {what} file {printable(str(path))}: {exc.strerror or exc}") from None


def _size(limit: int) -> str:
    return f"{limit // (1024 * 1024)} MiB" if limit >= 1024 * 1024 else f"{limit} bytes"
