"""What the post-agent benches share: a site on free loopback ports, the in-process agent with a state log,
a telemetry sink standing in for the sidecar, process resource samples, percentiles and the machine header.

The agent is built exactly as ``sip-refuge post --gpio mock --audio null`` builds it
(:func:`sip_refuge.post.agent.build_runner`) and runs in a thread; presses drive its MockPanel pin, so they
go through gpiozero like a real button edge.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from sip_refuge.config import Site  # noqa: E402
from sip_refuge.pbx.asterisk import Asterisk  # noqa: E402
from sip_refuge.post.agent import build_runner  # noqa: E402
from sip_refuge.post.events import CallAnswered, Event  # noqa: E402
from sip_refuge.post.runner import PostRunner  # noqa: E402
from sip_refuge.post.soundcard import Sound  # noqa: E402
from tests.support import waiting  # noqa: E402
from tests.support.sipua import SipPeer  # noqa: E402
from tests.support.sites import agent_site  # noqa: E402

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config" / "site.example.yaml"
DESK = "desk-1"


# -- the site and the PBX ---------------------------------------------------------------------------------

def make_site(folder: Path, *, sidecar_port: int | None = None) -> Site:
    return agent_site(folder, sidecar_port=sidecar_port)


def wait_for(probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.005) -> T:
    """The shared helper, polling tighter: benches time milliseconds."""
    return waiting.wait_for(probe, timeout, what, interval)


def desk_ready(pbx: Asterisk, site: Site, desk: str = DESK) -> bool:
    """The queue would ring ``desk`` now (registered, qualified, not in use)."""
    return bool(re.search(rf"\(PJSIP/{re.escape(desk)}\).*\(Not in use\)", pbx.cli(f"queue show {site.queue.name}")))


def pbx_idle(pbx: Asterisk) -> bool:
    return "0 active channels" in pbx.cli("core show channels count")


def settle(pbx: Asterisk, site: Site, timeout: float = 15.0) -> None:
    """No channel left and the desk free in the queue; a stuck channel is hung up rather than waited out."""
    try:
        wait_for(lambda: pbx_idle(pbx) and desk_ready(pbx, site), timeout, "idle Asterisk with desk-1 free", 0.02)
    except TimeoutError:
        pbx.cli("channel request hangup all")
        wait_for(lambda: pbx_idle(pbx) and desk_ready(pbx, site), timeout, "idle Asterisk after hangup all", 0.05)


def registered_desk(site: Site, pbx: Asterisk) -> SipPeer:
    """A bare SIP client registered as desk-1, once Asterisk is idle and the queue would ring it."""
    d = site.desk(DESK)
    desk = SipPeer(d.id, d.secret.read(), (site.pbx.host, site.pbx.sip_port), display=d.name)
    if desk.register(expires=600).code != 200:
        raise RuntimeError("desk-1 could not register")
    settle(pbx, site)
    return desk


# -- the agent ----------------------------------------------------------------------------------------------

class StateLog:
    """Every state the runner published, stamped on the runner's thread the moment its step finished.

    Hooks ``runner.step`` (the instance attribute shadows the method ``run`` calls): nothing in the product
    polls or sleeps for it. ``dials`` holds when the runner handed each Dial to the SIP backend.
    """

    def __init__(self, runner: PostRunner) -> None:
        self.runner = runner
        self.clock = runner.clock
        self.entries: list[tuple[float, str]] = [(self.clock(), str(runner.machine.state))]
        self.dials: list[float] = []
        self.answers: list[float] = []  # when the SIP backend emitted CallAnswered
        self._cond = threading.Condition()
        step, dial, emit = runner.step, runner.backend.dial, runner.emit

        def hooked_step(event: Event) -> None:
            step(event)
            state = str(runner.machine.state)
            if state != self.entries[-1][1]:
                with self._cond:
                    self.entries.append((self.clock(), state))
                    self._cond.notify_all()

        def hooked_dial(call_id: str, extension: str, host: str, selftest: bool) -> None:
            self.dials.append(self.clock())
            dial(call_id, extension, host, selftest)

        def hooked_emit(event: Event) -> None:
            if isinstance(event, CallAnswered):
                self.answers.append(self.clock())
            emit(event)

        # run() hands ``self.emit`` to the backend when it starts, so the backend's events come through here.
        runner.emit = hooked_emit  # type: ignore[method-assign]
        runner.step = hooked_step  # type: ignore[method-assign]
        runner.backend.dial = hooked_dial  # type: ignore[method-assign]

    @property
    def state(self) -> str:
        return self.entries[-1][1]

    def wait(self, state: str, *, after: float, timeout: float = 10.0) -> float:
        """When the runner first published ``state`` at or after ``after``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = next((at for at, s in self.entries if s == state and at >= after), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"post not {state} within {timeout} s (states since: "
                                       f"{[s for at, s in self.entries if at >= after]})")
                self._cond.wait(left)

    def trim(self) -> None:
        """Forget all but the current state (a soak must not grow its own bookkeeping)."""
        with self._cond:
            del self.entries[:-1]
            self.dials.clear()
            self.answers.clear()


