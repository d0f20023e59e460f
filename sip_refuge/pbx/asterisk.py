"""Find (or build) a real Asterisk and run it on loopback with a site's rendered sandbox config.

Debian 12 has no Asterisk package, so on a machine without ``asterisk`` on PATH we keep a Debian-unstable
root folder in the user's cache and run its binary through that root's own dynamic loader: no chroot and no
root needed at run time (see ``notes/platform.md``). Tests and ``sip-refuge pbx`` both use :class:`Asterisk`.
"""

from __future__ import annotations

import atexit
import configparser
import fcntl
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import IO

from sip_refuge.config.model import PRIMARY, Site
from sip_refuge.errors import PbxError

log = logging.getLogger(__name__)

PACKAGES = "asterisk,asterisk-modules,asterisk-config"
# The dated package mirror's sid Release file has expired; without this apt refuses it.
APT_OPTION = 'Acquire::Check-Valid-Until "false"'
LIBDIRS = ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu")
LOADER = "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
MODULES = "usr/lib/x86_64-linux-gnu/asterisk/modules"
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the closing NUL


def cache_dir() -> Path:
    return Path(os.environ.get("SIP_REFUGE_CACHE") or Path.home() / ".cache" / "sip-refuge")


def site_workdir(site_file: Path, role: str = PRIMARY) -> Path:
    """The fixed work folder of ``sip-refuge pbx`` for one site file and PBX role (config, secrets, logs,
    control socket).

    Named by the stem, for the reader, and a hash of the full resolved path, so two ``site.yaml`` files in
    different folders never share rendered secrets or a control socket; the secondary of a pair has a folder
    of its own beside the primary's (``...-secondary``), so both run at once.
    """
    resolved = str(Path(site_file).resolve())
    digest = hashlib.sha256(os.fsencode(resolved)).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(resolved).stem)[:24] or "site"
    return cache_dir() / "pbx" / (f"{stem}-{digest}" + ("" if role == PRIMARY else f"-{role}"))


def lock_workdir(workdir: Path) -> IO[bytes]:
    """Hold ``workdir`` for this process (until the returned file is closed); refuse a second user."""
    workdir.mkdir(parents=True, exist_ok=True)
    handle = open(workdir / "pbx.lock", "wb")  # held open for as long as Asterisk runs
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise PbxError(f"another `sip-refuge pbx` is running this site already (work folder {workdir})") from None
    return handle


@dataclass(frozen=True)
class Installation:
    """How to start one Asterisk binary, and where its modules and data files are."""

    binary: Path
    modules: Path
    data: Path
    root: Path | None = None  # the Debian root folder, or None for a host-installed Asterisk

    def argv(self, *args: str) -> list[str]:
        if self.root is None:
            return [str(self.binary), *args]
        # The root's libc is newer than the host's: its own loader with its own library path runs it.
        libs = ":".join(str(self.root / d) for d in LIBDIRS)
        return [str(self.root / LOADER), "--library-path", libs, str(self.binary), *args]

    def version(self) -> str:
        out = subprocess.run(self.argv("-V"), capture_output=True, text=True, timeout=30, check=False)
        return out.stdout.strip() or out.stderr.strip()


def _host_installation(binary: Path) -> Installation:
    """A PBX host's own Asterisk: its module and data dirs come from its asterisk.conf when it has one."""
    dirs = {"astmoddir": "", "astdatadir": ""}
    conf = Path("/etc/asterisk/asterisk.conf")
    if conf.is_file():
        parser = configparser.ConfigParser(delimiters=("=>", "="), strict=False, interpolation=None,
                                           inline_comment_prefixes=(";",))
        try:
            parser.read_string(conf.read_text(encoding="utf-8", errors="replace"))
            if parser.has_section("directories"):
                dirs.update({k: v.strip() for k, v in parser["directories"].items() if k in dirs})
        except configparser.Error:
            log.debug("cannot parse %s; guessing module and data dirs", conf)
    guesses = [Path("/usr/lib/x86_64-linux-gnu/asterisk/modules"), Path("/usr/lib64/asterisk/modules"),
               Path("/usr/lib/asterisk/modules")]
    modules = Path(dirs["astmoddir"]) if dirs["astmoddir"] else next((g for g in guesses if g.is_dir()), guesses[-1])
    data = Path(dirs["astdatadir"] or "/usr/share/asterisk")
    return Installation(binary, modules, data)


def root_installation(root: Path) -> Installation:
    return Installation(root / "usr/sbin/asterisk", root / MODULES, root / "usr/share/asterisk", root)


