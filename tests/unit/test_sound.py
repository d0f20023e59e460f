"""The post's audio parts without a network: the correlation analysis, the mock card's model, speexdsp's echo
canceller, the pyVoIP audio engine on the mock card, the ALSA binding on ALSA's null device, and the command line."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from sip_refuge.cli import build_parser
from sip_refuge.errors import RefugeError
from sip_refuge.post import aec, speech
from sip_refuge.post.agent import sound_for
from sip_refuge.post.audio import prompt_pcm
from sip_refuge.post.engine import PREBUFFER, AudioEngine
from sip_refuge.post.sound import ECHO_DELAY, ECHO_GAIN, MockCard, Sound, frame_bytes
from tests.support.audio import babble, read_wav, write_wav

RATE = 8000
FRAME = frame_bytes(RATE)


# -- speech.match ---------------------------------------------------------------------------------------

def test_match_finds_a_delayed_quieter_copy_and_says_how_late_and_how_loud() -> None:
    voice = babble(4.0, RATE, seed=1)
    recording = np.concatenate([np.zeros(int(0.25 * RATE)), voice * 0.5, np.zeros(RATE)])
    found = speech.match(voice, recording, RATE)
    assert found.correlation > 0.99 and found.delay == pytest.approx(0.25, abs=0.001)
    assert found.gain_db == pytest.approx(-6.0, abs=0.2) and found.segments == 4


@pytest.mark.parametrize("what", ["silence", "another voice", "noise"])
def test_match_scores_silence_and_unrelated_audio_near_zero(what: str) -> None:
    voice = babble(4.0, RATE, seed=1)
    recording = {"silence": np.zeros(5 * RATE), "another voice": babble(5.0, RATE, seed=2),
                 "noise": np.random.default_rng(3).standard_normal(5 * RATE) * 0.1}[what]
    assert speech.match(voice, recording, RATE).correlation < 0.1


def test_match_survives_a_slip_of_one_frame_in_the_middle() -> None:
    voice = babble(6.0, RATE, seed=1)
    slip = 3 * RATE
    recording = np.concatenate([voice[:slip], np.zeros(160), voice[slip:]])  # a jitter buffer ran dry once
    assert speech.match(voice, recording, RATE).correlation > 0.9


def test_resample_keeps_the_signal() -> None:
    chirp = speech.test_signal(16000)
    back = speech.resample(speech.resample(chirp, 16000, 48000), 48000, 16000)
    assert speech.match(chirp, back, 16000, segment=None).correlation > 0.99


# -- the mock card --------------------------------------------------------------------------------------

def test_mock_card_microphone_hears_the_world_plus_the_speaker_s_echo(tmp_path: Path) -> None:
    world = babble(2.0, 16000, seed=1)
    card = MockCard(write_wav(tmp_path / "in.wav", world, 16000), tmp_path / "out.wav", RATE)
    chirp = speech.test_signal(RATE)
    played = np.concatenate([chirp, np.zeros(RATE)])
    heard = b"".join(card.exchange(speech.pcm16(played[i:i + 160])) for i in range(0, len(played), 160))
    card.close()
    mic = speech.samples(heard)
    echo = speech.match(chirp, mic, RATE, segment=None)
    assert echo.delay == pytest.approx(ECHO_DELAY, abs=0.001)
    assert echo.gain_db == pytest.approx(20 * np.log10(ECHO_GAIN), abs=0.5)
    assert speech.match(speech.resample(world, 16000, RATE)[:RATE], mic, RATE).correlation > 0.6
    out, rate = read_wav(tmp_path / "out.wav")  # written at IN.wav's rate, everything the speaker played
    assert rate == 16000 and len(out) == pytest.approx(2 * len(played), abs=200)  # less the resampler's delay
    assert speech.match(speech.resample(chirp, RATE, 16000), out, 16000, segment=None).correlation > 0.95


def test_an_all_zero_microphone_is_a_dead_capsule_that_hears_not_even_the_speaker(tmp_path: Path) -> None:
    card = MockCard(write_wav(tmp_path / "in.wav", np.zeros(800), 8000), tmp_path / "out.wav", RATE)
    loud = speech.pcm16(np.full(160, 0.5))
    assert all(card.exchange(loud) == bytes(FRAME) for _ in range(20))
    card.close()


@pytest.mark.parametrize(("channels", "width", "rate", "problem"), [
    (2, 2, 8000, "2 channel"), (1, 1, 8000, "8-bit"), (1, 2, 44100, "44100 Hz")])
def test_mock_card_refuses_an_input_it_cannot_play_and_says_why(tmp_path: Path, channels: int, width: int,
                                                                rate: int, problem: str) -> None:
    import wave
    path = tmp_path / "in.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(bytes(channels * width * 100))
    with pytest.raises(RefugeError, match=f"in.wav: must be 16-bit PCM mono at 8, 16 or 48 kHz .*{problem}"):
        MockCard(path, tmp_path / "out.wav", RATE)


# -- the echo canceller ---------------------------------------------------------------------------------

def test_speexdsp_cancels_the_echo_and_keeps_the_near_voice() -> None:
    assert aec.available(), "libspeexdsp1 (Debian) is missing"
    far, near = babble(8.0, RATE, seed=2), babble(8.0, RATE, seed=1) * 0.5
    delay = int(0.03 * RATE)
    echo = np.concatenate([np.zeros(delay), far[:-delay]]) * ECHO_GAIN
    canceller = aec.EchoCanceller(RATE, 160)
    mic = echo + np.where(np.arange(len(far)) > 5 * RATE, near, 0.0)
    out = speech.samples(b"".join(canceller.process(speech.pcm16(mic[i:i + 160]), speech.pcm16(far[i:i + 160]))
                                  for i in range(0, len(far), 160)))
    canceller.close()
    lone_echo = slice(3 * RATE, 5 * RATE)  # converged, nobody near speaks
    assert speech.level_dbfs(out[lone_echo]) < speech.level_dbfs(mic[lone_echo]) - 25
    assert speech.match(near[5 * RATE:], out[5 * RATE:], RATE).correlation > 0.8


# -- the pyVoIP audio engine on the mock card -----------------------------------------------------------

class Loop:
    """A call's media for the engine: what the post sends comes straight back (an echo extension), or, with
    ``far``, the far end's voice arrives instead, a frame for every frame sent."""

    def __init__(self, far: bytes = b"") -> None:
        self.sent: list[bytes] = []
        self.incoming: list[bytes] = []
        self.lock = threading.Lock()
        self.far = far

    def send_frame(self, pcm: bytes) -> None:
        with self.lock:
            self.sent.append(pcm)
            if self.far:
                n = len(self.sent) - 1
                self.incoming.append(self.far[n * FRAME:(n + 1) * FRAME].ljust(FRAME, b"\0"))
            else:
                self.incoming.append(pcm)

    def take_frame(self) -> bytes | None:
        with self.lock:
            return self.incoming.pop(0) if self.incoming else None

    def pending(self) -> int:
        with self.lock:
            return len(self.incoming)

    def drop_frames(self, keep: int) -> int:
        with self.lock:
            gone = max(0, len(self.incoming) - keep)
            del self.incoming[:gone]
            return gone


