"""Build the official pjsua2 Python binding (SWIG) from pjproject source, once, and cache the wheel.

``python -m sip_refuge.post.sip.pjsua2_build`` prints the path of a wheel for the running Python and machine
(``make venv`` installs it). The first run builds it (about 4 minutes on 2 cores); later runs find it in
``<cache>/pjsua2/<key>/`` in well under a second. The key names the pjproject version, this recipe, the
Python ABI and the platform, so a Raspberry Pi running the same command builds its own natively.
``--target aarch64`` cross-compiles on a PC the wheel for a Raspberry Pi (Debian 12's Python 3.11, arm64):
:mod:`sip_refuge.post.sip.pjsua2_cross` holds what that adds (the arm64 sysroot, the check under qemu).

Source: Debian unstable's ``asterisk`` source package carries pjproject as the component tarball
``*.orig-Xpjproject.tar.xz``, fetched with ``apt-get source`` through a private sources list (signature
checked with Debian's keyring) pointing at the mirror this machine's apt already uses. Debian's dfsg repack
removed parts of ``third_party``; the recipe replaces them (see :data:`CONFIGURE`): libsrtp2, speex and
speexdsp (echo canceller, resampler) come from Debian's packages; webrtc's AEC, libyuv (video), GSM, iLBC,
G.722.1 and the non-free bdimad sound driver are left out (the last one by the same Makefile edit as
Debian's own ``2014_pjproject_unbreak.patch``). G.722 and G.711 are pjmedia's own; Opus and OpenSSL 3 are
Debian's.

``-DNDEBUG``: pjlib then logs a failed ``pj_assert`` instead of aborting, and ``PJ_ASSERT_RETURN`` returns an
error that the binding raises as ``pjsua2.Error``: a bad call must not take an emergency post down.

"""

from __future__ import annotations

import argparse
import base64
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sip_refuge.errors import SipError
from sip_refuge.pbx.asterisk import cache_dir
from sip_refuge.post.sip.pjsua2_cross import CROSS, HOST_PACKAGES, Cross, ensure_sysroot

MODULE = "sip_refuge.post.sip.pjsua2_build"  # also when run as __main__
PJPROJECT = "2.17"  # the version the backend is tested with; a different one in Debian's source is an error
SOURCE_PACKAGE = "asterisk"
COMPONENT = "orig-Xpjproject.tar.xz"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
# Debian packages the build needs (the Makefile's deps list carries them too; a unit test keeps both equal).
BUILD_PACKAGES = ("build-essential", "swig", "xz-utils", "python3-dev", "libssl-dev", "libopus-dev",
                  "libsrtp2-dev", "libspeex-dev", "libspeexdsp-dev", "libasound2-dev")
CFLAGS = "-O2 -fPIC -DNDEBUG"  # -fPIC: the static libraries go into the Python extension
CONFIGURE = (
    "--with-external-srtp", "--with-external-speex", "--enable-speex-resample",  # replace dfsg-removed parts
    "--disable-libwebrtc", "--disable-libyuv", "--disable-gsm-codec", "--disable-ilbc-codec",
    "--disable-g7221-codec",  # dfsg-removed, not needed by a post
    "--disable-video", "--disable-sdl", "--disable-ffmpeg", "--disable-v4l2", "--disable-openh264",
    "--disable-vpx", "--disable-upnp", "--disable-opencore-amr", "--disable-silk", "--disable-bcg729",
    "--disable-lyra", "--disable-libuuid",  # a post has no video, no UPnP, no other codecs
)
# The SWIG wrapper is one 6.7 MB C++ file of glue: -O1 builds it in 60 % of -O2's time; pjsip's C code,
# where the SIP and media work happens, keeps -O2.
WRAPPER_CFLAGS = ("-O1", "-g0", "-fwrapv")
# Edits to the source: (file, text, replacement). The first follows dfsg (bdimad_dev.c is gone); the second
# keeps pjlib quiet (errors only) until libInit applies the post's log settings: otherwise every start
# prints six lines to stdout before the post can say anything.
PATCHES = (("pjmedia/build/Makefile", " bdimad_dev.o", ""),
           ("pjlib/src/pj/log.c", "static int pj_log_max_level = PJ_LOG_MAX_LEVEL;", "static int pj_log_max_level = 1;"))