def find_asterisk(*, build: bool = True, progress: Callable[[str], None] | None = None) -> Installation:
    """``asterisk`` on PATH, else the cached Debian root folder (built on first use when ``build``)."""
    on_path = shutil.which("asterisk")
    if on_path:
        return _host_installation(Path(on_path))
    root = cache_dir() / "asterisk-root"
    if not (root / "usr/sbin/asterisk").is_file():
        if not build:
            raise PbxError(f"no asterisk on PATH and no Asterisk root folder at {root}; run `make asterisk`")
        build_root(root, progress or _stderr)
    return root_installation(root)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_root(root: Path, progress: Callable[[str], None]) -> None:
    """Build the Debian-unstable root folder with mmdebstrap, atomically and once even if two run at once."""
    if shutil.which("mmdebstrap") is None:
        raise PbxError("no asterisk on PATH and mmdebstrap is missing: `apt-get install -y mmdebstrap` "
                       "(or install Asterisk 22) and try again")
    if os.geteuid() != 0:
        raise PbxError(f"building the Asterisk root folder {root} needs root (mmdebstrap): run `sudo make asterisk` "
                       "once, or install Asterisk 22")
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / (root.name + ".lock"), "w") as lock:
        # Another builder may hold the lock; when it finishes, the folder is there and we are done.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / "usr/sbin/asterisk").is_file():
            return
        building = Path(tempfile.mkdtemp(prefix=root.name + ".building-", dir=root.parent))
        progress(f"building Asterisk root folder {root} with mmdebstrap (about 30 s and 340 MB, once)...")
        argv = ["mmdebstrap", "--variant=apt", f"--aptopt={APT_OPTION}", f"--include={PACKAGES}", "sid", str(building)]
        try:
            done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
            if done.returncode != 0 or not (building / "usr/sbin/asterisk").is_file():
                tail = "\n".join(done.stdout.splitlines()[-15:])
                raise PbxError(f"mmdebstrap failed (exit {done.returncode}):\n{tail}")
            # mkdtemp made it 0700; under `sudo` the cache may be a user's, who must be able to run it.
            building.chmod(0o755)
            if root.exists():  # a half-built leftover of an older layout; the lock says nobody uses it
                shutil.rmtree(root)
            building.rename(root)
        finally:
            if building.exists():
                shutil.rmtree(building, ignore_errors=True)
    progress(f"Asterisk root folder ready: {root}")


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on ``host`` right now (SIP may use either)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port: int = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((host, port))
                except OSError:
                    continue
                return port


def on_free_ports(site: Site) -> Site:
    """The site with SIP, TLS, AMI and RTP moved to free loopback ports.

    ``asterisk check`` validates the config, not the ports: on a PBX host the production Asterisk already
    holds 5060 and 5038, and the check must neither fail on that nor disturb it.
    """
    pbx = site.pbx
    rtp = free_port()
    # A secondary is checked alone, on loopback like the primary: it keeps its role, not its address.
    secondary = "127.0.0.2" if pbx.secondary_host else None
    return replace(site, pbx=replace(
        pbx, host="127.0.0.1", bind="127.0.0.1", sip_port=free_port(), secondary_host=secondary,
        ami=replace(pbx.ami, host="127.0.0.1", port=free_port(), secondary_host="127.0.0.1" if secondary else None),
        tls=replace(pbx.tls, port=free_port()) if pbx.tls else None,
        rtp_start=rtp - rtp % 2, rtp_end=rtp - rtp % 2 + 20))


_running: weakref.WeakSet[Asterisk] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    # A run that ends without closing its instances (an exception escaping a script, Ctrl-C in pytest)
    # must still not leave an Asterisk behind holding ports.
    for pbx in list(_running):
        pbx.stop()