def run_check(engine: AudioEngine, path: str, stream: Loop | None) -> tuple[int, bytes]:
    done = threading.Event()
    result: list[tuple[int, bytes]] = []
    engine.check("c1", path, stream, 2.0, lambda cid, rate, pcm: (result.append((rate, pcm)), done.set()))
    assert done.wait(20), "the engine never finished its check"
    return result[0]


def test_engine_checks_hear_the_chirp_locally_and_through_an_echoing_call(tmp_path: Path) -> None:
    world = babble(3.0, RATE, seed=1)
    engine = AudioEngine(lambda: MockCard(write_wav(tmp_path / "in.wav", world, RATE), tmp_path / "out.wav", RATE),
                         RATE, name="test")
    engine.start()
    try:
        rate, pcm = run_check(engine, "local", None)
        local = speech.match(speech.test_signal(rate), speech.samples(pcm), rate, segment=None)
        assert local.correlation > 0.5 and local.gain_db == pytest.approx(-10, abs=1.5), local
        rate, pcm = run_check(engine, "call", Loop())
        call = speech.match(speech.test_signal(rate), speech.samples(pcm), rate, segment=None)
        assert call.correlation > 0.99, call
        assert engine.health() == "" and engine.echo_cancelling
    finally:
        engine.stop()


