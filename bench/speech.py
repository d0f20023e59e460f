"""Speech through a post: mouth-to-ear delay both ways and PESQ, per backend and codec, against a baseline.

    .venv/bin/python bench/speech.py [--talk 30] [--cases baseline-PCMU,pjsua2-PCMU,...]

Every end of every call is a mock sound card (:class:`sip_refuge.post.sound.MockCard`), which takes in one IN.wav
sample for each sample it plays into OUT.wav. Another process watches every OUT.wav grow against
``time.monotonic()`` (:class:`Watch`), so the time each sample left a speaker, and each IN.wav sample entered a
microphone, is known without trusting any card's clock. A voice (espeak-ng, a sentence of about 5 s, then 3 s of
silence, looped) is found in the other end's OUT.wav by cross-correlation, occurrence by occurrence:
mouth-to-ear delay is when it left that speaker minus when it entered the microphone; PESQ (ITU-T P.862 through
the ``pesq`` package; narrowband, and wideband too for G.722) compares each occurrence with the sentence.
(The pyVoIP post's card runs at 8 kHz and its OUT.wav is converted to 16 kHz; the converter's start makes its
writes look up to 8 ms late, which the figures for pyVoIP carry.)

**Baseline**: two bare pjsua2 clients (:mod:`bench.speech_client`, no post logic, no echo path, no canceller)
through the same Asterisk with the same codec: desk-2 calls desk-1 (Dial; the post's call goes through Queue). **Post**: the post agent in this process
(built as ``sip-refuge post --audio-in --audio-out`` builds it: its echo path and echo canceller on) presses;
desk-1 (the same bare client) answers. Each direction is measured in its own call with the other side silent
(single talk, as PESQ is meant to be used): the caller speaks and the desk is silent, then the desk speaks.
Targets (issue 10): delay within baseline + 20 ms, PESQ within 0.2 of baseline. A measurement: it exits 0.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import DESK, machine_lines, pbx_idle, percentile, quiet_logs, settle  # noqa: E402
from sip_refuge.config import Site  # noqa: E402
from sip_refuge.pbx.asterisk import Asterisk  # noqa: E402
from sip_refuge.post import speech  # noqa: E402
from sip_refuge.post.agent import build_runner  # noqa: E402
from sip_refuge.post.sip.pjsua2_api import MediaSettings  # noqa: E402
from sip_refuge.post.sound import Sound  # noqa: E402
from tests.support.audio import read_wav, write_wav  # noqa: E402
from tests.support.sites import POSTS, agent_site  # noqa: E402

RATE = 16000
GAP = 3.0  # s of silence after each sentence
CALLER = "Help me please. A man is following me, I am at the market place, next to the bus stop."
OPERATOR = "This is the control room. Stay where you are, I can see you on the camera. Help is on its way."
CASES = ("baseline-PCMU", "baseline-G722", "pjsua2-PCMU", "pjsua2-G722", "pyvoip-PCMU")
CODECS = {"PCMU": "PCMU/8000", "G722": "G722/16000"}
CLIENT = Path(__file__).with_name("speech_client.py")


def sentence(text: str, folder: Path, name: str) -> np.ndarray:
    """``text`` spoken by espeak-ng (Debian), at 16 kHz, about -20 dBFS."""
    raw = folder / f"{name}-espeak.wav"
    subprocess.run(["espeak-ng", "-v", "en", "-s", "150", "-w", str(raw), text], check=True)
    x, rate = read_wav(raw)
    x = speech.resample(x, rate, RATE)
    return x * (0.1 / max(1e-6, float(np.sqrt(np.mean(x * x)))))


WATCHER = """
import sys, time, wave
paths = sys.argv[1:]
def frames(path):
    try:
        with wave.open(path, "rb") as w:
            return w.getnframes()
    except Exception:
        return -1
while True:
    line = " ".join([repr(time.monotonic())] + [str(frames(p)) for p in paths])
    print(line, flush=True)
    time.sleep(0.004)
