"""A Raspberry Pi post, emulated: README.md's Pi section run as written in an arm64 root, then a real call.

The root (:mod:`tests.support.pi_root`) is Debian 12 for arm64 made to look like Raspberry Pi OS Lite: a
login user ``pi`` with sudo, the ``gpio`` group, systemd installed but not running (it is a chroot), and
nothing of sip-refuge. Every shell block of the README's section "Installing a post on a Raspberry Pi" runs
there, unchanged, as ``pi`` (``bash -euo pipefail``) in its home folder, with the two variables the README
asks for: ``POST`` and ``SIP_REFUGE_GIT`` (a git repository of this very checkout, working-tree changes
included, in pi's home). The control room's part (site file and this post's secret, brought to the Pi) is
played by the test, as the README says, and so is systemd's: in a chroot systemd is not running, so
``systemctl enable`` works and ``systemctl start`` does nothing (``SYSTEMD_OFFLINE=1``, which systemctl
would find out by itself outside this machine's sandbox); the test then starts the installed unit's
ExecStart the way systemd would (its User, groups,
WorkingDirectory, StateDirectory, Environment, sd_notify socket and watchdog), adding ``--gpio mock --audio
null``: qemu has no GPIO chip and no sound card.

The post then runs under qemu against the x86 Asterisk 22 of the test on loopback (the chroot shares the
host's network), with the mock sound card (``--audio-in``/``--audio-out`` in place of the unit's ``--audio``):
it registers, a press is queued and connected when a desk robot answers, caller and operator hear each other
(found by cross-correlation, as in ``test_post_speech.py``), digits cross both ways on the call, and the
acoustic self-test passes. Parametrised by SIP backend, one post of the site each (:data:`BACKENDS`). For the
pjsua2 post the test also plays the control room's part of the README's pjsua2 route: it brings the arm64
wheel that ``python -m sip_refuge.post.sip.pjsua2_build --target aarch64`` cross-compiled (cached; ``make``
builds it first) into pi's home, and the README block marked for pjsua2 posts installs it; a pyVoIP post
skips that block, as the README says.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from sip_refuge.config import Site, load_site
from sip_refuge.config.secrets import init_secrets
from sip_refuge.errors import RefugeError
from sip_refuge.pbx.asterisk import Asterisk, free_port, on_free_ports
from sip_refuge.post import speech
from sip_refuge.post.control import ask, control_port
from sip_refuge.post.sip.pjsua2_build import Target, ensure_wheel
from tests.support.audio import babble, read_wav, wav_seconds, write_wav
from tests.support.checkout import git_snapshot
from tests.support.desk_robot import DeskRobot
from tests.support.pi_root import LOGIN_USER, PiRoot
from tests.support.sites import rtp_range
from tests.support.units import NotifySocket, Unit, start_unit
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config" / "site.example.yaml"
SECTION = "## Installing a post on a Raspberry Pi"
# SIP backend -> the example site's post that uses it in the emulated Pi.
BACKENDS = {"pjsua2": "sutton-market", "pyvoip": "idlewells"}
# The first line of the README's block that only a pjsua2 post runs.
PJSUA2_ONLY = "# pjsua2 posts only"
HEARD = 0.6  # normalised correlation a voice that came through clears (test_post_speech.py); silence scores 0
RATE = 16000  # the mock card's files
DESK = "desk-1"
HOME = f"/home/{LOGIN_USER}"
VENV = "/opt/sip-refuge/venv"
SITE_FILE = "/etc/sip-refuge/site.yaml"
UNIT = "/etc/systemd/system/sip-refuge-post@.service"
SOURCE = f"{HOME}/sip-refuge"  # where the test puts the repository the README clones


def readme_blocks(backend: str) -> list[str]:
    """The ```sh blocks of the README's Pi section that a post on ``backend`` runs, in order."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start:end if end > 0 else None]
    blocks = re.findall(r"^```sh\n(.*?)^```", section, flags=re.S | re.M)
    assert blocks, f"no ```sh block in README.md's section {SECTION!r}"
    assert sum(b.startswith(PJSUA2_ONLY) for b in blocks) == 1, f"one block of {SECTION!r} starts {PJSUA2_ONLY!r}"
    return [b for b in blocks if backend == "pjsua2" or not b.startswith(PJSUA2_ONLY)]


