"""Capacity of the sidecar's HTTP server: posts' telemetry writes and dashboard loads while pages stream.

    .venv/bin/python bench/capacity.py [--writes 200] [--loads 30] [--streams 0,50,200] [--views 20]

The real ``sip-refuge sidecar`` runs as a subprocess, with every post camera on the RTSP test camera. Each
phase first opens its event streams (``/api/v1/events``, from ten loopback addresses) and live camera views
(``/cameras/ID/live.mjpeg``, spread over the three cameras), waits until every stream answers and every view
has shown pictures, then measures, one request after another from 127.0.0.1 (a post's own address here):

- a telemetry write: ``POST /api/v1/posts/ID/telemetry`` with the post's token, on a kept-alive connection.
  Each write is also fanned out to every open event stream (``post.status``), so it costs more with more
  streams; every stream is checked to have received every write;
- a dashboard load: ``GET /`` and its two static files on a fresh connection, as a browser's first visit.

Baseline: the same measurements with nothing open, in the same run. One process (this one) reads all the
streams in one thread, on the same 2 CPUs as the sidecar.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine_lines, percentile  # noqa: E402
from sip_refuge.config import Site  # noqa: E402
from sip_refuge.config.secrets import telemetry_token  # noqa: E402
from tests.support.http_load import Streams, process_status  # noqa: E402
from tests.support.rtsp_camera import TestCamera  # noqa: E402
from tests.support.sidecar import Sidecar  # noqa: E402
from tests.support.sites import sidecar_site  # noqa: E402

POST = "idlewells"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks of 1/100 s


def telemetry_writes(site: Site, url: str, count: int) -> list[float]:
    token = telemetry_token(POST, site.post(POST).secret.read())
    times = []
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {token}"
        for n in range(count):
            start = time.perf_counter()
            reply = session.post(f"{url}/api/v1/posts/{POST}/telemetry", json={"kind": "state", "state": f"idle {n}"},
                                 timeout=30)
            times.append(time.perf_counter() - start)
            if reply.status_code != 202:
                raise RuntimeError(f"telemetry write answered {reply.status_code}: {reply.text}")
    return times


def dashboard_loads(url: str, count: int, headers: dict[str, str]) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        with requests.Session() as session:  # a fresh connection, as a first visit
            session.headers.update(headers)
            for path in ("/", "/static/refuge.css", "/static/dashboard.js"):
                reply = session.get(url + path, timeout=30)
                if reply.status_code != 200:
                    raise RuntimeError(f"GET {path} answered {reply.status_code}")
        times.append(time.perf_counter() - start)
    return times


def phase(site: Site, sidecar: Sidecar, port: int, events: int, views: int, args: argparse.Namespace) -> dict[str, float]:
    posts = [p.id for p in site.posts]
    token = {"Authorization": f"Bearer {sidecar.token()}"}  # pages and streams need a login or the token
    with Streams(port, token) as streams:
        if events:
            streams.open("/api/v1/events", events, [f"127.0.1.{n}" for n in range(1, 11)])
        for i in range(views):
            streams.open(f"/cameras/{posts[i % len(posts)]}/live.mjpeg", 1, [f"127.0.2.{i % 4 + 1}"])
        if events or views:
            streams.wait("every stream answering", lambda s: s.status == 200, 60)
            streams.wait("pictures on every view", lambda s: s.parts >= 2 or not s.path.endswith(".mjpeg"), 90)
        pid = sidecar.pid or 0
        cpu, wall = cpu_seconds(pid), time.monotonic()
        writes = telemetry_writes(site, sidecar.url, args.writes)
        loads = dashboard_loads(sidecar.url, args.loads, token)
        cpu_share = (cpu_seconds(pid) - cpu) / (time.monotonic() - wall)
        status = process_status(pid)
        if events:
            streams.wait(f"all {args.writes} writes on every event stream",
                         lambda s: not s.path.endswith("events") or s.seen.count("post.status") >= args.writes, 120)
        frames = sum(s.parts for s in streams.snapshot())
    return {"w50": percentile(writes, .5) * 1000, "w95": percentile(writes, .95) * 1000,
            "d50": percentile(loads, .5) * 1000, "d95": percentile(loads, .95) * 1000,
            "cpu": cpu_share * 100, "threads": status["threads"], "rss": status["rss_kib"] / 1024, "frames": frames}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writes", type=int, default=200, help="telemetry writes per phase")
    parser.add_argument("--loads", type=int, default=30, help="dashboard loads per phase")
    parser.add_argument("--streams", default="0,50,200", help="event streams open, per phase")
    parser.add_argument("--views", type=int, default=20, help="live views open in every phase but the baseline")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="capacity-"))
    password = "cam-" + secrets.token_hex(8)
    with TestCamera(["sutton-market", "idlewells", "kirkby-bus-station"], user="viewer", password=password) as cam:
        site = sidecar_site(folder, camera=cam, camera_password=password)
        assert site.sidecar is not None
        with Sidecar(site.path, f"http://127.0.0.1:{site.sidecar.port}", log_file=folder / "sidecar.log") as sidecar:
            time.sleep(5)  # let the start-up camera probes finish: they are not what is measured
            rows = [("baseline: nothing open", phase(site, sidecar, site.sidecar.port, 0, 0, args))]
            for count in (int(n) for n in args.streams.split(",")):
                rows.append((f"{count} event streams + {args.views} live views",
                             phase(site, sidecar, site.sidecar.port, count, args.views, args)))
    base = rows[0][1]
    print("\n".join(machine_lines()))
    print(f"- command: .venv/bin/python bench/capacity.py --writes {args.writes} --loads {args.loads} "
          f"--streams {args.streams} --views {args.views}\n")
    print("| open | telemetry write p50 ms | p95 ms | p95 vs baseline | dashboard load p50 ms | p95 ms | "
          "p95 vs baseline | sidecar CPU % | threads | RSS MiB | JPEG parts sent |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows:
        print(f"| {name} | {r['w50']:.1f} | {r['w95']:.1f} | {r['w95'] / base['w95']:.2f}x | {r['d50']:.1f} | "
              f"{r['d95']:.1f} | {r['d95'] / base['d95']:.2f}x | {r['cpu']:.0f} | {r['threads']:.0f} | "
              f"{r['rss']:.0f} | {r['frames']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