class InProcessPost:
    """``sip-refuge post SITE --post ID --gpio mock --audio null`` in a thread of this process."""

    def __init__(self, site: Site, post_id: str, state_dir: Path) -> None:
        self.post = site.post(post_id)
        self.runner = build_runner(site, self.post, gpio="mock", sound=Sound(),
                                   spool=state_dir / f"post-{post_id}-telemetry.jsonl")
        self.log = StateLog(self.runner)
        self.thread = threading.Thread(target=self.runner.run, name=f"agent-{post_id}", daemon=True)

    def __enter__(self) -> InProcessPost:
        self.thread.start()
        wait_for(lambda: self.runner.status().get("state") == "idle" and self.runner.status().get("registered"),
                 30, f"post {self.post.id} idle and registered", 0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.runner.stop_event.set()
        self.thread.join(30)
        if self.thread.is_alive():
            raise RuntimeError(f"post {self.post.id}: the runner did not stop within 30 s")

    def press(self) -> float:
        """Drive the button pin low (and high again); returns the time just before the edge."""
        panel: Any = self.runner.panel
        at = self.runner.clock()
        panel.press()
        return at


# -- a sidecar stand-in ----------------------------------------------------------------------------------------

def _serve_telemetry(ports: Any) -> None:
    received = 0

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            nonlocal received
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            received += 1
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    ports.put(server.server_address[1])
    server.serve_forever(poll_interval=0.2)


class TelemetrySink:
    """Accepts the agent's telemetry POSTs with 204: the sidecar's route, minus the sidecar.

    It runs in its own process, as the sidecar does: in this one it would compete with the agent for the GIL.
    """

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._ports: Any = ctx.Queue()
        self.process = ctx.Process(target=_serve_telemetry, args=(self._ports,), name="telemetry-sink", daemon=True)
        self.port = 0

    def __enter__(self) -> TelemetrySink:
        self.process.start()
        self.port = int(self._ports.get(timeout=30))
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.join(10)
        self._ports.close()
        self._ports.join_thread()


# -- numbers and the header ------------------------------------------------------------------------------------

def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile (p95 of 50 samples is the 48th smallest)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, -(-int(share * 1000) * len(ordered) // 1000))  # ceil(share * n) without float error
    return ordered[min(len(ordered), rank) - 1]


def resources() -> dict[str, float]:
    """This process now: Python threads, OS threads, open fds, RSS (MiB)."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {"py_threads": threading.active_count(), "os_threads": int(status["Threads"]),
            "fds": len(os.listdir("/proc/self/fd")), "rss_mib": int(status["VmRSS"].split()[0]) / 1024}


def machine_lines(pbx: Asterisk | None = None) -> list[str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "?")
    nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=False).stdout.strip() or str(os.cpu_count())
    versions = []
    for dist in ("pjsua2", "pyVoIP", "gpiozero"):  # pjsua2: the SWIG binding `make venv` builds
        try:
            versions.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist} not installed")
    lines = [f"- date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
             f"- machine: {nproc} CPUs (nproc), {cpu}, {platform.system()} {platform.release()}",
             f"- Python {platform.python_version()}; {', '.join(versions)}"]
    if pbx is not None:
        lines.append(f"- {pbx.install.version()} on loopback (UDP)")
    return lines


def quiet_logs(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