# pjlib/include/pj/config_site.h. pjmedia follows the source address of incoming RTP after a few packets
# ("latching", for NAT); a post's RTP always comes from Asterisk (rtp_symmetric on the PBX side), so latching
# only lets a stranger on the post's network redirect the microphone to itself: off.
CONFIG_SITE = "#define PJMEDIA_TRANSPORT_SWITCH_REMOTE_ADDR 0\n"
RECIPE = json.dumps([PJPROJECT, CFLAGS, CONFIGURE, WRAPPER_CFLAGS, PATCHES, CONFIG_SITE, 1])
REQUIRED_CODECS = ("PCMU/8000", "G722/16000", "opus/48000")
REQUIRED_LIBS = ("libssl.so.3", "libopus.so.0", "libsrtp2.so.1", "libasound.so.2", "libspeexdsp.so.1")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Target:
    """The Python and machine the wheel is for: the running interpreter's, or another machine's (``cross``)."""

    python_tag: str  # cp311
    platform_tag: str  # linux_x86_64, linux_aarch64
    ext_suffix: str  # .cpython-311-x86_64-linux-gnu.so
    python_include: Path
    cxx: str = "g++"
    cross: Cross | None = None

    @classmethod
    def native(cls) -> Target:
        tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
        platform = re.sub(r"[-.]", "_", sysconfig.get_platform())
        return cls(tag, platform, str(sysconfig.get_config_var("EXT_SUFFIX")), Path(sysconfig.get_paths()["include"]),
                   os.environ.get("CXX", "g++"))

    @classmethod
    def for_machine(cls, machine: str) -> Target:
        """``native`` (the running Python), or a machine of :data:`CROSS` to cross-compile for."""
        if machine == "native":
            return cls.native()
        cross = CROSS[machine]
        return cls(f"cp{cross.python.replace('.', '')}", f"linux_{cross.machine}", cross.ext_suffix,
                   cross.python_include, cross.cxx, cross)

    @property
    def key(self) -> str:
        return f"pjproject-{PJPROJECT}-{recipe_id()}-{self.python_tag}-{self.platform_tag}"

    @property
    def version(self) -> str:
        """The wheel's version: pjproject's, with the recipe as a local label (pip reinstalls when it changes)."""
        return f"{PJPROJECT}+refuge.{recipe_id()}"

    @property
    def wheel_name(self) -> str:
        return f"pjsua2-{self.version}-{self.python_tag}-{self.python_tag}-{self.platform_tag}.whl"


def recipe_id() -> str:
    return hashlib.sha256(RECIPE.encode()).hexdigest()[:10]


def wheel_path(target: Target) -> Path:
    return cache_dir() / "pjsua2" / target.key / target.wheel_name


