"""Speech through a whole post agent (runner, machine, SIP backend, mock sound card) and a real Asterisk 22.

The post runs with the mock card (``--audio-in IN.wav --audio-out OUT.wav``): its microphone hears a known "voice"
(:func:`tests.support.audio.babble`, seed 1) plus its own speaker; everything its speaker plays lands in OUT.wav.
The desk is a robot (:class:`tests.support.desk_robot.DeskRobot`, G.711) that plays another known voice (seed 2)
and records what it hears. Every claim is checked by cross-correlation (:func:`sip_refuge.post.speech.match`):
the delay is found and the normalised peak clears :data:`HEARD`, which a silent or garbled stream does not reach.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sip_refuge.config import Site
from sip_refuge.pbx.asterisk import Asterisk
from sip_refuge.post import speech
from sip_refuge.post.audio import prompt_path
from sip_refuge.post.sip.pjsua2_api import MediaSettings
from sip_refuge.post.sound import Sound
from tests.support.agent import InProcessAgent, wait_for
from tests.support.audio import babble, read_wav, wav_seconds, write_wav
from tests.support.desk_robot import DeskRobot
from tests.support.sites import POSTS, agent_site

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)

DESK = "desk-1"
HEARD = 0.6  # normalised correlation a voice that came through clears; silence scores 0, an unrelated voice < 0.1
ECHO = 0.15  # the desk's own voice scores below this (measured: 0.06 with the canceller, 0.32 without)
RATE = 16000  # the mock card's files
TEMPLATES = Path(__file__).resolve().parents[2] / "asterisk" / "templates"


@dataclass(frozen=True)
class Case:
    backend: str
    codec: str  # what the post offers (pjsua2), or G.711 (pyVoIP's only codec)
    asterisk_format: str  # what Asterisk reports for the post's channel


CASES = [Case("pyvoip", "PCMU/8000", "ulaw"), Case("pjsua2", "PCMU/8000", "ulaw"),
         Case("pjsua2", "G722/16000", "g722")]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    # The desk lets the first prompt play out before it answers: it rings long enough for that.
    return agent_site(tmp_path_factory.mktemp("speech-site"), queue={"ring_timeout": 20, "max_wait": 40})


@pytest.fixture(scope="module")
def pbx(site: Site) -> Iterator[Asterisk]:
    with Asterisk(site, command="pytest tests/integration/test_post_speech.py", boot_timeout=60) as asterisk:
        yield asterisk


@pytest.fixture
def desk(site: Site, pbx: Asterisk) -> Iterator[DeskRobot]:
    d = site.desk(DESK)
    with DeskRobot(d.id, d.secret.read(), (site.pbx.host, site.pbx.sip_port), answer_after=None,
                   display=d.name) as robot:
        robot.wait_registered()
        wait_for(lambda: f"(PJSIP/{DESK})" in pbx.cli(f"queue show {site.queue.name}")
                 and "Not in use" in pbx.cli(f"queue show {site.queue.name}"), 15, "desk-1 free in the queue")
        yield robot
    wait_for(lambda: "0 active channels" in pbx.cli("core show channels count"), 15, "idle Asterisk")


def mock_agent(site: Site, backend: str, folder: Path, voice: np.ndarray, codec: str = "") -> InProcessAgent:
    sound = Sound("null", write_wav(folder / "in.wav", voice, RATE), folder / "out.wav")
    agent = InProcessAgent(site, POSTS[backend], folder / "state", sound)
    if backend == "pjsua2" and codec:
        agent.runner.backend.media = MediaSettings(codecs=(codec,))  # type: ignore[attr-defined]
    return agent


def found(reference: np.ndarray, ref_rate: int, recording: np.ndarray, rate: int) -> speech.Match:
    return speech.match(speech.resample(reference, ref_rate, rate), recording, rate)


def prompt(name: str, seconds: float) -> tuple[np.ndarray, int]:
    x, rate = read_wav(prompt_path(name))
    return x[: int(seconds * rate)], rate


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.backend}-{c.codec.split('/')[0]}")
def test_caller_and_operator_hear_each_other(case: Case, site: Site, pbx: Asterisk, desk: DeskRobot,
                                             tmp_path: Path) -> None:
    """The caller hears the prompts in order, then the operator; the operator hears the caller, not themselves."""
    caller, operator = babble(6.0, RATE, seed=1), babble(6.0, 8000, seed=2)
    with mock_agent(site, case.backend, tmp_path, caller, case.codec) as agent:
        agent.wait_status(lambda s: s["state"] == "idle" and s["registered"], 30, "idle and registered")
        out = tmp_path / "out.wav"
        pressed = wav_seconds(out)
        agent.press()
        ring = desk.wait_ring(15)
        agent.wait_state("queued")
        # Let "connecting" (4.3 s) play out and "hold" begin, on the card's own clock.
        wait_for(lambda: wav_seconds(out) >= pressed + 6.5, 30, "connecting and the start of hold in OUT.wav")
        desk.answer(ring)
        desk.wait_answered(ring)
        agent.wait_state("connected")
        desk.record(ring)
        answered = wav_seconds(out)
        channels = pbx.cli("core show channels concise")
        post_channel = next(line.split("!")[0] for line in channels.splitlines()
                            if line.startswith(f"PJSIP/{agent.post.id}-"))
        assert case.asterisk_format in pbx.cli(f"core show channel {post_channel}").split("NativeFormats:")[1][:80]
        desk.play_pcm(speech.pcm16(operator), ring)
        wait_for(lambda: wav_seconds(out) >= answered + 8.0 and len(desk.recording(ring)) >= 8 * 16000, 40,
                 "8 s of conversation")
        desk.hangup(ring)
        agent.wait_state("idle")

    heard, rate = read_wav(out)
    connecting, hold = prompt("connecting", 2.0), prompt("hold", 1.5)
    at = {name: found(ref, ref_rate, heard, rate) for name, (ref, ref_rate) in
          (("connecting", connecting), ("hold", hold))}
    at["operator"] = found(operator, 8000, heard, rate)
    log.info("%s: OUT.wav: %s", case, {k: v.describe() for k, v in at.items()})
    for name, match in at.items():
        assert match.correlation >= HEARD, f"{name} not heard in OUT.wav: {match.describe()}"
    assert pressed <= at["connecting"].delay < at["hold"].delay < answered <= at["operator"].delay

    recorded = speech.samples(desk.recording(ring))
    voice = found(caller, RATE, recorded, 8000)
    echo = found(operator, 8000, recorded, 8000)
    log.info("%s: at the desk: caller %s; operator's echo %s", case, voice.describe(), echo.describe())
    assert voice.correlation >= HEARD, f"the caller's voice did not reach the desk: {voice.describe()}"
    assert echo.correlation < ECHO, f"the desk hears itself back: {echo.describe()}"


# ------------------------------------------------------------------------------------------- self-test

def silent_echo_templates(folder: Path) -> Path:
    """The shipped templates with the self-test's Echo() replaced by a silent wait: an echo extension that
    answers and returns nothing (test-only: no production config plays silence)."""
    copy = folder / "templates"
    shutil.copytree(TEMPLATES, copy)
    dialplan = copy / "extensions_refuge.conf.j2"
    text = dialplan.read_text(encoding="utf-8")
    assert " same => n,Echo()\n" in text
    dialplan.write_text(text.replace(" same => n,Echo()\n", " same => n,Wait(60)\n"), encoding="utf-8")
    return copy


def run_self_test(site: Site, backend: str, folder: Path, voice: np.ndarray) -> dict[str, Any]:
    with mock_agent(site, backend, folder, voice) as agent:
        agent.wait_status(lambda s: s["state"] == "idle" and s["registered"], 30, "idle and registered")
        agent.selftest()
        done = agent.wait_status(lambda s: s["last_self_test"] is not None and s["state"] != "selftest", 60,
                                 "a self-test verdict")
        wait_for(lambda: agent.reports("selftest", result="pass" if done["last_self_test"]["passed"] else "fail"),
                 5, "the self-test's report")
        report = agent.reports("selftest")[-1]
    last: dict[str, Any] = done["last_self_test"]
    assert report["part"] == last["part"] and report["detail"] == last["detail"]
    log.info("%s self-test: %s", backend, last)
    return last


@pytest.mark.parametrize("backend", sorted(POSTS))
def test_self_test_passes_when_speaker_microphone_and_pbx_work(backend: str, site: Site, pbx: Asterisk,
                                                                tmp_path: Path) -> None:
    """The acoustic self-test passes with a working mock card and the PBX's echo: both chirps are heard."""
    last = run_self_test(site, backend, tmp_path, babble(6.0, RATE, seed=1))
    assert last["passed"] is True and last["part"] == "", last
    assert "pbx: chirp heard" in last["detail"] and "local: chirp heard" in last["detail"], last


