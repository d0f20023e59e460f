"""Python 3.13 and later for a post: Debian unstable's python3 (3.14 at the archive's snapshot of 2026-12) in a root
folder, as the Asterisk root is built, with this project installed in a venv inside it (Raspberry Pi OS and Debian
13 have 3.13; 3.13 removed ``audioop``).

    root = python_root()            # mmdebstrap once (about 60 s), cached beside the Asterisk root
    venv = install_project(root)    # the project's current files into /opt/venv (pip, from the package index)
    run_in(root, ["/opt/venv/bin/sip-refuge", ...])

The root gets Debian's numpy and python3-alsaaudio (the venv sees them through ``--system-site-packages``: nothing
to compile) and libspeexdsp1; pip installs the rest, ``audioop-lts`` included, as a post would. Programs run in
it with ``chroot``: they share this machine's network, so a post there reaches an Asterisk on loopback.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from sip_refuge.pbx.asterisk import APT_OPTION, cache_dir

PACKAGES = "python3,python3-venv,python3-numpy,python3-alsaaudio,libspeexdsp1,ca-certificates"
REPO = Path(__file__).resolve().parents[2]
VENV = "/opt/venv"
SOURCE = "/opt/sip-refuge"


def python_root() -> Path:
    """The cached Debian-unstable root with Python 3.13 or later; built (as root) the first time."""
    root = cache_dir() / "python-root"
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / "python-root.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / "usr/bin/python3").exists():
            return root
        if os.geteuid() != 0 or shutil.which("mmdebstrap") is None:
            raise RuntimeError("building the Python 3.13 root needs root and mmdebstrap (make deps)")
        building = Path(tempfile.mkdtemp(prefix="python-root.building-", dir=root.parent))
        try:
            done = subprocess.run(["mmdebstrap", "--variant=apt", f"--aptopt={APT_OPTION}",
                                   f"--include={PACKAGES}", "sid", str(building)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError("mmdebstrap failed:\n" + "\n".join(done.stdout.splitlines()[-15:]))
            building.chmod(0o755)
            building.rename(root)
        finally:
            if building.exists():
                shutil.rmtree(building, ignore_errors=True)
    return root


def run_in(root: Path, argv: list[str], *, timeout: float = 600, check: bool = True,
           **kwargs: object) -> subprocess.CompletedProcess[str]:
    """``argv`` inside the root (chroot). This machine's name server, hosts and certificate authorities go in
    first (the package index may be reached through a proxy whose authority only this machine knows)."""
    for name in ("resolv.conf", "hosts"):
        if Path("/etc", name).exists():
            shutil.copyfile(Path("/etc", name), root / "etc" / name)
    env = dict(os.environ)
    authorities = Path(os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt")
    if authorities.is_file():
        shutil.copyfile(authorities, root / "opt" / "host-ca.crt")
        env.update(PIP_CERT="/opt/host-ca.crt", SSL_CERT_FILE="/opt/host-ca.crt")
    done = subprocess.run(["chroot", str(root), *argv], capture_output=True, text=True, timeout=timeout,
                          check=False, env=env, **kwargs)  # type: ignore[call-overload]
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return done  # type: ignore[no-any-return]


def python_version(root: Path) -> tuple[int, int]:
    out = run_in(root, ["python3", "-c", "import sys; print(*sys.version_info[:2])"]).stdout.split()
    return int(out[0]), int(out[1])


def install_project(root: Path) -> Path:
    """This worktree's files (what git tracks, as they are now) installed into the root's venv."""
    source = root / SOURCE.lstrip("/")
    if source.exists():
        shutil.rmtree(source)
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        src = REPO / name
        if src.is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, source / name)
    if not (root / VENV.lstrip("/") / "bin/python").exists():
        run_in(root, ["python3", "-m", "venv", "--system-site-packages", VENV])
    run_in(root, [f"{VENV}/bin/pip", "install", "-q", "--disable-pip-version-check", SOURCE], timeout=900)
    return root / VENV.lstrip("/")