def test_engine_plays_prompts_in_turn_then_the_far_end_and_sends_the_cleaned_microphone(tmp_path: Path) -> None:
    world = babble(3.0, RATE, seed=1)
    engine = AudioEngine(lambda: MockCard(write_wav(tmp_path / "in.wav", world, RATE), tmp_path / "out.wav", RATE),
                         RATE, name="test")
    engine.start()
    connecting = prompt_pcm("connecting", None, RATE)[: 2 * RATE * 2]  # two seconds of each
    hold = prompt_pcm("hold", None, RATE)[: 2 * RATE * 2]
    try:
        engine.play(connecting)
        engine.play(hold)
        waiter = threading.Event()
        waiter.wait(0.1)
        operator = babble(3.0, RATE, seed=2)
        stream = Loop(far=speech.pcm16(operator))
        while engine.frames < 4.5 * 50:  # both prompts out, on the engine's own clock
            waiter.wait(0.05)
        engine.connect(stream)
        while len(stream.sent) < 4 * 50 + PREBUFFER:  # enough for every second of the looped world
            waiter.wait(0.05)
        engine.disconnect(stream)
    finally:
        engine.stop()
    out, rate = read_wav(tmp_path / "out.wav")
    at_connecting = speech.match(speech.samples(connecting), out, rate)
    at_hold = speech.match(speech.samples(hold), out, rate)
    assert at_connecting.correlation > 0.95 and at_hold.correlation > 0.95
    assert at_hold.delay == pytest.approx(at_connecting.delay + 2.0, abs=0.03)  # one after the other
    sent = speech.samples(b"".join(stream.sent))
    assert speech.match(world, sent, RATE).correlation > 0.6  # the caller's voice went into the call ...
    assert speech.match(operator[: RATE], sent, RATE).correlation < 0.15  # ... without the operator's echo
    assert speech.match(operator[: RATE], out, rate).correlation > 0.95  # whom the speaker played


# -- ALSA, the command line ---------------------------------------------------------------------------

def test_alsa_card_opens_alsa_s_null_device_and_moves_frames() -> None:
    from sip_refuge.post.alsa import AlsaCard

    card = AlsaCard("null", RATE)
    try:
        assert len(card.capture()) == FRAME
        card.play(bytes(FRAME))
    finally:
        card.close()


def test_alsa_card_that_does_not_exist_is_a_clear_error() -> None:
    from sip_refuge.post.alsa import AlsaCard

    with pytest.raises(RefugeError, match="sound card 'no-such-card'"):
        AlsaCard("no-such-card", RATE)


def test_post_command_line_builds_the_mock_card_and_refuses_half_of_it(tmp_path: Path) -> None:
    parse = build_parser().parse_args
    args = parse(["post", "site.yaml", "--post", "p", "--audio-in", "in.wav", "--audio-out", "out.wav"])
    assert sound_for(args) == Sound("default", Path("in.wav"), Path("out.wav"))
    assert sound_for(parse(["post", "site.yaml", "--post", "p", "--gpio", "mock"])) == Sound("null")
    assert sound_for(parse(["post", "site.yaml", "--post", "p", "--audio", "plughw:1"])) == Sound("plughw:1")
    with pytest.raises(RefugeError, match="--audio-in and --audio-out go together"):
        sound_for(parse(["post", "site.yaml", "--post", "p", "--audio-in", "in.wav"]))
    with pytest.raises(RefugeError, match="give one or the other"):
        sound_for(parse(["post", "site.yaml", "--post", "p", "--audio", "hw:0", "--audio-in", "a", "--audio-out", "b"]))
    assert "--audio-in" in build_parser()._subparsers._group_actions[0].choices["post"].format_help()  # type: ignore[union-attr]


def test_config_check_warns_when_this_machine_cannot_cancel_echo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from sip_refuge.cli import main
    from tests.support.sites import agent_site

    example = str(agent_site(tmp_path).path)
    assert main(["config", "check", example]) == 0
    assert "warning" not in capsys.readouterr().err
    monkeypatch.setattr(aec, "available", lambda: False)
    assert main(["config", "check", example]) == 0  # a warning, not an error
    err = capsys.readouterr().err
    assert "warning: posts: libspeexdsp.so.1 (Debian package libspeexdsp1) is not installed" in err
    assert "send the operator's own voice back to the desk" in err