def ensure_wheel(target: Target | None = None, *, progress: Progress | None = None, rebuild: bool = False) -> Path:
    """The cached wheel for ``target`` (the running Python), built first if missing; safe to run twice at once."""
    target = target or Target.native()
    say = progress or _stderr
    wheel = wheel_path(target)
    if wheel.is_file() and not rebuild:
        say(f"pjsua2: cached wheel {wheel}")
        return wheel
    store = wheel.parent.parent
    store.mkdir(parents=True, exist_ok=True)
    with open(store / (target.key + ".lock"), "w") as lock:
        # Another builder may hold the lock; when it is done, its wheel is there and we are done too.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if wheel.is_file() and not rebuild:
            say(f"pjsua2: cached wheel {wheel} (built by another run)")
            return wheel
        # Cross-compiling, the -dev packages come from the sysroot: the PC needs only the tools.
        _check_packages((*BUILD_PACKAGES[:3], *HOST_PACKAGES) if target.cross else BUILD_PACKAGES)
        if target.cross:
            ensure_sysroot(target.cross, say)
        if not (target.python_include / "Python.h").is_file():
            raise SipError(f"no Python.h in {target.python_include}: install the Python headers "
                           "(Debian: sudo apt-get install -y python3-dev)")
        work = Path(tempfile.mkdtemp(prefix=target.key + ".building-", dir=store))
        try:
            started = time.monotonic()
            tree = unpack_source(fetch_source(store / "src", say), work / "src", say)
            built = build(tree, target, work / "out", say)
            check_binding(built.parent, say, target.cross)
            wheel_dir = work / "wheel"
            write_wheel(built.parent, wheel_dir / target.wheel_name, target)
            if wheel.parent.exists():  # an older build of the same key (--rebuild); the lock says nobody writes it
                shutil.rmtree(wheel.parent)
            wheel_dir.rename(wheel.parent)  # atomic: the key's folder appears with a complete wheel in it
            say(f"pjsua2: built in {time.monotonic() - started:.0f} s: {wheel}")
        except SipError as exc:
            logs = store / (target.key + ".logs")  # the build tree goes; its logs stay for the bug report
            shutil.rmtree(logs, ignore_errors=True)
            if (work / "out" / "logs").is_dir():
                (work / "out" / "logs").rename(logs)
                raise SipError(f"{exc}\n(build logs: {logs})") from None
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return wheel


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _check_packages(packages: Sequence[str]) -> None:
    if shutil.which("dpkg-query") is None:
        return  # not Debian: configure names what is missing
    out = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${Status}\n", *packages], capture_output=True,
                         text=True, check=False).stdout
    have = {line.split()[0] for line in out.splitlines() if line.endswith(" installed")}
    missing = [p for p in packages if p not in have]
    if missing:
        raise SipError(f"building pjsua2 needs Debian packages: sudo apt-get install -y {' '.join(missing)} "
                       "(or run `make deps`)")


# -- source -------------------------------------------------------------------------------------------
def debian_mirror(etc: Path = Path("/etc/apt")) -> str:
    """The Debian archive this machine's apt uses (read at run time; never written into the repo)."""
    override = os.environ.get("SIP_REFUGE_DEBIAN_MIRROR")
    if override:
        return override
    files = [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list")),
             *sorted((etc / "sources.list.d").glob("*.sources"))]
    for path in files:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        uris = re.findall(r"^\s*URIs:\s*(.+)$", text, re.M) if path.suffix == ".sources" else \
            [m.group(1) for m in re.finditer(r"^\s*deb(?:-src)?\s+(?:\[[^]]*\]\s+)?(\S+)", text, re.M)]
        for uri in (u for line in uris for u in line.split()):
            if uri.rstrip("/").endswith("/debian"):  # not debian-security, not a vendor's extra archive
                return uri.rstrip("/")
    raise SipError("no Debian mirror found in /etc/apt (set SIP_REFUGE_DEBIAN_MIRROR to one)")


def fetch_source(into: Path, say: Progress) -> Path:
    """Debian unstable's pjproject tarball (cached in ``into``), through apt with a private sources list."""
    into.mkdir(parents=True, exist_ok=True)
    cached = sorted(into.glob(f"{SOURCE_PACKAGE}_*.{COMPONENT}"))
    if cached:
        say(f"pjsua2: using cached source {cached[-1].name}")
        return cached[-1]
    say(f"pjsua2: fetching pjproject source (Debian unstable's {SOURCE_PACKAGE} source package, about 13 MB)...")
    with tempfile.TemporaryDirectory(prefix="apt-", dir=into) as tmp:
        apt = Path(tmp)
        for sub in ("lists/partial", "cache/archives/partial", "download"):
            (apt / sub).mkdir(parents=True)
        (apt / "sources.list").write_text(f"deb-src [signed-by={KEYRING}] {debian_mirror()} sid main\n",
                                          encoding="utf-8")
        options = [f"-oDir::Etc::SourceList={apt / 'sources.list'}", "-oDir::Etc::SourceParts=/dev/null",
                   f"-oDir::State::Lists={apt / 'lists'}", f"-oDir::Cache={apt / 'cache'}",
                   "-oAcquire::Check-Valid-Until=false"]  # the dated mirror's sid Release has expired
        if os.geteuid() == 0:  # _apt may not write into a root-owned cache folder
            options.append("-oAPT::Sandbox::User=root")
        _run(["apt-get", *options, "update"], apt, "apt-get update (Debian sid sources)")
        _run(["apt-get", *options, "source", "--download-only", SOURCE_PACKAGE], apt / "download",
             f"apt-get source {SOURCE_PACKAGE}")
        found = sorted((apt / "download").glob(f"*.{COMPONENT}"))
        if not found:
            raise SipError(f"Debian's {SOURCE_PACKAGE} source package has no {COMPONENT} component any more")
        target = into / found[-1].name
        found[-1].replace(target)
    return target