"""


class Watch:
    """When each frame of the OUT.wav files was written, i.e. played: another process reads their headers every
    4 ms with ``time.monotonic()`` (the same clock for every process here), so the post's process is not slowed
    and no card is trusted to keep wall-clock time (a stalled clock thread shifts its samples for good)."""

    def __init__(self, *paths: Path) -> None:
        self.paths = paths
        self.log = paths[0].with_suffix(".watch")  # a file, not a pipe: a full pipe would stop the watcher
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-c", WATCHER, *map(str, paths)], stdout=out, text=True)

    def stop(self) -> list[Clock]:
        self.proc.terminate()
        self.proc.wait()
        lines = self.log.read_text().splitlines()
        rows = [line.split() for line in lines if len(line.split()) == 1 + len(self.paths)]
        times = np.array([float(r[0]) for r in rows])
        clocks = []
        for i in range(len(self.paths)):
            frames = np.array([int(r[1 + i]) for r in rows])
            read = frames >= 0  # -1: the header was being rewritten as it was read
            clocks.append(Clock(times[read], np.maximum.accumulate(frames[read])))
        return clocks


@dataclass
class Clock:
    """(time, frames written) of one OUT.wav: when sample ``n`` left the speaker."""

    times: np.ndarray
    frames: np.ndarray

    def at(self, sample: float) -> float | None:
        """The first time the file held ``sample``; None outside the watched span."""
        index = int(np.searchsorted(self.frames, sample, side="right"))
        if index == 0 or index >= len(self.times):
            return None
        return float(self.times[index])


@dataclass
class End:
    """One end of a call: its mock card's files, and when its OUT.wav's frames were written (:class:`Watch`).
    A card takes in one IN.wav sample for every sample it plays, so IN sample ``k`` (counting the loops) went into
    the microphone when OUT.wav held ``k`` samples."""

    name: str
    audio_in: Path
    audio_out: Path
    clock: Clock | None = None


class Client:
    """A bare pjsua2 client in its own process."""

    def __init__(self, site: Site, user: str, end: End, codec: str, talk: float, call: str | None = None) -> None:
        argv = [sys.executable, str(CLIENT), str(site.path), "--user", user, "--codec", codec,
                "--audio-in", str(end.audio_in), "--audio-out", str(end.audio_out), "--seconds", str(talk)]
        argv += ["--call", call] if call else ["--answer"]
        self.end = end
        self.events: list[dict[str, Any]] = []
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.append(json.loads(line))

    def wait(self, event: str, timeout: float) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            found = [e for e in self.events if e["event"] == event]
            if found:
                return found[0]
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.02)
        err = self.proc.stderr.read() if self.proc.stderr and self.proc.poll() is not None else ""
        raise RuntimeError(f"client {self.end.name}: no {event} ({err.strip()[-500:]})")

    def finish(self) -> None:
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.returncode != 0 and self.proc.stderr is not None:
            print(f"client {self.end.name} exited {self.proc.returncode}: {self.proc.stderr.read()[-800:]}",
                  file=sys.stderr)


@dataclass
class Heard:
    delay: float  # s, mouth to ear
    correlation: float
    pesq_nb: float
    pesq_wb: float | None


def occurrences(voice: np.ndarray, period: float, talker: End, listener: End, wideband: bool) -> list[Heard]:
    """Every whole occurrence of ``voice`` (looped with ``period`` in talker's IN) in listener's OUT."""
    from pesq import pesq

    heard, rate = read_wav(listener.audio_out)
    heard = speech.resample(heard, rate, RATE)
    found = speech.match(voice, heard, RATE)
    if found.correlation < 0.3:
        return []
    results = []
    first = found.delay % period
    n = len(voice)
    for start in np.arange(first, len(heard) / RATE - n / RATE, period):
        lo = max(0, int((start - 0.3) * RATE))
        window = heard[lo:lo + n + int(0.6 * RATE)]
        local = speech.match(voice, window, RATE)
        if local.correlation < 0.5:
            continue  # not connected yet (prompts, ringing) or already hung up
        at = lo / RATE + local.delay  # where the sentence starts in listener's OUT
        assert listener.clock is not None and talker.clock is not None
        ear = listener.clock.at(at * rate)
        loops = [m for m in range(1000) if (t := talker.clock.at(m * period * rate)) is not None and ear is not None
                 and 0 <= ear - t < period]
        if ear is None or not loops:
            continue  # outside the watched span
        mouth = talker.clock.at(loops[0] * period * rate)
        assert mouth is not None
        delay = ear - mouth
        degraded = heard[int(at * RATE):int(at * RATE) + n]
        if len(degraded) < n:
            continue
        nb = pesq(8000, speech.resample(voice, RATE, 8000), speech.resample(degraded, RATE, 8000), "nb")
        wb = pesq(RATE, voice, degraded, "wb") if wideband else None
        results.append(Heard(delay, local.correlation, float(nb), None if wb is None else float(wb)))
    return results


def silent(folder: Path, name: str) -> Path:
    return write_wav(folder / f"{name}-silent.wav", np.zeros(RATE), RATE)


def baseline_call(site: Site, pbx: Asterisk, folder: Path, codec: str, talk: float, caller_in: Path,
                  desk_in: Path) -> tuple[End, End]:
    caller = End("desk-2", caller_in, folder / "caller-out.wav")
    desk = End("desk-1", desk_in, folder / "desk-out.wav")
    answering = Client(site, DESK, desk, codec, talk + 30)
    answering.wait("registered", 20)
    calling = Client(site, "desk-2", caller, codec, talk, call=site.desk(DESK).extension)
    calling.wait("answered", 30)
    watch = Watch(caller.audio_out, desk.audio_out)
    time.sleep(talk)
    caller.clock, desk.clock = watch.stop()
    calling.finish()
    answering.finish()
    return caller, desk


def post_call(site: Site, pbx: Asterisk, folder: Path, backend: str, codec: str, talk: float, caller_in: Path,
              desk_in: Path) -> tuple[End, End]:
    post = site.post(POSTS[backend])
    caller = End(post.id, caller_in, folder / "post-out.wav")
    desk = End("desk-1", desk_in, folder / "desk-out.wav")
    answering = Client(site, DESK, desk, codec, talk + 30)
    answering.wait("registered", 20)
    settle(pbx, site)
    runner = build_runner(site, post, gpio="mock", sound=Sound("null", caller_in, caller.audio_out),
                          spool=folder / "spool.jsonl")
    if backend == "pjsua2":
        runner.backend.media = MediaSettings(codecs=(codec,))  # type: ignore[attr-defined]
    thread = threading.Thread(target=runner.run, name=f"agent-{post.id}", daemon=True)
    thread.start()
    try:
        wait(lambda: runner.status().get("state") == "idle", 30, "post idle")
        runner.press()
        answering.wait("answered", 30)
        wait(lambda: runner.status().get("state") == "connected", 10, "post connected")
        watch = Watch(caller.audio_out, desk.audio_out)
        time.sleep(talk)
        caller.clock, desk.clock = watch.stop()  # the conversation: the cards play on their own clocks meanwhile
    finally:
        runner.stop_event.set()
        thread.join(30)
        answering.finish()
    return caller, desk


def wait(probe: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > end:
            raise RuntimeError(f"no {what} within {timeout} s")
        time.sleep(0.02)


def run_case(case: str, site: Site, pbx: Asterisk, folder: Path, voices: dict[str, np.ndarray],
             talk: float) -> dict[str, list[Heard]]:
    kind, codec_name = case.split("-")
    codec, wideband = CODECS[codec_name], codec_name == "G722"
    results: dict[str, list[Heard]] = {}
    for direction, talker_voice in (("caller->desk", "caller"), ("desk->caller", "operator")):
        phase = folder / case / direction.replace(">", "")
        phase.mkdir(parents=True, exist_ok=True)
        voice = voices[talker_voice]
        looped = write_wav(phase / "voice.wav", np.concatenate([voice, np.zeros(int(GAP * RATE))]), RATE)
        period = len(voice) / RATE + GAP
        caller_in, desk_in = (looped, silent(phase, "desk")) if talker_voice == "caller" else \
            (silent(phase, "caller"), looped)
        wait(lambda: pbx_idle(pbx), 15, "an idle Asterisk")
        if kind == "baseline":
            caller, desk = baseline_call(site, pbx, phase, codec, talk, caller_in, desk_in)
        else:
            caller, desk = post_call(site, pbx, phase, kind, codec, talk, caller_in, desk_in)
        talker, listener = (caller, desk) if talker_voice == "caller" else (desk, caller)
        results[direction] = occurrences(voice, period, talker, listener, wideband)
    return results


def summary(heard: list[Heard]) -> dict[str, float | None]:
    if not heard:
        return {"n": 0, "delay_p50": None, "delay_p95": None, "pesq_nb": None, "pesq_wb": None}
    delays = [h.delay * 1000 for h in heard]
    wb = [h.pesq_wb for h in heard if h.pesq_wb is not None]
    return {"n": len(heard), "delay_p50": percentile(delays, 0.5), "delay_p95": percentile(delays, 0.95),
            "pesq_nb": float(np.median([h.pesq_nb for h in heard])),
            "pesq_wb": float(np.median(wb)) if wb else None}


def table(results: dict[str, dict[str, dict[str, float | None]]]) -> str:
    def cell(value: float | None, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    lines = ["| case | direction | n | delay p50 ms | delay p95 ms | Δ p50 vs baseline ms | PESQ nb | PESQ wb | "
             "Δ PESQ vs baseline | targets |", "|---|---|---|---|---|---|---|---|---|---|"]
    for case, directions in results.items():
        codec = case.split("-")[1]
        base = results.get(f"baseline-{codec}", {})
        for direction, s in directions.items():
            b = base.get(direction, {})
            d_delay = None if s["delay_p50"] is None or b.get("delay_p50") is None else \
                s["delay_p50"] - b["delay_p50"]  # type: ignore[operator]
            key = "pesq_wb" if codec == "G722" else "pesq_nb"
            d_pesq = None if s[key] is None or b.get(key) is None else s[key] - b[key]  # type: ignore[operator]
            ok = "" if case.startswith("baseline") else (
                "met" if d_delay is not None and d_pesq is not None and d_delay <= 20 and d_pesq >= -0.2 else "MISSED")
            lines.append(f"| {case} | {direction} | {s['n']} | {cell(s['delay_p50'], '.1f')} | "
                         f"{cell(s['delay_p95'], '.1f')} | {cell(d_delay, '+.1f')} | {cell(s['pesq_nb'], '.2f')} | "
                         f"{cell(s['pesq_wb'], '.2f')} | {cell(d_pesq, '+.2f')} | {ok} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--talk", type=float, default=30.0, help="seconds of each call after the answer")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--keep", metavar="DIR", help="keep every WAV file in DIR (default: a temporary folder)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    quiet_logs(args.verbose)
    cases = [c for c in args.cases.split(",") if c]
    results: dict[str, dict[str, dict[str, float | None]]] = {}
    with tempfile.TemporaryDirectory(prefix="speech-bench-") as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        voices = {"caller": sentence(CALLER, folder, "caller"), "operator": sentence(OPERATOR, folder, "operator")}
        site = agent_site(folder / "site", queue={"ring_timeout": 20, "max_wait": 60})
        with Asterisk(site, command="bench/speech.py", boot_timeout=60) as pbx:
            for case in cases:
                try:
                    measured = run_case(case, site, pbx, folder, voices, args.talk)
                    results[case] = {d: summary(h) for d, h in measured.items()}
                    print(f"{case}: {json.dumps(results[case])}", flush=True)
                except Exception:  # noqa: BLE001 - a measurement: report the case that failed, go on
                    traceback.print_exc()
                    results[case] = {}
    print()
    print(table(results))
    print()
    print("\n".join(machine_lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
