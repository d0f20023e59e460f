"""The runner with a fake SIP backend and a clock the test turns: commands reach the backend, what the backend
reports reaches the machine, and a failing backend command becomes the event the machine waits for."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sip_refuge.config import Site
from sip_refuge.post import speech
from sip_refuge.post.events import (
    AudioHeard,
    ButtonPressed,
    CallAnswered,
    CallProbed,
    CallProgress,
    Event,
    MediaResumed,
    MediaStalled,
    Registered,
    SelfTestRequested,
    Tick,
)
from sip_refuge.post.panel import MockPanel, Panel
from sip_refuge.post.runner import PostRunner
from sip_refuge.post.sip import Account
from sip_refuge.post.telemetry import TelemetryOutbox
from tests.support.clock import Clock
from tests.support.fake_sip import FakeBackend
from tests.unit.test_machine import make_site

RATE = 8000


@pytest.fixture
def site() -> Site:
    return make_site()


@pytest.fixture
def parts(site: Site, tmp_path: Path) -> Iterator[tuple[PostRunner, FakeBackend, Clock]]:
    post = site.posts[0]
    backend, clock = FakeBackend(), Clock()

    def panel(emit: object) -> Panel:
        return MockPanel(post.gpio, emit, post_id=post.id)  # type: ignore[arg-type]

    runner = PostRunner(site, post, backend=backend, account=Account(post, site.pbx, "secret"), panel=panel,
                        telemetry=TelemetryOutbox(post.id, None, None, tmp_path / "spool.jsonl"), clock=clock)
    backend.start(runner.account, runner.emit)
    try:
        step(runner, Registered("pbx-a"))
        yield runner, backend, clock
    finally:
        runner.panel.close()


def step(runner: PostRunner, event: Event) -> None:
    """The runner's turn for ``event``, then for whatever the backend or the runner enqueued meanwhile."""
    runner.step(event)
    while not runner.events.empty():
        runner.step(runner.events.get_nowait())


def heard(gain: float) -> bytes:
    x = speech.test_signal(RATE) * gain
    return speech.pcm16(x) + bytes(RATE * 2)


def test_a_press_dials_the_queue_then_the_prompts_play_and_stop_on_answer(
        parts: tuple[PostRunner, FakeBackend, Clock]) -> None:
    runner, backend, clock = parts
    step(runner, ButtonPressed())
    (call_id, extension, host, selftest), = backend.called("dial")
    assert (extension, host, selftest) == ("7000", "pbx-a", False)
    assert backend.called("play_prompt") == [("connecting",)]
    step(runner, CallProgress(str(call_id), 100))
    step(runner, CallProgress(str(call_id), 180))
    assert backend.called("play_prompt") == [("connecting",), ("hold",)]
    step(runner, CallAnswered(str(call_id)))
    assert backend.called("stop_prompts") and runner.status()["state"] == "connected"


def test_a_self_test_through_the_runner_names_the_failed_part(parts: tuple[PostRunner, FakeBackend, Clock]) -> None:
    runner, backend, clock = parts
    step(runner, SelfTestRequested())
    (call_id, extension, _, selftest), = backend.called("dial")
    assert (extension, selftest) == ("7099", True)
    step(runner, CallAnswered(str(call_id)))
    (check_id, path, on_call, seconds), = backend.called("check_audio")
    assert (path, on_call) == ("call", call_id) and seconds == runner.machine.settings.check_seconds
    backend.emit(AudioHeard(str(check_id), RATE, heard(1.0)))
    step(runner, Tick())
    assert backend.called("hangup") == [(call_id,)]
    check_id, path, on_call, _ = backend.called("check_audio")[1]
    assert (path, on_call) == ("local", None)
    backend.emit(AudioHeard(str(check_id), RATE, bytes(RATE * 4)))  # a dead microphone
    step(runner, Tick())
    last = runner.status()["last_self_test"]
    assert last["passed"] is False and last["part"] == "local", last
    assert "selftest_failed" in runner.status()["faults"]


def test_a_check_the_backend_cannot_run_fails_instead_of_hanging(
        parts: tuple[PostRunner, FakeBackend, Clock]) -> None:
    runner, backend, clock = parts
    backend.fail.add("check_audio")
    step(runner, SelfTestRequested())
    (call_id, *_), = backend.called("dial")
    step(runner, CallAnswered(str(call_id)))  # both checks raise: the runner reports "nothing heard" for each
    last = runner.status()["last_self_test"]
    assert last["part"] == "local" and last["detail"].count("could not play and record") == 2, last
    assert runner.status()["state"] == "idle"


def test_dead_media_raises_its_fault_after_the_machine_s_time_and_clears_when_audio_returns(
        parts: tuple[PostRunner, FakeBackend, Clock]) -> None:
    runner, backend, clock = parts
    step(runner, ButtonPressed())
    (call_id, *_), = backend.called("dial")
    step(runner, CallProgress(str(call_id), 180))
    step(runner, CallAnswered(str(call_id)))
    backend.emit(MediaStalled(str(call_id)))
    step(runner, Tick())
    assert backend.called("probe") == [(call_id,)]  # silence: the PBX is asked at once
    answered = 0
    for _ in range(int(runner.machine.settings.media_timeout)):  # the PBX still has the call: it answers
        for _probe in backend.called("probe")[answered:]:
            backend.emit(CallProbed(str(call_id), 200))
            answered += 1
        clock.now += 1.0
        step(runner, Tick())
    status = runner.status()
    assert "media_stalled" in status["faults"] and status["state"] == "connected"
    assert backend.called("hangup") == []
    backend.emit(MediaResumed(str(call_id)))
    step(runner, Tick())
    assert runner.status()["faults"] == []