def control_room_site(folder: Path, backends: dict[str, str]) -> Site:
    """The control room's site file: the example on free loopback ports, each post of :data:`BACKENDS` on its
    backend, control ports free, short queue timings, every secret made by `secrets init`."""
    data = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    ports = on_free_ports(load_site(EXAMPLE, check_secrets=False)).pbx
    data["pbx"].update(host="127.0.0.1", bind="127.0.0.1", sip_port=ports.sip_port, transport="udp",
                       qualify_frequency=5)
    data["pbx"]["rtp_start"], data["pbx"]["rtp_end"] = rtp_range()
    data["pbx"]["ami"]["port"] = ports.ami.port
    # Long enough that the desk robot answers the first ring even when the emulated post is slow to report.
    data["queue"].update(ring_timeout=60, max_wait=120)
    data["sidecar"]["listen"] = f"127.0.0.1:{free_port()}"  # nobody listens: telemetry stays in the outbox
    by_post = {post: backend for backend, post in backends.items()}
    for post in data["posts"]:
        post["control_port"] = free_port()
        post["sip_backend"] = by_post.get(post["id"], post.get("sip_backend", "pyvoip"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    init_secrets(load_site(path, check_secrets=False))
    return load_site(path)


def chown_tree(path: Path, uid: int, gid: int) -> None:
    for folder, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.lchown(os.path.join(folder, name), uid, gid)
    os.lchown(path, uid, gid)


def user_ids(root: PiRoot, user: str) -> tuple[int, int]:
    for line in root.host_path("/etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return int(fields[2]), int(fields[3])
    raise AssertionError(f"no user {user} in the Pi root")


@dataclass
class Installed:
    """The emulated Pi after the README's steps."""

    root: PiRoot
    site: Site  # the control room's copy (the Pi has /etc/sip-refuge/site.yaml)
    post: str
    unit: Unit
    block_seconds: list[float]

    def sip_refuge(self, *args: str, user: str = LOGIN_USER, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.root.run([f"{VENV}/bin/sip-refuge", *args], user=user, cwd=HOME, timeout=timeout)

    def status(self) -> dict[str, object]:
        """``sip-refuge status`` run in the Pi (seconds under qemu: Python starts emulated)."""
        reply: dict[str, object] = json.loads(self.sip_refuge("status", SITE_FILE, "--post", self.post).stdout)
        return reply

    def ask(self, cmd: str) -> dict[str, object]:
        """The agent's control socket from this side (the chroot shares loopback): fast, for polling."""
        reply: dict[str, object] = ask(control_port(self.site, self.site.post(self.post)), {"cmd": cmd})
        assert reply.get("ok"), reply
        return reply

    def wait_status(self, what: str, timeout: float, agent: subprocess.Popen[bytes] | None = None,
                    log: Path | None = None, **want: object) -> dict[str, object]:
        def probe() -> dict[str, object] | None:
            if agent is not None and agent.poll() is not None:
                raise AssertionError(f"the post exited {agent.returncode}:\n"
                                     + (log.read_text(errors="replace")[-3000:] if log else ""))
            try:
                status = self.ask("status")
            except RefugeError:
                return None  # the control socket is not up yet
            return status if all(status.get(k) == v for k, v in want.items()) else None

        return wait_for(probe, timeout, what)


# ----------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    return control_room_site(tmp_path_factory.mktemp("control-room"), BACKENDS)


@pytest.fixture(scope="module")
def pbx(site: Site) -> Iterator[Asterisk]:
    with Asterisk(site, command="pytest tests/integration/test_pi_post.py", boot_timeout=60) as asterisk:
        yield asterisk


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def installed(request: pytest.FixtureRequest, site: Site, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """A fresh copy of the cached Pi root with the README's steps run in it for the backend's post."""
    post = BACKENDS[request.param]
    root = PiRoot.copy_of_cache(tmp_path_factory.mktemp(f"pi-{request.param}"))
    try:
        uid, gid = user_ids(root, LOGIN_USER)
        home = root.host_path(HOME)
        # Brought from the control room, as the README says: the site file and this post's secret only.
        shutil.copy2(site.path, home / "site.yaml")
        shutil.copy2(site.post(post).secret.file or "", home / f"{post}.secret")
        if request.param == "pjsua2":  # the wheel built on the control-room PC, brought like the site file
            wheel = ensure_wheel(Target.for_machine("aarch64"))
            shutil.copy2(wheel, home / wheel.name)
        git_snapshot(root.host_path(SOURCE))
        chown_tree(home, uid, gid)
        env = {"POST": post, "SIP_REFUGE_GIT": SOURCE,
               # This network's HTTPS proxy CA, as on the host (pip reaches PyPI through it); not a README step.
               "PIP_CERT": "/etc/host-network-ca.crt"}
        seconds = []
        for block in readme_blocks(request.param):
            started = time.monotonic()
            root.run(["bash", "-euo", "pipefail", "-c", block], user=LOGIN_USER, cwd=HOME, env=env, timeout=1800)
            seconds.append(time.monotonic() - started)
        yield Installed(root, site, post, Unit.read(root.host_path(UNIT)), seconds)
    finally:
        root.remove()


def start_as_systemd(pi: Installed, log: Path, notify: NotifySocket, card: tuple[str, str]) -> subprocess.Popen[bytes]:
    """``systemctl start sip-refuge-post@POST`` as systemd would do it, with mock GPIO and the mock sound card
    (microphone ``card[0]``, speaker ``card[1]``) in place of the unit's ``--audio``."""
    return start_unit(pi.root, pi.unit, pi.post, ["--gpio", "mock", "--audio-in", card[0], "--audio-out", card[1]],
                      without=["--audio"], log=log, notify=notify)


def mock_card(pi: Installed, caller: speech.Samples) -> tuple[str, str, Path]:
    """IN.wav (the caller's voice) in the service's working folder, owned by the service; OUT.wav's path in the
    Pi and on this side."""
    user, workdir = pi.unit.service("User") or "", pi.unit.service("WorkingDirectory") or ""
    pi.root.run(["install", "-d", "-o", user, "-g", user, "-m", "0750", workdir])
    uid, gid = user_ids(pi.root, user)
    voice = write_wav(pi.root.host_path(f"{workdir}/in.wav"), caller, RATE)
    os.chown(voice, uid, gid)
    return f"{workdir}/in.wav", f"{workdir}/out.wav", pi.root.host_path(f"{workdir}/out.wav")


def found(reference: speech.Samples, ref_rate: int, recording: speech.Samples, rate: int) -> speech.Match:
    return speech.match(speech.resample(reference, ref_rate, rate), recording, rate)


def stop(proc: subprocess.Popen[bytes], log: Path) -> None:
    if proc.poll() is None:
        proc.terminate()  # what systemd sends on stop
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"the post ignored SIGTERM:\n{log.read_text(errors='replace')[-3000:]}") from None
        assert code == 0, f"the post exited {code} on SIGTERM:\n{log.read_text(errors='replace')[-3000:]}"


# ----------------------------------------------------------------------------------------------- tests

def test_the_readme_installs_the_post_for_its_user_and_service(installed: Installed) -> None:
    """README's Pi steps leave the code the admin's, the secret the service's alone, and the unit enabled."""
    root, post = installed.root, installed.post
    uid, _ = user_ids(root, LOGIN_USER)
    for path in ("/opt/sip-refuge", "/opt/sip-refuge/src", VENV):
        assert root.host_path(path).stat().st_uid == uid, path
    owned_by_root = root.run(["find", "/opt/sip-refuge", "-uid", "0"]).stdout.split()
    assert owned_by_root == [], f"files the admin cannot update: {owned_by_root[:5]}"
    root.run(["git", "-C", "/opt/sip-refuge/src", "pull", "-q"], user=LOGIN_USER, cwd=HOME)
    # A real install, not an editable one: the package lives in the venv.
    where = root.run([f"{VENV}/bin/python", "-c", "import sip_refuge; print(sip_refuge.__file__)"],
                     user=LOGIN_USER, cwd="/").stdout.strip()
    assert where.startswith(f"{VENV}/lib/python3.11/site-packages/sip_refuge/"), where
    secrets = root.host_path("/etc/sip-refuge/secrets")
    assert sorted(p.name for p in secrets.iterdir()) == [f"{post}.secret"]
    service_uid, _ = user_ids(root, "sip-refuge")
    secret = (secrets / f"{post}.secret").stat()
    assert (secret.st_uid, secret.st_mode & 0o777) == (service_uid, 0o600)
    assert root.run(["systemctl", "is-enabled", f"sip-refuge-post@{post}"]).stdout.strip() == "enabled"
    # systemd's own check of the unit as installed, against the root's files (ExecStart exists there).
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: apt-get install -y systemd (make deps)"
    done = subprocess.run([analyze, "verify", "--man=no", f"--root={root.path}", f"sip-refuge-post@{post}.service"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")
    print(f"README blocks under qemu: {', '.join(f'{s:.0f} s' for s in installed.block_seconds)}")


def test_gpiozero_picks_lgpio_from_pip_in_the_service_working_folder(installed: Installed) -> None:
    """lgpio comes from its PyPI wheel, gpiozero tries it first, and it needs the unit's WorkingDirectory."""
    root, unit = installed.root, installed.unit
    assert root.run(["dpkg-query", "-W", "python3-lgpio"], check=False).returncode != 0  # no Debian package
    user = unit.service("User") or ""
    workdir = unit.service("WorkingDirectory") or ""
    root.run(["install", "-d", "-o", user, "-g", user, "-m", "0750", workdir])
    probe = (
        "import json, warnings\n"
        "from importlib.metadata import distribution\n"
        "from gpiozero import Device\n"
        "from gpiozero.exc import BadPinFactory\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    try:\n"
        "        chosen = type(Device._default_pin_factory()).__name__\n"
        "    except BadPinFactory as exc:\n"
        "        chosen = f'none: {exc}'\n"
        "import lgpio\n"
        "print(json.dumps({'chosen': chosen, 'fallbacks': [str(w.message) for w in seen],\n"
        "                  'lgpio': lgpio.__file__, 'lgpio_version': distribution('lgpio').version}))\n")
    found = json.loads(root.run([f"{VENV}/bin/python", "-c", probe], user=user, cwd=workdir).stdout)
    assert found["lgpio"].startswith(f"{VENV}/lib/python3.11/site-packages/"), found
    assert found["lgpio_version"].startswith("0.2."), found
    # gpiozero tries lgpio first; its module loads (gpiozero.pins.lgpio imports lgpio), and the factory stops
    # only at the board check, since qemu is no Raspberry Pi. The factories after it are not installed at all.
    first, *others = found["fallbacks"]
    assert first.startswith("Falling back from lgpio:") and "No module named" not in first, found
    assert "Pi revision" in first, found
    assert "Falling back from rpigpio: No module named 'RPi'" in others, found
    # lgpio makes its notification FIFO in the current folder: there in the working folder, refused in '/'.
    assert any(p.name.startswith(".lgd-nfy") for p in root.host_path(workdir).iterdir())
    refused = root.run([f"{VENV}/bin/python", "-c", "import lgpio"], user=user, cwd="/", check=False)
    assert refused.returncode != 0 and ".lgd-nfy" in refused.stderr


def test_the_unit_starts_a_post_that_registers_talks_both_ways_and_tests_itself(
        installed: Installed, pbx: Asterisk, tmp_path: Path) -> None:
    """The unit's command runs the post in the Pi: READY and watchdog, registered, queued then answered, speech
    both ways, self-test passed."""
    site, post = installed.site, installed.post
    desk = site.desk(DESK)
    log = tmp_path / "post.log"
    caller, operator = babble(6.0, RATE, seed=1), babble(6.0, 8000, seed=2)
    card_in, card_out, out = mock_card(installed, caller)
    notify = NotifySocket()
    agent = start_as_systemd(installed, log, notify, (card_in, card_out))
    robot = DeskRobot(desk.id, desk.secret.read(), (site.pbx.host, site.pbx.sip_port), answer_after=None,
                      display=desk.name).start()
    try:
        notify.wait("READY=1", 180)  # emulated start-up: Python and the SIP stack under qemu
        notify.wait("WATCHDOG=1", 60)
        robot.wait_registered(15)
        installed.wait_status(f"post {post} idle and registered", 90, agent, log, state="idle", registered=True)
        assert installed.status()["registered"] is True  # `sip-refuge status` in the Pi says so too

        assert "pressed" in installed.sip_refuge("press", SITE_FILE, "--post", post).stdout
        ring = robot.wait_ring(30)
        assert ring.caller == site.post(post).name
        queued = installed.wait_status("the alarm queued", 30, agent, log, state="queued")
        assert queued["lights"] == {"yellow": "on", "green": "off", "red": "off"}
        robot.answer(ring)
        robot.wait_answered(ring, 30)
        installed.wait_status("the alarm answered", 30, agent, log, state="connected")
        connected = installed.status()
        assert connected["state"] == "connected"
        assert connected["lights"] == {"yellow": "on", "green": "on", "red": "off"}
        robot.record(ring)
        answered = wav_seconds(out)
        robot.play_pcm(speech.pcm16(operator), ring)
        wait_for(lambda: wav_seconds(out) >= answered + 8.0 and len(robot.recording(ring)) >= 8 * 16000 or None,
                 90, "8 s of conversation")
        robot.hangup(ring)
        installed.wait_status("idle after the desk hung up", 30, agent, log, state="idle")

        heard, rate = read_wav(out)
        at_post = found(operator, 8000, heard, rate)
        at_desk = found(caller, RATE, speech.samples(robot.recording(ring)), 8000)
        print(f"{post}: the operator in OUT.wav: {at_post.describe()}; the caller at the desk: {at_desk.describe()}")
        assert at_post.correlation >= HEARD and at_post.delay >= answered, \
            f"the post's speaker did not play the operator: {at_post.describe()}"
        assert at_desk.correlation >= HEARD, f"the caller's voice did not reach the desk: {at_desk.describe()}"

        before = installed.ask("status").get("last_self_test")
        installed.ask("selftest")
        tested = wait_for(lambda: (s := installed.ask("status"))["state"] != "selftest"
                          and s.get("last_self_test") not in (None, before) and s["last_self_test"], 120,
                          "a new self-test result")
        assert isinstance(tested, dict) and tested.get("passed") is True, tested
    finally:
        robot.stop()
        stop(agent, log)
        notify.close()
    assert "Traceback" not in log.read_text(errors="replace")


class DigitAgent:
    """tests/support/pi_agent.py in the Pi as the service user: the post agent whose backend's digits the test
    sends (``dtmf D``) and hears (``heard CALL D``) through the process's stdin and stdout."""

    def __init__(self, installed: Installed, log: Path) -> None:
        root, unit = installed.root, installed.unit
        user, workdir = unit.service("User") or "", unit.service("WorkingDirectory") or ""
        root.run(["install", "-d", "-o", user, "-g", user, "-m", "0750", workdir])
        shutil.copy(REPO / "tests" / "support" / "pi_agent.py", root.host_path(f"{workdir}/pi_agent.py"))
        argv = root.argv([f"{VENV}/bin/python", f"{workdir}/pi_agent.py", SITE_FILE, installed.post, workdir],
                         user=user, cwd=workdir, env={"PYTHONUNBUFFERED": "1"})
        self.log = log
        self._err = open(log, "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True,
                                     start_new_session=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def expect(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {prefix!r} from the agent in the Pi within {timeout} s:\n"
                                     f"{self.log.read_text(errors='replace')[-3000:]}") from None
            if line.startswith(prefix):
                return line

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        self._err.close()


def test_digits_cross_both_ways_on_the_answered_call(installed: Installed, pbx: Asterisk, tmp_path: Path) -> None:
    """On an answered alarm, a digit from the desk reaches the post's backend in the Pi and one from the post the desk."""
    site, post = installed.site, installed.post
    agent = DigitAgent(installed, tmp_path / "agent.log")
    desk = site.desk(DESK)
    robot = DeskRobot(desk.id, desk.secret.read(), (site.pbx.host, site.pbx.sip_port), answer_after=0.0,
                      display=desk.name).start()
    try:
        agent.expect("ready", 180)
        robot.wait_registered(15)
        installed.wait_status(f"post {post} registered", 90, registered=True)
        installed.sip_refuge("press", SITE_FILE, "--post", post)
        ring = robot.wait_answered(robot.wait_ring(30), 30)
        installed.wait_status("the alarm connected", 30, state="connected")
        agent.send("dtmf 5")
        agent.expect("sent ", 30)
        robot.wait_dtmf("5", ring, 30)  # post -> desk
        robot.play_tone(440.0, 1.0, ring)  # media from the desk first: Asterisk relays digits once it flows
        robot.send_dtmf("7", ring)
        heard = agent.expect("heard ", 30)  # desk -> post
        assert heard.endswith(" 7"), heard
        robot.hangup(ring)
        installed.wait_status("idle after the desk hung up", 30, state="idle")
        agent.send("stop")
        agent.expect("stopped", 60)
    finally:
        robot.stop()
        agent.close()
