"""Run a whole post agent for integration tests: in this process, or as ``sip-refuge post`` in its own.

Both kinds are driven the same way a person drives the demo: through the agent's control socket, which
is what ``sip-refuge press`` and ``sip-refuge status`` use (:func:`cli` runs those commands for real).

:class:`InProcessAgent` builds the runner exactly as ``sip-refuge post --gpio mock --audio null`` does
(:func:`sip_refuge.post.agent.build_runner` plus the control server) and runs it in a thread, so a test
can also reach the running SIP backend (``on_dtmf``, ``send_dtmf``) to prove media flows. pjsua2 allows
one library per process: run one in-process pjsua2 agent at a time.

:class:`AgentProcess` runs the console script itself (argument parsing, logging, signals included).

Every agent keeps its telemetry outbox in its own state directory; with no sidecar listening, the spool
holds every report the agent made, which tests read with :meth:`Agent.reports`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from sip_refuge.config import Site
from sip_refuge.errors import RefugeError
from sip_refuge.post.agent import build_runner
from sip_refuge.post.control import ControlServer, ask, control_port
from sip_refuge.post.events import Tick
from sip_refuge.post.runner import PostRunner
from sip_refuge.post.sip import SipBackend
from sip_refuge.post.soundcard import Sound
from tests.support.waiting import wait_for

T = TypeVar("T")
SIP_REFUGE = str(Path(sys.executable).with_name("sip-refuge"))
Status = dict[str, Any]




def cli(site: Site, command: str, post_id: str, *, timeout: float = 30.0) -> str:
    """Run ``sip-refuge COMMAND SITE --post ID`` (press, status) and return its stdout; fail on a non-zero exit."""
    done = subprocess.run([SIP_REFUGE, command, str(site.path), "--post", post_id], capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert done.returncode == 0, f"sip-refuge {command} exited {done.returncode}: {done.stderr.strip()}"
    return done.stdout


def cli_status(site: Site, post_id: str) -> Status:
    """``sip-refuge status SITE --post ID``, parsed."""
    status: Status = json.loads(cli(site, "status", post_id))
    return status


def lights(status: Status, yellow: str = "off", green: str = "off", red: str = "off") -> bool:
    """The post's lights in ``status`` are these (each off unless named)."""
    return status.get("lights") == {"yellow": yellow, "green": green, "red": red}