@pytest.mark.parametrize("backend", sorted(POSTS))
def test_self_test_with_a_dead_microphone_fails_local(backend: str, site: Site, pbx: Asterisk,
                                                      tmp_path: Path) -> None:
    """A microphone that hears nothing (an all-zero IN.wav) fails the self-test's local part; the PBX part passes."""
    last = run_self_test(site, backend, tmp_path, np.zeros(RATE * 2))
    assert last["passed"] is False and last["part"] == "local", last
    assert "microphone did not hear the speaker" in last["detail"], last


@pytest.mark.parametrize("backend", sorted(POSTS))
def test_self_test_with_a_silent_echo_fails_pbx(backend: str, tmp_path_factory: pytest.TempPathFactory,
                                                tmp_path: Path) -> None:
    """An echo extension that answers and returns nothing fails the self-test's pbx part; the local part passes."""
    folder = tmp_path_factory.mktemp("silent-echo")
    silent = agent_site(folder / "site")
    with Asterisk(silent, command="pytest (silent echo)", templates=silent_echo_templates(folder)):
        last = run_self_test(silent, backend, tmp_path, babble(6.0, RATE, seed=1))
    assert last["passed"] is False and last["part"] == "pbx", last
    assert "echo extension returned no chirp" in last["detail"], last


