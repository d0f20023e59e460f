"""Operators' password hashes: scrypt from the standard library, in the PHC string format.

Why scrypt: it is memory-hard (a guesser's GPU or ASIC pays for the memory of every guess, not only its
time), it ships with Python (``hashlib.scrypt``, from OpenSSL), so a password check needs no compiled
package on the sidecar's host, and the parameters travel inside each hash, so stronger ones can come later
without invalidating the hashes already written. Argon2id would do as well but needs a package (argon2-cffi).

Parameters: N = 2^15, r = 8, p = 3. That is one of OWASP's equivalent scrypt settings (Password Storage
Cheat Sheet: N=2^17 r=8 p=1, or N=2^15 r=8 p=3, ...): 32 MiB of memory per check, about 1 s on our 2-core
test machine. A login is rare (once a shift), so a slow one costs nothing, while an offline guess from a
stolen users file costs the same second and 32 MiB.

A hash reads ``$scrypt$ln=15,r=8,p=3$SALT$HASH`` (``ln`` = log2 N; salt 16 random bytes and hash 32 bytes,
both base64 without padding), as passlib and the PHC format write it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import unicodedata
from dataclasses import dataclass

from sip_refuge.errors import RefugeError

LOG2_N, BLOCK, PARALLEL = 15, 8, 3
SALT_BYTES, HASH_BYTES = 16, 32
MIN_LENGTH, MAX_LENGTH = 12, 1024  # characters: NIST SP 800-63B asks for at least 8, and allows 64 or more
# Bounds on what a hash may ask for: a mistyped users file must not make one check take minutes or gigabytes.
_LIMITS = {"ln": (10, 20), "r": (1, 32), "p": (1, 16)}
_FORMAT = re.compile(r"\$scrypt\$ln=(\d{1,2}),r=(\d{1,2}),p=(\d{1,2})\$([A-Za-z0-9+/]{16,88})\$([A-Za-z0-9+/]{16,88})")
WEAK = {"password1234", "passwordpassword", "123456789012", "qwertyuiopas", "letmeinletmein", "changemechangeme",
        "administrator", "operator1234", "sip-refuge-demo"}


class PasswordError(RefugeError):
    """A password or a stored hash that cannot be used."""


@dataclass(frozen=True)
class Params:
    log2_n: int = LOG2_N
    r: int = BLOCK
    p: int = PARALLEL

    @property
    def memory(self) -> int:
        """Bytes scrypt needs: 128 * r * N (OpenSSL refuses to go past ``maxmem``)."""
        return 128 * self.r * (1 << self.log2_n)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _derive(password: str, salt: bytes, params: Params) -> bytes:
    # NFC: the same password typed on two keyboards (é as one character or as e + accent) is the same password.
    data = unicodedata.normalize("NFC", password).encode("utf-8")
    return hashlib.scrypt(data, salt=salt, n=1 << params.log2_n, r=params.r, p=params.p,
                          maxmem=params.memory + 1024 * 1024, dklen=HASH_BYTES)


def check_new_password(password: str) -> None:
    """Refuse a password too short, too long, of control characters, or well known (NIST SP 800-63B)."""
    if len(password) < MIN_LENGTH:
        raise PasswordError(f"the password is too short ({len(password)} characters; at least {MIN_LENGTH})")
    if len(password) > MAX_LENGTH:
        raise PasswordError(f"the password is too long (at most {MAX_LENGTH} characters)")
    if any(unicodedata.category(c) == "Cc" for c in password):
        raise PasswordError("the password holds a control character")
    if password.lower() in WEAK or len(set(password)) < 5:
        raise PasswordError("the password is a well-known or trivial one")


def hash_password(password: str, params: Params = Params()) -> str:
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _derive(password, salt, params)
    return f"$scrypt$ln={params.log2_n},r={params.r},p={params.p}${_b64(salt)}${_b64(digest)}"


def parse_hash(encoded: str) -> tuple[Params, bytes, bytes]:
    """(params, salt, hash) of a stored hash; PasswordError says what is wrong with it."""
    match = _FORMAT.fullmatch(encoded)
    if match is None:
        raise PasswordError("not a password hash of the form $scrypt$ln=15,r=8,p=3$SALT$HASH "
                            "(write it with: sip-refuge users add SITE NAME)")
    values = {"ln": int(match[1]), "r": int(match[2]), "p": int(match[3])}
    for name, (low, high) in _LIMITS.items():
        if not low <= values[name] <= high:
            raise PasswordError(f"scrypt parameter {name}={values[name]} is out of range ({low} to {high})")
    try:
        salt, digest = _unb64(match[4]), _unb64(match[5])
    except binascii.Error:
        raise PasswordError("the salt or hash is not base64") from None
    if len(digest) != HASH_BYTES:
        raise PasswordError(f"the hash is {len(digest)} bytes, not {HASH_BYTES}")
    return Params(values["ln"], values["r"], values["p"]), salt, digest


def verify(password: str, encoded: str) -> bool:
    """True when ``password`` matches ``encoded`` (compared in constant time); a bad hash never matches."""
    if len(password) > MAX_LENGTH:
        return False
    try:
        params, salt, digest = parse_hash(encoded)
    except PasswordError:
        return False
    return hmac.compare_digest(_derive(password, salt, params), digest)