def unpack_source(tarball: Path, into: Path, say: Progress) -> Path:
    into.mkdir(parents=True)
    _run(["tar", "-xJf", str(tarball), "-C", str(into)], into, "unpack pjproject")
    tree = next(p for p in into.iterdir() if p.is_dir())
    version = dict(re.findall(r"export PJ_VERSION_(MAJOR|MINOR)\s*:=\s*(\d+)", (tree / "version.mak").read_text()))
    found = f"{version.get('MAJOR')}.{version.get('MINOR')}"
    if found != PJPROJECT:
        raise SipError(f"{tarball.name} carries pjproject {found}, but sip-refuge is tested with {PJPROJECT}: "
                       f"update PJPROJECT in {MODULE} and run the pjsua2 tests")
    for rel, text, replacement in PATCHES:
        path = tree / rel
        content = path.read_text(encoding="utf-8")
        if text not in content:
            raise SipError(f"pjproject {found}: {rel} no longer contains {text!r}; review PATCHES in {MODULE}")
        path.write_text(content.replace(text, replacement), encoding="utf-8")
    (tree / "pjlib/include/pj/config_site.h").write_text(CONFIG_SITE, encoding="utf-8")
    say(f"pjsua2: pjproject {found} unpacked ({tarball.name})")
    return tree


# -- build --------------------------------------------------------------------------------------------
def build(tree: Path, target: Target, out: Path, say: Progress) -> Path:
    """configure, the static libraries and the SWIG wrapper (in parallel), then link ``_pjsua2``."""
    logs = out / "logs"
    logs.mkdir(parents=True)
    cross = target.cross
    cflags = f"{CFLAGS} {cross.cflags}" if cross else CFLAGS
    env = {**os.environ, "CFLAGS": cflags, "CXXFLAGS": cflags, "LC_ALL": "C", **(cross.build_env() if cross else {})}
    configure = (*(cross.configure_args() if cross else ()), *CONFIGURE)
    say(f"pjsua2: configure {' '.join(configure)}")
    _run(["./configure", *configure], tree, "configure", env=env, log=logs / "configure.log")
    jobs = str(max(1, os.cpu_count() or 1))
    say(f"pjsua2: compiling pjproject and the SWIG wrapper (make -j{jobs} beside g++; about 4 min on 2 cores)...")
    swig_dir = tree / "pjsip-apps/src/swig/python"
    obj = out / "pjsua2_wrap.o"
    with open(logs / "make.log", "wb") as make_log:
        make = subprocess.Popen(["make", f"-j{jobs}", "lib"], cwd=tree, env=env, stdin=subprocess.DEVNULL,
                                stdout=make_log, stderr=subprocess.STDOUT, start_new_session=True)
        try:  # the wrapper needs only configure's headers: compile it while make builds the libraries
            _run(["make", "pjsua2_wrap.cpp"], swig_dir, "swig", env=env, log=logs / "swig.log")
            flags = _helper(swig_dir, "cflags", env)
            _run([target.cxx, "-c", "pjsua2_wrap.cpp", "-o", str(obj), "-fPIC", f"-I{target.python_include}",
                  *flags, *WRAPPER_CFLAGS], swig_dir, "compile pjsua2_wrap.cpp", env=env, log=logs / "wrapper.log")
        except BaseException:
            os.killpg(make.pid, signal.SIGTERM)  # make and the compilers it started
            raise
        finally:
            code = make.wait()
    if code != 0:
        raise SipError(f"pjproject `make lib` failed (exit {code}):\n{_tail(logs / 'make.log')}")
    stage = out / "stage"
    stage.mkdir()
    shutil.copy2(swig_dir / "pjsua2.py", stage / "pjsua2.py")
    module = stage / f"_pjsua2{target.ext_suffix}"
    libs = [f"-l{name}" for name in _helper(swig_dir, "libs", env)]
    say("pjsua2: linking _pjsua2")
    _run([target.cxx, "-shared", str(obj), "-o", str(module), *_helper(swig_dir, "ldflags", env), *libs],
         swig_dir, "link _pjsua2", env=env, log=logs / "link.log")
    needed = subprocess.run(["readelf", "-d", str(module)], capture_output=True, text=True, check=False).stdout
    missing = [lib for lib in REQUIRED_LIBS if f"[{lib}]" not in needed]
    if missing:
        summary = [line for line in (logs / "configure.log").read_text().splitlines()
                   if re.search(r"ssl|opus|srtp|alsa|sound|speex", line, re.I)]
        raise SipError(f"_pjsua2 does not link {', '.join(missing)}: configure left a feature out:\n"
                       + "\n".join(summary))
    return module