# ------------------------------------------------------------------------------------------- dead media

@pytest.mark.parametrize("backend", sorted(POSTS))
def test_dead_media_on_a_connected_call_raises_media_stalled_and_keeps_the_call(
        backend: str, site: Site, pbx: Asterisk, desk: DeskRobot, tmp_path: Path) -> None:
    """A desk whose audio dies mid-call (no BYE, the PBX still has the call) makes the post raise media_stalled after the machine's media_timeout, without hanging up."""
    agent = mock_agent(site, backend, tmp_path, babble(6.0, RATE, seed=1))
    agent.runner.machine.settings = replace(agent.runner.machine.settings, media_timeout=3.0)
    with agent:
        agent.wait_status(lambda s: s["state"] == "idle" and s["registered"], 30, "idle and registered")
        agent.press()
        ring = desk.wait_ring(15)
        desk.answer(ring)
        desk.wait_answered(ring)
        connected = agent.wait_state("connected")
        assert "media_stalled" not in connected["faults"]
        ring.call.rtp.stop()  # the desk's media dies (a crashed phone's RTP stack); its SIP still answers
        stalled = agent.wait_status(lambda s: "media_stalled" in s["faults"], 30, "the media_stalled fault")
        assert stalled["state"] == "connected" and stalled["lights"]["red"] == "blink", stalled
        wait_for(lambda: agent.reports("call", event="media_stalled"), 5, "the media_stalled report")
        desk.hangup(ring)
        ended = agent.wait_state("idle")
        assert "media_stalled" not in ended["faults"]
