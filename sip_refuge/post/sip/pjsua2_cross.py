"""What cross-compiling pjsua2 for a Raspberry Pi needs beside the recipe: the arm64 sysroot and qemu.

``python -m sip_refuge.post.sip.pjsua2_build --target aarch64`` builds on a PC the wheel a Raspberry Pi post
(Raspberry Pi OS bookworm, 64-bit: Debian 12's CPython 3.11) installs. The compiler is Debian 12's
``aarch64-linux-gnu-g++``; the headers and libraries it builds against come from a *sysroot*: Debian 12's
arm64 packages unpacked into ``<cache>/pjsua2/sysroot-bookworm-arm64`` by ``mmdebstrap --variant=extract``
(nothing is installed or run, so it takes seconds and needs no emulation). SWIG is the host's: it only
writes C++. The wheel then links exactly the Debian 12 libraries a Pi's ``apt-get install`` gives
(:data:`RUNTIME_PACKAGES`).

The built binding is checked as the native one is, by importing it and opening a TLS transport, but in the
sysroot's own arm64 Python run by ``qemu-aarch64-static`` (``-L`` points it at the sysroot's loader and
libraries). A wheel that would not load on a Pi is never cached.
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sip_refuge.errors import SipError
from sip_refuge.pbx.asterisk import cache_dir

SUITE = "bookworm"  # Debian 12, which Raspberry Pi OS bookworm is built on
# What the build reads in the sysroot: libc and the -dev packages of BUILD_PACKAGES for the target, the
# target's Python headers, and (for the check under qemu) its Python with the modules sip_refuge imports.
SYSROOT_PACKAGES = ("libc6-dev", "libstdc++6", "libssl-dev", "libopus-dev", "libsrtp2-dev", "libspeex-dev", "libspeexdsp-dev",
                    "libasound2-dev", "python3-dev", "python3-yaml", "python3-numpy")
# Debian packages on the PC (the Makefile's deps list carries them too).
HOST_PACKAGES = ("g++-aarch64-linux-gnu", "mmdebstrap", "qemu-user-static")
# What the wheel links on the Pi (Debian 12 names): README.md's Pi section installs them.
RUNTIME_PACKAGES = ("libssl3", "libopus0", "libsrtp2-1", "libspeex1", "libspeexdsp1", "libasound2")


@dataclass(frozen=True)
class Cross:
    """One machine we cross-compile for: GNU triplet, Debian architecture, wheel platform, qemu."""

    machine: str  # as --target and platform.machine() spell it
    triplet: str
    debian_arch: str
    python: str  # the target distribution's CPython (major.minor)
    qemu: str

    @property
    def sysroot(self) -> Path:
        # Named by its package list too: a changed list unpacks a new sysroot instead of reusing a stale one.
        packages = hashlib.sha256(",".join(SYSROOT_PACKAGES).encode()).hexdigest()[:8]
        return cache_dir() / "pjsua2" / f"sysroot-{SUITE}-{self.debian_arch}-{packages}"

    @property
    def python_include(self) -> Path:
        return self.sysroot / "usr" / "include" / f"python{self.python}"

    @property
    def ext_suffix(self) -> str:
        return f".cpython-{self.python.replace('.', '')}-{self.triplet}.so"

    @property
    def cxx(self) -> str:
        return f"{self.triplet}-g++"

    def configure_args(self) -> tuple[str, ...]:
        # pjproject's configure turns SSL off when cross-compiling unless given a prefix; the sysroot is the
        # prefix (its include/ and lib/ hold nothing, the headers and libraries come through --sysroot).
        return (f"--host={self.triplet}", f"--with-ssl={self.sysroot}")

    @property
    def cflags(self) -> str:
        return f"--sysroot={self.sysroot}"

    def build_env(self) -> dict[str, str]:
        """Link flags and pkg-config settings that point configure and every link at the sysroot."""
        lib = self.sysroot / "usr" / "lib" / self.triplet / "pkgconfig"
        return {"LDFLAGS": f"--sysroot={self.sysroot}",
                "PKG_CONFIG_LIBDIR": f"{lib}:{self.sysroot / 'usr/share/pkgconfig'}",
                "PKG_CONFIG_SYSROOT_DIR": str(self.sysroot)}

    def python_env(self) -> dict[str, str]:
        """The environment of the sysroot's Python: ``--variant=extract`` runs no maintainer scripts, so the
        alternatives' links to BLAS and LAPACK (numpy's) are missing; the loader is pointed at them instead."""
        lib = f"/usr/lib/{self.triplet}"
        return {"LD_LIBRARY_PATH": f"{lib}/blas:{lib}/lapack", "LC_ALL": "C.UTF-8"}

    def python_argv(self) -> list[str]:
        """The sysroot's own Python, run under qemu-user (for checking the built binding)."""
        qemu = shutil.which(self.qemu)
        if qemu is None:
            raise SipError(f"{self.qemu} is missing: sudo apt-get install -y qemu-user-static (or run `make deps`)")
        return [qemu, "-L", str(self.sysroot), str(self.sysroot / "usr" / "bin" / f"python{self.python}")]


CROSS = {"aarch64": Cross("aarch64", "aarch64-linux-gnu", "arm64", "3.11", "qemu-aarch64-static")}


def ensure_sysroot(cross: Cross, say: Callable[[str], None]) -> Path:
    """The cached sysroot for ``cross``, unpacked first if missing (locked: two builders unpack it once)."""
    root = cross.sysroot
    mark = root / "usr" / "include" / f"python{cross.python}" / "Python.h"
    if mark.is_file():
        return root
    if shutil.which("mmdebstrap") is None:
        raise SipError("mmdebstrap is missing: sudo apt-get install -y mmdebstrap (or run `make deps`)")
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / (root.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if mark.is_file():
            return root
        say(f"pjsua2: unpacking Debian {SUITE}'s {cross.debian_arch} packages into {root} (once)...")
        building = Path(tempfile.mkdtemp(prefix=root.name + ".building-", dir=root.parent))
        argv = ["mmdebstrap", "--variant=extract", f"--architectures={cross.debian_arch}",
                f"--include={','.join(SYSROOT_PACKAGES)}", SUITE, str(building)]
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, check=False)
            if done.returncode != 0 or not (building / mark.relative_to(root)).is_file():
                tail = "\n".join(done.stdout.splitlines()[-20:])
                raise SipError(f"unpacking the {cross.debian_arch} sysroot failed (exit {done.returncode}):\n{tail}")
            building.chmod(0o755)
            if root.exists():
                shutil.rmtree(root)
            building.rename(root)
        finally:
            shutil.rmtree(building, ignore_errors=True)
    return root