def _helper(swig_dir: Path, what: str, env: dict[str, str]) -> list[str]:
    """pjproject's own flags for a program using it (helper.mak, as its setup.py asks)."""
    out = _run(["make", "--no-print-directory", "-f", "helper.mak", what], swig_dir, f"helper.mak {what}", env=env)
    return [line for line in out.splitlines() if line.strip()]


def _run(argv: Sequence[str], cwd: Path, what: str, *, env: dict[str, str] | None = None,
         log: Path | None = None) -> str:
    done = subprocess.run(list(argv), cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, check=False)
    text = done.stdout.decode("utf-8", "replace")
    if log is not None:
        log.write_text(text, encoding="utf-8")
    if done.returncode != 0:
        tail = "\n".join(text.splitlines()[-20:])
        raise SipError(f"pjsua2 build: {what} failed (exit {done.returncode}):\n{tail}")
    return text


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


# -- check and package --------------------------------------------------------------------------------
def capabilities() -> dict[str, object]:
    """What the importable pjsua2 offers: version, codecs, TLS, SRTP suites, the event loop (own process)."""
    import pjsua2 as pj

    from sip_refuge.post.audio import prompt_path

    ep = pj.Endpoint()
    ep.libCreate()
    try:
        cfg = pj.EpConfig()
        cfg.uaConfig.threadCnt = 0
        cfg.uaConfig.mainThreadOnly = True
        cfg.logConfig.consoleLevel = cfg.logConfig.level = 0
        ep.libInit(cfg)
        ep.audDevManager().setNullDev()
        tcfg = pj.TransportConfig()
        tcfg.boundAddress = "127.0.0.1"
        try:
            tls = str(ep.transportGetInfo(ep.transportCreate(pj.PJSIP_TRANSPORT_TLS, tcfg)).typeName)
        except pj.Error as exc:
            tls = f"no: {exc.info()}"
        player = pj.AudioMediaPlayer()  # a shipped prompt: proves the WAV player a post could use in calls
        player.createPlayer(str(prompt_path("connecting")), pj.PJMEDIA_FILE_NO_LOOP)
        caps = {"version": str(ep.libVersion().full), "codecs": [str(c.codecId) for c in ep.codecEnum2()],
                "tls": tls, "srtp": [str(s) for s in ep.srtpCryptoEnum()], "player": player.getPortId() >= 0,
                "handle_events": hasattr(ep, "libHandleEvents"), "srtp_use": hasattr(pj.AccountMediaConfig(), "srtpUse")}
        del player  # before libDestroy
        return caps
    finally:
        ep.libDestroy()


def missing_features(caps: dict[str, object]) -> list[str]:
    codecs = [str(c) for c in caps.get("codecs", [])]  # type: ignore[attr-defined]
    gaps = [c for c in REQUIRED_CODECS if not any(x.startswith(c + "/") for x in codecs)]
    if caps.get("tls") != "TLS":
        gaps.append(f"TLS transport ({caps.get('tls')})")
    if not caps.get("srtp") or not caps.get("srtp_use"):
        gaps.append("SRTP")
    if not caps.get("handle_events"):
        gaps.append("Endpoint.libHandleEvents")
    return gaps


