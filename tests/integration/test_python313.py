"""A post on Python 3.13 or later (Debian unstable's python3 in a root folder: 3.14 at the archive's snapshot of
2026-12; both have no ``audioop``): the pyVoIP post,
installed there with pip as a post would be (``audioop-lts`` comes with it), carries a call with speech both ways.

The post runs as ``sip-refuge post`` inside the root (chroot: same network) with the mock sound card; Asterisk and
the desk robot run here, on this machine's Python.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from sip_refuge.config import Site
from sip_refuge.pbx.asterisk import Asterisk
from sip_refuge.post import speech
from tests.support.agent import Agent, wait_for
from tests.support.audio import babble, read_wav, wav_seconds, write_wav
from tests.support.desk_robot import DeskRobot
from tests.support.py313 import VENV, install_project, python_root, python_version, run_in
from tests.support.sites import POSTS, agent_site

pytestmark = pytest.mark.integration
RATE = 16000
HEARD = 0.6


@pytest.fixture(scope="module")
def root() -> Path:
    built = python_root()
    assert python_version(built) >= (3, 13), python_version(built)
    install_project(built)
    return built


class RootAgent(Agent):
    """``sip-refuge post`` inside the root, with its site folder inside it at the same path as here."""

    def __init__(self, root: Path, site: Site, post_id: str, audio_in: Path, audio_out: Path) -> None:
        super().__init__(site, post_id, site.path.parent / "state")
        self.root, self.audio_in, self.audio_out = root, audio_in, audio_out
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        inside = self.root / str(self.site.path.parent).lstrip("/")
        shutil.copytree(self.site.path.parent, inside, dirs_exist_ok=True)
        argv = ["chroot", str(self.root), f"{VENV}/bin/sip-refuge", "post", str(self.site.path), "--post",
                self.post.id, "--gpio", "mock", "--state-dir", str(self.state_dir),
                "--audio-in", str(self.audio_in), "--audio-out", str(self.audio_out)]
        self.log = self.site.path.parent / "post.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, text=True)

        def answering() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"the post on 3.13 exited {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                self.status()
            except Exception:  # noqa: BLE001 - not listening yet
                return False
            return True

        wait_for(answering, 60, "the 3.13 post's control socket")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            assert self.proc.wait(30) == 0, self.log.read_text()[-3000:]


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return agent_site(tmp_path / "site", queue={"ring_timeout": 20, "max_wait": 40})


def test_a_pyvoip_post_on_python_313_carries_speech_both_ways(root: Path, site: Site) -> None:
    """On Debian unstable's Python (3.13 or later) the pyVoIP post registers, calls, and both ends hear each other."""
    caller, operator = babble(6.0, RATE, seed=1), babble(6.0, 8000, seed=2)
    folder = site.path.parent
    write_wav(folder / "in.wav", caller, RATE)
    out_inside = root / str(folder / "out.wav").lstrip("/")
    with Asterisk(site, command="pytest tests/integration/test_python313.py") as pbx:
        d = site.desk("desk-1")
        with DeskRobot(d.id, d.secret.read(), (site.pbx.host, site.pbx.sip_port), answer_after=None) as desk:
            desk.wait_registered()
            wait_for(lambda: "Not in use" in pbx.cli(f"queue show {site.queue.name}"), 15, "desk-1 in the queue")
            with RootAgent(root, site, POSTS["pyvoip"], folder / "in.wav", folder / "out.wav") as agent:
                agent.wait_status(lambda s: s["state"] == "idle" and s["registered"], 30, "idle and registered")
                agent.press()
                ring = desk.wait_ring(15)
                desk.answer(ring)
                desk.wait_answered(ring)
                agent.wait_state("connected")
                desk.record(ring)
                answered = wav_seconds(out_inside)
                desk.play_pcm(speech.pcm16(operator), ring)
                wait_for(lambda: wav_seconds(out_inside) >= answered + 8 and len(desk.recording(ring)) >= 8 * 16000,
                         40, "8 s of conversation")
                version = run_in(root, [f"{VENV}/bin/python", "-c",
                                        "import sys, audioop; print(sys.version.split()[0], audioop.__file__)"]).stdout
                desk.hangup(ring)
                agent.wait_state("idle")
    assert version.startswith("3.1") and "site-packages" in version, version  # audioop from audioop-lts
    heard, rate = read_wav(out_inside)
    at_post = speech.match(speech.resample(operator, 8000, rate), heard, rate)
    at_desk = speech.match(speech.resample(caller, RATE, 8000), speech.samples(desk.recording(ring)), 8000)
    assert at_post.correlation >= HEARD, f"the caller did not hear the operator: {at_post.describe()}"
    assert at_desk.correlation >= HEARD, f"the operator did not hear the caller: {at_desk.describe()}"
    assert at_post.delay >= answered