class Agent:
    """What both kinds of agent share: the control socket and the telemetry spool."""

    def __init__(self, site: Site, post_id: str, state_dir: Path) -> None:
        self.site, self.post = site, site.post(post_id)
        self.state_dir = state_dir
        self.port = control_port(site, self.post)
        self.spool = state_dir / f"post-{post_id}-telemetry.jsonl"

    # -- control socket ---------------------------------------------------------------------------------
    def ask(self, cmd: str) -> Status:
        reply = ask(self.port, {"cmd": cmd})
        assert reply.get("ok"), f"post {self.post.id}: {cmd} refused: {reply}"
        return reply

    def press(self) -> None:
        self.ask("press")

    def selftest(self) -> None:
        self.ask("selftest")

    def status(self) -> Status:
        return self.ask("status")

    def wait_status(self, check: Callable[[Status], bool], timeout: float, what: str) -> Status:
        """Poll the status until ``check`` accepts it; the error shows the last status seen."""
        last: list[Status] = [{}]

        def probe() -> Status | None:
            last[0] = self.status()
            return last[0] if check(last[0]) else None

        try:
            return wait_for(probe, timeout, what)
        except AssertionError:
            raise AssertionError(f"post {self.post.id}: no {what} within {timeout} s; last status {last[0]}") from None

    def wait_state(self, state: str, timeout: float = 10.0) -> Status:
        return self.wait_status(lambda s: s.get("state") == state, timeout, f"state {state}")

    # -- telemetry spool ------------------------------------------------------------------------------
    def reports(self, kind: str | None = None, **match: Any) -> list[dict[str, Any]]:
        """Telemetry reports kept in the outbox (no sidecar listens), oldest first, filtered by kind and fields."""
        try:
            lines = self.spool.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        found = [json.loads(line) for line in lines if line.strip()]
        return [r for r in found if (kind is None or r.get("kind") == kind)
                and all(r.get(k) == v for k, v in match.items())]

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class InProcessAgent(Agent):
    """``sip-refuge post SITE --post ID --gpio mock`` (``--audio null``, or the mock card ``sound``) built in this
    process, its runner in a thread."""

    def __init__(self, site: Site, post_id: str, state_dir: Path, sound: Sound | None = None) -> None:
        super().__init__(site, post_id, state_dir)
        self.runner: PostRunner = build_runner(site, self.post, gpio="mock", sound=sound or Sound(),
                                               spool=self.spool)
        self.server: ControlServer | None = None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.heard: list[tuple[str, str]] = []  # (call id, digit) the backend received, once hear_dtmf() is on
        self._heard_cond = threading.Condition()

    @property
    def backend(self) -> SipBackend:
        return self.runner.backend

    # -- media: RFC 4733 digits through the running backend ------------------------------------------
    def hear_dtmf(self) -> None:
        """Record every digit the backend receives from now on (both backends have the ``on_dtmf`` hook)."""
        backend: Any = self.backend  # on_dtmf is not part of the SipBackend Protocol
        backend.on_dtmf = self._on_dtmf

    def _on_dtmf(self, call_id: str, digit: str) -> None:  # the backend's thread: record and wake, nothing more
        with self._heard_cond:
            self.heard.append((call_id, digit))
            self._heard_cond.notify_all()

    def wait_dtmf(self, digit: str, timeout: float) -> str | None:
        """The id of the call on which ``digit`` arrived, or None if it did not within ``timeout``."""
        with self._heard_cond:
            found = self._heard_cond.wait_for(lambda: next((c for c, d in self.heard if d == digit), None), timeout)
        return found

    def send_dtmf(self, call_id: str, digits: str) -> None:
        self.backend.send_dtmf(call_id, digits)

    def start(self) -> None:
        self.server = ControlServer(self.port, self.runner.control)
        self.server.start()
        self.thread = threading.Thread(target=self._run, name=f"agent-{self.post.id}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.runner.run()
        except BaseException as exc:  # the test thread reports it: a runner must never die
            self.error = exc
            raise

    def stop(self) -> None:
        self.runner.stop_event.set()
        self.runner.emit(Tick())  # wakes the loop now rather than at its next one-second turn
        if self.thread is not None:
            self.thread.join(30)
            assert not self.thread.is_alive(), f"post {self.post.id}: the runner did not stop within 30 s"
        if self.server is not None:
            self.server.stop()
        assert self.error is None, f"post {self.post.id}: the runner died: {self.error!r}"


class AgentProcess(Agent):
    """``sip-refuge post SITE --post ID --gpio mock --state-dir DIR`` as a child process; its log in ``log_path``.
    With ``audio`` (IN.wav, OUT.wav) it runs on the mock sound card (``--audio-in``, ``--audio-out``)."""

    def __init__(self, site: Site, post_id: str, state_dir: Path, *, audio: tuple[Path, Path] | None = None) -> None:
        super().__init__(site, post_id, state_dir)
        self.log_path = state_dir / f"post-{post_id}.log"
        self.audio = audio
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        argv = [SIP_REFUGE, "post", str(self.site.path), "--post", self.post.id, "--gpio", "mock",
                "--state-dir", str(self.state_dir)]
        if self.audio is not None:
            argv += ["--audio-in", str(self.audio[0]), "--audio-out", str(self.audio[1])]
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})

        def answering() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"sip-refuge post exited {self.proc.returncode}:\n{self.log()}")
            try:
                self.status()
            except RefugeError:
                return False
            return True

        wait_for(answering, 30, f"control socket of post {self.post.id} on 127.0.0.1:{self.port}")

    def pause(self) -> None:
        """Freeze the agent (SIGSTOP): its timers and retransmissions wait until :meth:`resume`."""
        assert self.proc is not None and self.proc.poll() is None
        self.proc.send_signal(signal.SIGSTOP)

    def kill(self) -> None:
        """SIGKILL: the post dies as when its power or its Pi fails; nothing is said to anyone."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            proc.wait()

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)  # in case a failed test left it paused
        proc.send_signal(signal.SIGTERM)  # what systemd sends: the agent hangs up, unregisters and exits 0
        try:
            code = proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"sip-refuge post ignored SIGTERM for 20 s:\n{self.log()[-3000:]}") from None
        assert code == 0, f"sip-refuge post exited {code} on SIGTERM:\n{self.log()[-3000:]}"