class Asterisk:
    """One Asterisk process on loopback, running the site's rendered sandbox config.

    Use as a context manager. Each instance has its own temporary directory (config, sockets, logs), so
    several run at once as long as their sites use different ports.
    """

    def __init__(self, site: Site, *, command: str = "sip-refuge pbx", templates: Path | None = None,
                 workdir: Path | None = None, install: Installation | None = None, console: bool = False,
                 boot_timeout: float = 60.0, role: str = PRIMARY) -> None:
        """``role``: which PBX of the site's pair this is (``secondary``: bound to ``pbx.secondary_host``)."""
        self.site, self.command, self.templates, self.role = site, command, templates, role
        self.install = install or find_asterisk()
        self.boot_timeout = boot_timeout
        self.console = console  # True: Asterisk's console output goes to our stdout (``sip-refuge pbx``)
        self._own_dir = workdir is None
        self.dir = Path(tempfile.mkdtemp(prefix="sip-refuge-ast-")) if workdir is None else workdir
        self.files: dict[str, str] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._output_offset = 0

    # -- paths ------------------------------------------------------------------------------------------
    @property
    def conf(self) -> Path:
        return self.dir / "etc" / "asterisk.conf"

    @property
    def messages_log(self) -> Path:
        return self.dir / "log" / "messages.log"

    @property
    def security_log(self) -> Path:
        return self.dir / "log" / "security.log"

    @property
    def output_file(self) -> Path:
        """Asterisk's console output (start-up messages that come before the logger is up, too)."""
        return self.dir / "console.log"

    def attach_command(self) -> str:
        return " ".join(self.install.argv("-C", str(self.conf), "-r"))

    def output(self) -> str:
        """Console output of the current run (empty when it goes to our stdout)."""
        try:
            with open(self.output_file, "rb") as f:
                f.seek(self._output_offset)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    # -- life cycle -------------------------------------------------------------------------------------
    def render(self) -> None:
        # Imported here: the renderer pulls in Jinja2, which a plain `find_asterisk()` does not need.
        from sip_refuge.pbx.render import SandboxDirs, render_sandbox, write

        d = self.dir
        dirs = SandboxDirs(etc=d / "etc", modules=self.install.modules, data=self.install.data, run=d / "run",
                           log=d / "log", spool=d / "spool", lib=d / "lib", db=d / "db", keys=d / "keys")
        socket_path = os.fsencode(dirs.run / "asterisk.ctl")
        if len(socket_path) > MAX_SOCKET_PATH:
            raise PbxError(f"the work folder {d} is too deep: Asterisk's control socket path would be "
                           f"{len(socket_path)} bytes (at most {MAX_SOCKET_PATH}); set SIP_REFUGE_CACHE to a shorter folder")
        for path in (dirs.etc, dirs.run, dirs.log, dirs.spool, dirs.lib, dirs.db, dirs.keys):
            path.mkdir(parents=True, exist_ok=True)
        self.files = render_sandbox(self.site, dirs, command=self.command, templates=self.templates, role=self.role)
        write(self.files, dirs.etc)

    def start(self) -> None:
        if self.running:
            raise PbxError("Asterisk is already running")
        self.render()
        # -f: stay in the foreground so we own the process; -n: no colours in the captured output;
        # -q: no verbose chatter; -g: core dump on a crash, for the rare bug report.
        argv = self.install.argv("-C", str(self.conf), "-f", "-n", "-q", "-g")
        if self.console:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
        else:
            self._output_offset = self.output_file.stat().st_size if self.output_file.exists() else 0
            with open(self.output_file, "ab") as out:
                # Own session: Ctrl-C in a terminal reaches us, and we stop Asterisk in order.
                self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                              start_new_session=True)
        _running.add(self)
        try:
            self._wait_booted()
        except BaseException:
            self.stop()
            raise
        log.info("Asterisk %d running with %s", self._proc.pid, self.conf)

    def _wait_booted(self) -> None:
        deadline = time.monotonic() + self.boot_timeout
        last = ""
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise PbxError(f"Asterisk exited with status {self._proc.returncode} while starting:\n"
                               + self._tail())
            try:
                # Before the control socket exists this fails at once ("Unable to connect").
                done = subprocess.run(self.install.argv("-C", str(self.conf), "-rx", "core waitfullybooted"),
                                      capture_output=True, text=True, timeout=max(1.0, deadline - time.monotonic()),
                                      check=False)
                if done.returncode == 0 and "fully booted" in done.stdout:
                    return
                last = (done.stdout + done.stderr).strip()
            except subprocess.TimeoutExpired:
                last = "core waitfullybooted timed out"
            time.sleep(0.05)
        raise PbxError(f"Asterisk did not finish booting within {self.boot_timeout:.0f} s ({last}):\n" + self._tail())

    def _tail(self, lines: int = 25) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def wait(self) -> int:
        """Block until Asterisk exits (``sip-refuge pbx``)."""
        if self._proc is None:
            return 0
        return self._proc.wait()

    def cli(self, command: str, *, timeout: float = 15.0) -> str:
        """Run one CLI command through Asterisk's control socket and return its output."""
        if not self.running:
            raise PbxError(f"Asterisk is not running (asked: {command})")
        try:
            done = subprocess.run(self.install.argv("-C", str(self.conf), "-rx", command), capture_output=True,
                                  text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise PbxError(f"Asterisk CLI command {command!r} timed out after {timeout:.0f} s") from None
        if done.returncode != 0:
            raise PbxError(f"Asterisk CLI command {command!r} failed: {(done.stdout + done.stderr).strip()}")
        return done.stdout

    def stop(self, *, timeout: float = 10.0) -> None:
        """``core stop now``; if Asterisk does not go, SIGTERM then SIGKILL its process group."""
        proc, self._proc = self._proc, None
        _running.discard(self)
        if proc is None:
            return
        if proc.poll() is None:
            try:
                subprocess.run(self.install.argv("-C", str(self.conf), "-rx", "core stop now"),
                               capture_output=True, timeout=timeout, check=False)
            except subprocess.TimeoutExpired:
                log.warning("Asterisk %d ignored `core stop now`", proc.pid)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                # Never leave a stray Asterisk holding our ports: escalate until it is gone.
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    log.warning("Asterisk %d still running; sending %s", proc.pid, sig.name)
                    try:
                        os.killpg(proc.pid, sig)
                        proc.wait(timeout=timeout / 2)
                        break
                    except ProcessLookupError:
                        break
                    except subprocess.TimeoutExpired:
                        continue
        proc.wait()
        log.info("Asterisk %d stopped (status %s)", proc.pid, proc.returncode)

    def restart(self) -> None:
        """Stop and start again with a freshly rendered config; logs and the work dir are kept."""
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Asterisk:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def main() -> int:
    """``python -m sip_refuge.pbx.asterisk``: find or build Asterisk and print its version (`make asterisk`)."""
    install = find_asterisk()
    print(f"{install.version()} ({install.binary})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
