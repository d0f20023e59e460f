"""CPU and memory of camera probing: 20 post cameras, served by one test RTSP camera server, probed by
:class:`CameraMonitor` the way the sidecar does.

    .venv/bin/python bench/camera_probe.py [--cameras 20] [--rounds 3] [--interval 60] [--watch 65]

Measured in one run and printed as a Markdown table:
- baseline: a bare ``cv2.VideoCapture`` open + read of one frame (what any RTSP client pays);
- a probe: ``CameraMonitor.probe`` (open, two frames, shrink, analyse, thumbnail, close), wall and CPU time,
  p50/p95 over ``rounds`` x ``cameras`` probes;
- a stream kept open and decoded instead (the alternative to reopening), CPU per second for one camera;
- the monitor thread really running at ``interval`` for ``watch`` seconds: the process's CPU% and RSS.
CPU is this process's (all threads: FFmpeg's too); the camera server is a separate process and not counted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sip_refuge.config.model import Camera  # noqa: E402 (after the path set-up above)
from sip_refuge.sidecar.cameras import FFMPEG_OPTIONS, CameraMonitor, CameraProbe  # noqa: E402
from tests.support.rtsp_camera import TestCamera  # noqa: E402


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(action: Callable[[], object]) -> tuple[float, float]:
    """Wall and process CPU seconds of ``action`` (run alone, so the process CPU is its own)."""
    wall, cpu = time.perf_counter(), time.process_time()
    action()
    return time.perf_counter() - wall, time.process_time() - cpu


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def row(name: str, samples: list[tuple[float, float]]) -> str:
    walls, cpus = [w * 1000 for w, _ in samples], [c * 1000 for _, c in samples]
    return (f"| {name} | {len(samples)} | {percentile(walls, .5):.0f} | {percentile(walls, .95):.0f} | "
            f"{percentile(cpus, .5):.1f} | {percentile(cpus, .95):.1f} |")


def bare_open_read(url: str) -> None:
    import cv2

    capture = cv2.VideoCapture(url, cv2.CAP_FFMPEG)
    ok, _ = capture.read()
    capture.release()
    if not ok:
        raise SystemExit(f"baseline read failed: {url}")


def kept_open(probe: CameraProbe, seconds: float) -> float:
    """CPU seconds per second of one stream kept open and decoded (grab() every frame, as a viewer would)."""
    capture = probe.open()
    try:
        capture.read()  # past the key-frame wait
        cpu, end = time.process_time(), time.monotonic() + seconds
        while time.monotonic() < end:
            capture.grab()
        return (time.process_time() - cpu) / seconds
    finally:
        capture.release()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cameras", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="probe rounds over all cameras, timed one by one")
    parser.add_argument("--interval", type=float, default=60.0, help="the monitor's interval (site default 60)")
    parser.add_argument("--watch", type=float, default=65.0, help="seconds to run the monitor thread for")
    args = parser.parse_args()
    mounts = [f"/cam{i:02d}" for i in range(1, args.cameras + 1)]
    rss_start = rss_mib()
    with TestCamera(mounts) as server:
        cameras = {m.strip("/"): Camera(server.url(m)) for m in mounts}
        changes: list[tuple[str, bool, str]] = []
        monitor = CameraMonitor(cameras, interval=args.interval, on_change=lambda *c: changes.append(c))
        post_ids = list(cameras)
        os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = FFMPEG_OPTIONS  # the baseline opens as the probe does
        bare_open_read(server.url(mounts[0]))  # warm-up: FFmpeg and the server's first pipeline
        baseline = [measure(partial(bare_open_read, server.url(m))) for m in mounts[: min(10, len(mounts))]]
        probes = [measure(partial(monitor.probe, p)) for _ in range(args.rounds) for p in post_ids]
        rss_probed = rss_mib()
        faults = [c for c in changes if not c[1]]
        open_cpu = kept_open(monitor.probes[post_ids[0]], 10.0)
        # The monitor as the sidecar runs it: its own thread, the real interval, a fresh monitor.
        live = CameraMonitor(cameras, interval=args.interval, on_change=lambda *c: None)
        cpu, wall = time.process_time(), time.monotonic()
        stop = threading.Event()
        thread = threading.Thread(target=live.run, args=(stop,))
        thread.start()
        time.sleep(args.watch)
        stop.set()
        thread.join()
        watched_cpu, watched = time.process_time() - cpu, time.monotonic() - wall
        live_probes = sum(s.probes for s in live.states().values())
        rss_end = rss_mib()

    per_round_cpu = statistics.fmean(c for _, c in probes) * len(post_ids)
    print(f"## Camera probing: {len(post_ids)} cameras (640x360 H.264, 15 fps, RTSP over TCP on loopback), "
          f"{os.cpu_count()} CPUs\n")
    print("| measurement | n | wall p50 (ms) | wall p95 (ms) | CPU p50 (ms) | CPU p95 (ms) |")
    print("|---|---|---|---|---|---|")
    print(row("baseline: bare cv2.VideoCapture open + read 1 frame", baseline))
    print(row("CameraMonitor.probe (open, 2 frames, analyse, thumbnail, close)", probes))
    print()
    print("| figure | value |")
    print("|---|---|")
    print(f"| probe CPU per round of {len(post_ids)} cameras | {per_round_cpu * 1000:.0f} ms |")
    print(f"| process CPU at a {args.interval:.0f} s interval, from per-probe cost | "
          f"{100 * per_round_cpu / args.interval:.2f} % of one core |")
    print(f"| process CPU measured: monitor thread for {watched:.0f} s ({live_probes} probes) | "
          f"{100 * watched_cpu / watched:.2f} % of one core |")
    print(f"| one stream kept open and decoded instead | {100 * open_cpu:.2f} % of one core per camera "
          f"({100 * open_cpu * len(post_ids):.0f} % for {len(post_ids)}) |")
    print(f"| RSS: start / after {len(probes)} probes / end | {rss_start:.0f} / {rss_probed:.0f} / "
          f"{rss_end:.0f} MiB |")
    print(f"| faults reported while probing healthy cameras | {len(faults)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
