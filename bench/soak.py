"""A long soak of the post agent: many alarm calls in a row, watching threads, file descriptors and RSS.

    .venv/bin/python bench/soak.py [--calls 1000] [--backends pjsua2,pyvoip] [--every 50] [--warmup 100]
                                   [--call-seconds 0.2] [--timeout 1500] [--sidecar up|down]

Not part of ``make test``. One Asterisk 22 on loopback; the desk is a pyVoIP desk robot
(:class:`tests.support.desk_robot.DeskRobot`, answering at once) in a child process, so this process holds
only the post agent (built by ``build_runner(gpio="mock")``, run in a thread, as ``sip-refuge post`` does)
and a telemetry sink standing in for the sidecar. Each call: a press on the MockPanel pin, the desk answers
after ~0 s, the call stays up ``--call-seconds``, the desk hangs up, the post is back to ``idle``.

Every ``--every`` calls, with the post idle, it samples this process: Python threads
(``threading.active_count()``), OS threads (``Threads`` in /proc/self/status), open fds (/proc/self/fd) and
RSS (``VmRSS``). The verdict compares the sample after ``--warmup`` calls with the last one: no more
threads, no more fds, RSS within 10 %. It stops by itself: bounded calls per backend and a global
``--timeout`` (and a hard watchdog a few minutes after it). A measurement: it always exits 0.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import multiprocessing
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402 (after the path set-up above)
    DESK,
    InProcessPost,
    TelemetrySink,
    machine_lines,
    make_site,
    percentile,
    quiet_logs,
    resources,
    settle,
    wait_for,
)
from sip_refuge.config import Site, load_site  # noqa: E402
from sip_refuge.pbx.asterisk import Asterisk, free_port  # noqa: E402
from tests.support.sites import POSTS  # noqa: E402

RSS_LIMIT = 0.10  # RSS at the end within 10 % of the warm-up sample


def desk_main(site_path: str, stop: Any, ready: Any, call_seconds: float) -> None:
    """The desk in its own process: answer every ring at once, hang up after ``call_seconds``."""
    from tests.support.desk_robot import DeskRobot

    quiet_logs(False)
    site = load_site(Path(site_path))
    d = site.desk(DESK)
    with DeskRobot(d.id, d.secret.read(), (site.pbx.host, site.pbx.sip_port), answer_after=0.0,
                   display=d.name) as desk:
        desk.wait_registered(30)
        ready.set()
        n = 0
        while not stop.is_set():
            try:
                ring = desk.wait_ring(timeout=0.5, index=n)
            except TimeoutError:
                continue
            n += 1
            try:
                desk.wait_answered(ring, timeout=10)
            except TimeoutError:
                continue  # cancelled before the answer: nothing to hang up
            time.sleep(call_seconds)
            desk.hangup(ring)


@dataclass
class Sample:
    calls: int
    elapsed: float
    res: dict[str, float]
    window_ms: list[float] = field(default_factory=list)  # press -> connected of the calls since the last sample


@dataclass
class Soak:
    backend: str
    planned: int
    done: int = 0
    samples: list[Sample] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stopped: str = ""


def run_backend(site: Site, pbx: Asterisk, backend: str, args: argparse.Namespace, state_dir: Path,
                deadline: float) -> Soak:
    soak = Soak(backend, args.calls)
    started = time.monotonic()
    window: list[float] = []
    consecutive = 0
    with InProcessPost(site, POSTS[backend], state_dir) as agent:
        log = agent.log
        gc.collect()
        soak.samples.append(Sample(0, 0.0, resources()))
        for n in range(1, args.calls + 1):
            if time.monotonic() > deadline:
                soak.stopped = f"global timeout ({args.timeout:.0f} s) reached after {soak.done} calls"
                break
            try:
                settle(pbx, site)
                edge = agent.press()
                window.append((log.wait("connected", after=edge, timeout=20) - edge) * 1000)
                log.wait("idle", after=edge, timeout=20)
                soak.done += 1
                consecutive = 0
            except Exception as exc:  # noqa: BLE001 - one bad call is counted, the soak goes on
                soak.failures.append(f"call {n}: {exc}")
                consecutive += 1
                pbx.cli("channel request hangup all")
                try:
                    log.wait("idle", after=0.0, timeout=30)
                except TimeoutError:
                    pass
                if consecutive >= 10:
                    soak.stopped = f"10 calls in a row failed (last: {exc})"
                    break
            log.trim()
            if n % args.every == 0 or n == args.calls:
                if args.sidecar == "up":  # no report in flight: its socket would count as an fd
                    try:
                        wait_for(lambda: agent.runner.telemetry.pending() == 0, 5, "telemetry sent", 0.01)
                    except TimeoutError:
                        pass
                gc.collect()
                soak.samples.append(Sample(n, time.monotonic() - started, resources(), window))
                window = []
                last = soak.samples[-1]
                print(f"# {backend}: {n} calls, {last.elapsed:.0f} s, {last.res}", flush=True)
        if window:
            gc.collect()
            soak.samples.append(Sample(soak.done + len(soak.failures), time.monotonic() - started, resources(), window))
    return soak


def report(soak: Soak, warmup: int) -> list[str]:
    out = [f"### {soak.backend}: {soak.done} of {soak.planned} calls completed"
           + (f", {len(soak.failures)} failed" if soak.failures else "")
           + (f" — stopped early: {soak.stopped}" if soak.stopped else ""), "",
           "| after call | elapsed s | Python threads | OS threads | open fds | RSS MiB | press→connected p50 ms | max ms |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in soak.samples:
        p50 = f"{percentile(s.window_ms, .5):.1f}" if s.window_ms else ""
        worst = f"{max(s.window_ms):.1f}" if s.window_ms else ""
        out.append(f"| {s.calls} | {s.elapsed:.0f} | {s.res['py_threads']:.0f} | {s.res['os_threads']:.0f} | "
                   f"{s.res['fds']:.0f} | {s.res['rss_mib']:.1f} | {p50} | {worst} |")
    out.append("")
    ref = next((s for s in soak.samples if s.calls >= warmup), None)
    end = soak.samples[-1] if soak.samples else None
    if ref is None or end is None or end is ref:
        out.append(f"**Verdict ({soak.backend}): not enough calls after the {warmup}-call warm-up to judge**")
        return out
    threads_ok = end.res["os_threads"] <= ref.res["os_threads"] and end.res["py_threads"] <= ref.res["py_threads"]
    fds_ok = end.res["fds"] <= ref.res["fds"]
    growth = end.res["rss_mib"] / ref.res["rss_mib"] - 1
    rss_ok = growth <= RSS_LIMIT
    verdict = "PASS" if threads_ok and fds_ok and rss_ok and not soak.failures else "FAIL"
    out.append(f"**Verdict ({soak.backend}, call {ref.calls} vs call {end.calls}): {verdict}** — "
               f"OS threads {ref.res['os_threads']:.0f} → {end.res['os_threads']:.0f} "
               f"({'no growth' if threads_ok else 'GROWTH'}), "
               f"Python threads {ref.res['py_threads']:.0f} → {end.res['py_threads']:.0f}, "
               f"fds {ref.res['fds']:.0f} → {end.res['fds']:.0f} ({'no growth' if fds_ok else 'GROWTH'}), "
               f"RSS {ref.res['rss_mib']:.1f} → {end.res['rss_mib']:.1f} MiB ({growth:+.1%}, limit +{RSS_LIMIT:.0%})"
               + (f"; {len(soak.failures)} failed calls" if soak.failures else ""))
    for failure in soak.failures[:10]:
        out.append(f"- failed: {failure}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="calls per backend")
    parser.add_argument("--backends", default="pjsua2,pyvoip")
    parser.add_argument("--every", type=int, default=50, help="sample resources every N calls")
    parser.add_argument("--warmup", type=int, default=100, help="calls before the reference sample")
    parser.add_argument("--call-seconds", type=float, default=0.2, help="how long each answered call stays up")
    parser.add_argument("--timeout", type=float, default=1500.0, help="global limit in seconds for all backends")
    parser.add_argument("--sidecar", choices=("up", "down"), default="up",
                        help="up: a sink accepts telemetry; down: nothing listens (telemetry piles up, bounded)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    quiet_logs(args.verbose)
    # The hard stop, should anything hang (a join, a wait without deadline): dump every stack and exit.
    faulthandler.dump_traceback_later(args.timeout + 300, exit=True)
    deadline = time.monotonic() + args.timeout
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    soaks: list[Soak] = []
    header: list[str] = []
    started = time.monotonic()
    ctx = multiprocessing.get_context("spawn")
    try:
        with tempfile.TemporaryDirectory(prefix="soak-") as tmp, TelemetrySink() as sink:
            site = make_site(Path(tmp) / "site", sidecar_port=sink.port if args.sidecar == "up" else free_port())
            with Asterisk(site, command="bench/soak.py", boot_timeout=60) as pbx:
                header = machine_lines(pbx)
                stop, ready = ctx.Event(), ctx.Event()
                desk = ctx.Process(target=desk_main, args=(str(site.path), stop, ready, args.call_seconds),
                                   name="desk-robot", daemon=True)
                desk.start()
                try:
                    if not ready.wait(60):
                        raise RuntimeError("the desk robot did not register within 60 s")
                    for backend in backends:
                        print(f"# {backend}: {args.calls} calls ...", flush=True)
                        soaks.append(run_backend(site, pbx, backend, args, Path(tmp) / f"state-{backend}", deadline))
                finally:
                    stop.set()
                    desk.join(15)
                    if desk.is_alive():
                        desk.kill()
    except Exception:  # noqa: BLE001 - a measurement: print what we have and say what broke
        traceback.print_exc()
        print("\n**The run broke off early; the tables hold what was measured before.**")
    faulthandler.cancel_dump_traceback_later()

    print(f"\n## Soak: {args.calls} alarm calls per backend, desk answers at once, "
          f"{args.call_seconds:g} s calls, desk hangs up\n")
    print("\n".join(header or machine_lines()))
    print(f"- resources sampled every {args.every} calls with the post idle (after gc.collect()); reference: "
          f"the sample after {args.warmup} calls; sidecar {args.sidecar}; run took {time.monotonic() - started:.0f} s")
    print("- this process holds the post agent only; the desk robot, the telemetry sink and Asterisk run "
          "in their own processes\n")
    for soak in soaks:
        print("\n".join(report(soak, args.warmup)))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
