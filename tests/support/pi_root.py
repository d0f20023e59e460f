"""An arm64 Debian 12 root folder, made to look like Raspberry Pi OS Lite, run under qemu-user: a Pi post in a test.

The cached root (``$SIP_REFUGE_CACHE/pi-root-arm64``, built once with mmdebstrap like the Asterisk root of
:mod:`sip_refuge.pbx.asterisk`: locked, built in a temporary folder, renamed into place) is Debian 12
(bookworm) for arm64 with what a fresh Raspberry Pi OS Lite image brings and the README relies on: python3,
sudo, systemd, the ``gpio`` group (raspberrypi-sys-mods makes it there) and a login user ``pi`` in the groups
Pi OS gives it, with password-less sudo (010_pi-nopasswd). Nothing of sip-refuge is in it: a test installs
sip-refuge the way README.md says.

Each test session works on its own copy (:class:`PiRoot`), so a step that breaks the root breaks only that
run. Every command runs through ``chroot`` in a mount namespace of its own (``unshare --mount``), where
``/proc`` and ``/dev`` are mounted for it: when the command ends, its mounts are gone too; nothing stays
mounted on the host.

The host needs root, mmdebstrap, qemu-user-static and binfmt_misc (``ensure_binfmt`` registers qemu-aarch64
when it is missing; platform.md). The registration carries the ``C`` flag (credentials from the binary, not
the interpreter): without it a set-uid arm64 ``sudo`` runs without privileges, and the README's steps run as
the login user with sudo, as on a Pi.
"""

from __future__ import annotations

import fcntl
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from sip_refuge.pbx.asterisk import cache_dir

SUITE = "bookworm"
# What Raspberry Pi OS Lite has and README.md's Pi section takes for granted.
PACKAGES = "python3,sudo,systemd,systemd-sysv,ca-certificates,iproute2"
LOGIN_USER = "pi"
# The groups Raspberry Pi OS gives its first user; those Debian lacks (gpio, i2c, spi, netdev and, without
# udev running, input) are made as raspberrypi-sys-mods and Pi OS's other packages make them.
LOGIN_GROUPS = "adm,dialout,cdrom,sudo,audio,video,plugdev,games,users,input,netdev,gpio,i2c,spi"
CUSTOMIZE = (
    f'for g in $(echo {LOGIN_GROUPS} | tr , " "); do chroot "$1" getent group "$g" >/dev/null '
    '|| chroot "$1" groupadd --system "$g"; done',
    f'chroot "$1" useradd --create-home --shell /bin/bash --groups {LOGIN_GROUPS} {LOGIN_USER}',
    f'echo "{LOGIN_USER} ALL=(ALL) NOPASSWD: ALL" > "$1/etc/sudoers.d/010_pi-nopasswd"',
    'chmod 0440 "$1/etc/sudoers.d/010_pi-nopasswd"',
    'echo refuge-post > "$1/etc/hostname"',
    'printf "127.0.0.1 localhost\\n127.0.1.1 refuge-post\\n" > "$1/etc/hosts"',
)
BINFMT = Path("/proc/sys/fs/binfmt_misc")
QEMU_CONF = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")
MARK = "usr/bin/python3"  # a finished root has it; a half-built one may not


class PiRootError(RuntimeError):
    """The emulated Pi cannot be set up on this machine; the message says what to install or run."""


def pi_root_dir() -> Path:
    return cache_dir() / "pi-root-arm64"


def ensure_binfmt() -> None:
    """Make arm64 binaries run through qemu-user-static, with set-uid working (the ``C`` flag)."""
    if os.geteuid() != 0:
        raise PiRootError("the emulated Raspberry Pi needs root (chroot, mounts, binfmt_misc)")
    if not QEMU_CONF.is_file():
        raise PiRootError(f"{QEMU_CONF} is missing: apt-get install -y qemu-user-static (make deps)")
    if not (BINFMT / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], check=True)
    entry = BINFMT / "qemu-aarch64"
    if entry.exists():
        flags = next((line.split(":", 1)[1].strip() for line in entry.read_text().splitlines()
                      if line.startswith("flags:")), "")
        if "C" in flags:
            return
        # Registered without C (Debian's default): a set-uid sudo would not work. Replace it; the
        # interpreter and magic stay the same, so other arm64 users of this machine see no difference.
        entry.write_text("-1")
    line = QEMU_CONF.read_text().strip()
    name, kind, offset, magic, mask, interpreter, flags = line.lstrip(":").split(":")
    flags = "".join(sorted(set(flags) | {"C", "O"}))  # C needs O (the kernel opens the binary)
    (BINFMT / "register").write_text(":".join(["", name, kind, offset, magic, mask, interpreter, flags]))


def build_pi_root(root: Path, progress: Callable[[str], None]) -> None:
    """mmdebstrap the root into a temporary folder and rename it into place, once even if two build at once."""
    if shutil.which("mmdebstrap") is None:
        raise PiRootError("mmdebstrap is missing: apt-get install -y mmdebstrap (make deps)")
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / (root.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / MARK).is_file():
            return
        building = Path(tempfile.mkdtemp(prefix=root.name + ".building-", dir=root.parent))
        progress(f"building the arm64 Raspberry Pi root {root} with mmdebstrap under qemu (minutes, once)...")
        argv = ["mmdebstrap", "--variant=apt", "--architectures=arm64", f"--include={PACKAGES}",
                *(f"--customize-hook={hook}" for hook in CUSTOMIZE), SUITE, str(building)]
        try:
            done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
            if done.returncode != 0 or not (building / MARK).is_file():
                tail = "\n".join(done.stdout.splitlines()[-20:])
                raise PiRootError(f"mmdebstrap of the arm64 root failed (exit {done.returncode}):\n{tail}")
            building.chmod(0o755)
            if root.exists():
                shutil.rmtree(root)
            building.rename(root)
        finally:
            if building.exists():
                shutil.rmtree(building, ignore_errors=True)