def check_binding(stage: Path, say: Progress, cross: Cross | None = None) -> None:
    """Import the freshly built binding in a child process and insist on what a post needs; a cross-built
    one in the target's own Python under qemu, with a copy of sip_refuge (pure Python) beside it."""
    if cross is None:
        python, path = [sys.executable], [str(stage), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ}
    else:
        package = Path(__file__).resolve().parents[2]
        shutil.copytree(package, stage.parent / "check" / package.name,
                        ignore=shutil.ignore_patterns("__pycache__"))
        python, path = cross.python_argv(), [str(stage), str(stage.parent / "check")]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **cross.python_env()}
    done = subprocess.run([*python, "-m", MODULE, "--capabilities"], capture_output=True, text=True, cwd=path[0],
                          env={**env, "PYTHONPATH": os.pathsep.join(path)}, timeout=300, check=False)
    lines = done.stdout.strip().splitlines()
    if not lines or not lines[-1].startswith("{"):
        raise SipError(f"the built pjsua2 does not import or start:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    caps = json.loads(lines[-1])
    gaps = missing_features(caps)
    if gaps:
        raise SipError(f"the built pjsua2 lacks: {', '.join(gaps)}")
    say(f"pjsua2: pjproject {caps['version']}: TLS, SRTP ({len(caps['srtp'])} suites), codecs "  # type: ignore[arg-type]
        f"{', '.join(caps['codecs'])}")  # type: ignore[arg-type]


def write_wheel(stage: Path, wheel: Path, target: Target) -> None:
    """A wheel of the staged files (pjsua2.py, _pjsua2*.so) with its dist-info and RECORD."""
    wheel.parent.mkdir(parents=True, exist_ok=True)
    info = f"pjsua2-{target.version}.dist-info"
    files = {p.name: p.read_bytes() for p in sorted(stage.iterdir()) if p.is_file()}
    files[f"{info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: pjsua2\nVersion: {target.version}\n"
        f"Summary: pjsua2, the SWIG Python binding of pjproject {PJPROJECT} (built by sip-refuge)\n"
        "License: GPL-2.0-or-later\n").encode()
    files[f"{info}/WHEEL"] = (f"Wheel-Version: 1.0\nGenerator: {MODULE}\nRoot-Is-Purelib: false\n"
                              f"Tag: {target.python_tag}-{target.python_tag}-{target.platform_tag}\n").encode()
    record = [f"{name},sha256={_digest(data)},{len(data)}" for name, data in files.items()]
    files[f"{info}/RECORD"] = ("\n".join([*record, f"{info}/RECORD,,"]) + "\n").encode()
    partial = wheel.with_suffix(".part")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0)), data, zipfile.ZIP_DEFLATED)
    partial.replace(wheel)


def _digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def main(argv: Sequence[str] | None = None) -> int:
    """Print the wheel's path (building it first if needed); ``--capabilities`` reports the installed binding."""
    parser = argparse.ArgumentParser(prog="python -m sip_refuge.post.sip.pjsua2_build", description=__doc__.split("\n")[0])
    parser.add_argument("--rebuild", action="store_true", help="build again even if a cached wheel exists")
    parser.add_argument("--target", choices=["native", *CROSS], default="native",
                        help="the machine the wheel is for: this one (default), or aarch64 (a Raspberry Pi's "
                             "Debian 12 Python 3.11) cross-compiled here")
    parser.add_argument("--capabilities", action="store_true",
                        help="print what the importable pjsua2 offers (JSON) and exit non-zero if a post needs more")
    args = parser.parse_args(argv)
    if args.capabilities:
        caps = capabilities()
        print(json.dumps(caps))
        return 1 if missing_features(caps) else 0
    try:
        print(ensure_wheel(Target.for_machine(args.target), rebuild=args.rebuild))
    except SipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