def cached_pi_root(progress: Callable[[str], None] = lambda message: None) -> Path:
    """The cached arm64 root, built on first use."""
    ensure_binfmt()
    root = pi_root_dir()
    if not (root / MARK).is_file():
        build_pi_root(root, progress)
    return root


class PiRoot:
    """One test session's copy of the cached root; :meth:`run` and :meth:`popen` run commands inside it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def copy_of_cache(cls, where: Path) -> PiRoot:
        source = cached_pi_root()
        target = where / "root"
        # -a keeps owners, modes, links and the set-uid bit of sudo; reflinks make it instant where supported.
        subprocess.run(["cp", "-a", "--reflink=auto", str(source), str(target)], check=True)
        # The Pi's own network settings: name server, and the CAs this network's HTTPS proxy needs (if any).
        shutil.copyfile("/etc/resolv.conf", target / "etc/resolv.conf")
        shutil.copyfile("/etc/ssl/certs/ca-certificates.crt", target / "etc/host-network-ca.crt")
        # systemd is installed but not running (a chroot): systemctl then enables units and skips starting
        # them. It tells so by itself where it can see it is in a chroot; this machine's sandbox hides /proc/1
        # from it, so say it, and let sudo pass the word on.
        keep = target / "etc/sudoers.d/020_systemd-offline"
        keep.write_text('Defaults env_keep += "SYSTEMD_OFFLINE"\n')
        keep.chmod(0o440)
        return cls(target)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def host_path(self, inside: str) -> Path:
        return self.path / inside.lstrip("/")

    def argv(self, command: Sequence[str], *, user: str | None = None, cwd: str = "/",
             env: Mapping[str, str] | None = None, groups: Sequence[str] = ()) -> list[str]:
        """The host argv that runs ``command`` in the root as ``user`` (default root) in ``cwd``, with
        exactly ``env`` plus PATH, HOME, USER and LOGNAME (nothing of the host's environment leaks in)."""
        home = "/root" if user in (None, "root") else self._home(user or "root")
        environment = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": home,
                       "USER": user or "root", "LOGNAME": user or "root", "LANG": "C.UTF-8",
                       "SYSTEMD_OFFLINE": "1", **(env or {})}
        inner = ["env", "-i", *(f"{k}={v}" for k, v in environment.items()), *command]
        if user not in (None, "root"):
            # setpriv: the user's uid, gid and supplementary groups, as a login would give (plus ``groups``).
            inner = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *inner] if not groups else \
                ["setpriv", f"--reuid={user}", f"--regid={user}", f"--groups={','.join(groups)}", *inner]
        root = shlex.quote(str(self.path))
        hostname = shlex.quote(self.host_path("/etc/hostname").read_text().strip())
        # Its own host name too (a UTS namespace), as the Pi has: sudo looks it up in the root's /etc/hosts.
        script = (f"hostname {hostname} && mount -t proc proc {root}/proc && mount --rbind /dev {root}/dev && "
                  f"mount -t sysfs sysfs {root}/sys && "
                  f"exec chroot {root} sh -c "
                  + shlex.quote(f"cd {shlex.quote(cwd)} && exec " + shlex.join(inner)))
        return ["unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c", script]

    def _home(self, user: str) -> str:
        for line in self.host_path("/etc/passwd").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == user:
                return fields[5]
        raise PiRootError(f"no user {user!r} in the root")

    def run(self, command: Sequence[str], *, user: str | None = None, cwd: str = "/",
            env: Mapping[str, str] | None = None, input: str | None = None, timeout: float = 600.0,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``command`` in the root and wait; ``check`` fails with its output on a non-zero exit."""
        started = time.monotonic()
        done = subprocess.run(self.argv(command, user=user, cwd=cwd, env=env), input=input, capture_output=True,
                              text=True, timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"in the Pi root, {shlex.join(command)} (as {user or 'root'}, in {cwd}) exited "
                                 f"{done.returncode} after {time.monotonic() - started:.0f} s:\n"
                                 f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
        return done

    def popen(self, command: Sequence[str], *, log: Path, user: str | None = None, cwd: str = "/",
              env: Mapping[str, str] | None = None, groups: Sequence[str] = ()) -> subprocess.Popen[bytes]:
        """Start ``command`` in the root, its output into ``log``; in its own session, so it can be signalled."""
        with open(log, "ab") as out:
            return subprocess.Popen(self.argv(command, user=user, cwd=cwd, env=env, groups=groups),
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)


def main() -> int:
    """``python -m tests.support.pi_root`` (``make pi-root``): build the cached root now and say where it is."""
    started = time.monotonic()
    try:
        root = cached_pi_root(lambda message: print(message, flush=True))
    except PiRootError as exc:
        print(f"pi-root: {exc}", file=sys.stderr)
        return 2
    print(f"arm64 Raspberry Pi root ready ({time.monotonic() - started:.0f} s): {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
