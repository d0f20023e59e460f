"""Latency from a post joining the queue to the CCTV webhook getting ``call.queued``, and the sidecar's cost.

    .venv/bin/python bench/queue_to_webhook.py [--calls 100] [--cameras 20] [--camera-seconds 180]

Everything is real and on loopback: Asterisk 22 (sandbox config), the sidecar as ``sip-refuge sidecar SITE``
(a subprocess), SIP peers for the post and the desks (tests/support/sipua.py), a Standard Webhooks receiver
that verifies every signature (tests/support/receivers.py) and the RTSP test camera.

1. Queue to webhook. Each call: the post dials the queue, the desks ring (nobody answers), and once the
   receiver has ``call.queued`` the post hangs up. The sandbox AMI gets ``timestampevents = yes`` so every
   event carries Asterisk's own wall-clock ``Timestamp`` (same host, same clock). From that moment:
   - baseline: a second, plain panoramisk client (this process) receiving QueueCallerJoin: the AMI transport
     and parsing that the sidecar cannot do faster;
   - sidecar: the receiver verifying the signed ``call.queued`` (AMI, tracker, SQLite commit, outbox worker,
     HTTP POST with signing).
2. Sidecar CPU and RSS with ``--cameras`` posts, each with a camera (mounts of one test camera), probed at the
   default interval (60 s), for ``--camera-seconds``; /proc of the sidecar process, which includes FFmpeg's
   decoder threads. The same window with ``--no-cameras`` is the idle baseline.
Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml  # noqa: E402
from panoramisk import Manager  # noqa: E402

from sip_refuge.config import load_site  # noqa: E402
from sip_refuge.config.secrets import init_secrets  # noqa: E402
from sip_refuge.pbx.asterisk import Asterisk, free_port  # noqa: E402
from sip_refuge.pbx.render import TEMPLATES  # noqa: E402
from tests.support.receivers import WebhookReceiver  # noqa: E402
from tests.support.rtsp_camera import TestCamera  # noqa: E402
from tests.support.sidecar import Sidecar, wait_until  # noqa: E402
from tests.support.sipua import OutgoingCall, SipPeer  # noqa: E402

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "site.example.yaml"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class TimedReceiver(WebhookReceiver):
    """The test receiver, noting when each verified request arrived (wall clock)."""

    def __init__(self, secret: str) -> None:
        super().__init__(secret)
        self.arrived: list[tuple[float, dict[str, Any]]] = []

    def handle(self, path: str, body: bytes, headers: dict[str, str]) -> int:
        at = time.time()
        # One hold of the (re-entrant) lock around both: with requests arriving at once, the event appended
        # here must be the one paired with this request's time.
        with self.cond:
            status = super().handle(path, body, headers)
            if status == 204 and len(self.arrived) < len(self.events):
                self.arrived.append((at, self.events[-1]))
        return status


def templates(folder: Path, *, resync_rights: bool = True) -> Path:
    """The shipped templates with AMI event timestamps (and the sidecar's resync rights, see the tests)."""
    out = folder / "templates"
    shutil.copytree(TEMPLATES, out)
    manager = out / "manager.conf.j2"
    manager.write_text(manager.read_text().replace("[general]\n", "[general]\ntimestampevents = yes\n", 1))
    if resync_rights:
        user = out / "manager_refuge.conf.j2"
        user.write_text(re.sub(r"^write=[^\n;]*", "write=system,reporting", user.read_text(), count=1, flags=re.M))
    return out


def write_site(folder: Path, posts: int, camera: TestCamera | None, hook_port: int, camera_password: str) -> Path:
    data = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    pbx = data["pbx"]
    pbx.update(host="127.0.0.1", bind="127.0.0.1", sip_port=free_port(), transport="udp", qualify_frequency=30)
    start = free_port() // 2 * 2
    pbx["rtp_start"], pbx["rtp_end"] = start, start + 400
    pbx["ami"]["port"] = free_port()
    data["queue"].update(ring_timeout=15, max_wait=30, announce_frequency=0)
    data["sidecar"].update(listen=f"127.0.0.1:{free_port()}")
    data["sidecar"].pop("camera_interval", None)  # the default interval
    data["cctv"] = [{"type": "webhook", "name": "vms-hook", "url": f"http://127.0.0.1:{hook_port}/hook",
                     "secret_file": "secrets/webhook.secret"}]
    template = data["posts"][0]
    data["posts"] = []
    for n in range(posts):
        post = {**template, "id": f"post-{n + 1:02d}", "name": f"Refuge post {n + 1}", "extension": f"{9001 + n}",
                "secret_file": f"secrets/post-{n + 1:02d}.secret"}
        post.pop("camera", None)
        if camera is not None:
            post["camera"] = {"rtsp_url": camera.url(post["id"], user="viewer"),
                              "password_file": "secrets/camera.secret"}
        data["posts"].append(post)
    (folder / "secrets").mkdir(mode=0o700, exist_ok=True)
    secret = folder / "secrets" / "camera.secret"
    secret.write_text(camera_password + "\n")
    secret.chmod(0o600)
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    init_secrets(load_site(path, check_secrets=False))
    return path


class AmiBaseline:
    """A plain panoramisk client in its own thread: when each QueueCallerJoin reached it, and its Timestamp."""

    def __init__(self, host: str, port: int, user: str, secret: str) -> None:
        self.joins: dict[str, tuple[float, float]] = {}  # Uniqueid -> (Asterisk Timestamp, received)
        self.cond = threading.Condition()
        self.loop = asyncio.new_event_loop()
        self.manager = Manager(loop=self.loop, host=host, port=port, username=user, secret=secret)
        self.manager.register_event("QueueCallerJoin", self._join)
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.manager.connect()
        self.loop.run_forever()

    def _join(self, manager: Manager, message: Any) -> None:
        received = time.time()
        with self.cond:
            self.joins[str(message.get("Uniqueid"))] = (float(message.get("Timestamp")), received)
            self.cond.notify_all()

    def new_since(self, known: set[str]) -> bool:
        return bool(set(self.joins) - known)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.manager.close)
        self.loop.call_soon_threadsafe(self.loop.stop)


def cancel(pbx: Asterisk, post: SipPeer, call: OutgoingCall) -> None:
    """CANCEL the ringing call. Now and then (about once in 50-100 calls) Asterisk answers no CANCEL for the
    call, even sent again; that call is then hung up from the Asterisk CLI (off the measured path)."""
    for _ in range(2):
        post.send_cancel(call)
        try:
            call.wait_final(2)
            return
        except TimeoutError:
            continue
    print(f"CANCEL unanswered; hanging up from the CLI (codes so far {call.codes})", file=sys.stderr)
    pbx.cli("channel request hangup all")
    call.wait_final(10)


def idle(pbx: Asterisk) -> bool:
    return "0 active channels" in pbx.cli("core show channels count")


def arrived(receiver: TimedReceiver, since: int, kind: str) -> bool:
    return any(e["type"] == kind for _, e in receiver.arrived[since:])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def latency(calls: int, folder: Path) -> None:
    hook_port = free_port()
    password = "cam-" + secrets.token_hex(10)
    with TestCamera(["post-01"], user="viewer", password=password) as camera:
        site_file = write_site(folder, 1, camera, hook_port, password)
        site = load_site(site_file)
        receiver = TimedReceiver((folder / "secrets" / "webhook.secret").read_text().strip())
        receiver.port = hook_port
        receiver.start()
        with Asterisk(site, command="bench/queue_to_webhook.py", templates=templates(folder)) as pbx:
            post = SipPeer("post-01", site.post("post-01").secret.read(), (site.pbx.host, site.pbx.sip_port))
            desks = [SipPeer(d.id, d.secret.read(), (site.pbx.host, site.pbx.sip_port)) for d in site.desks]
            for phone in (post, *desks):
                assert phone.register().code == 200
            sidecar = Sidecar(site_file, f"http://{site.sidecar.host}:{site.sidecar.port}" if site.sidecar else "")
            baseline = AmiBaseline("127.0.0.1", site.pbx.ami.port, site.pbx.ami.username, site.pbx.ami.secret.read())
            try:
                sidecar.start()
                sidecar.wait_ami()
                wait_until(lambda: "Not in use" in pbx.cli(f"queue show {site.queue.name}"), 20, "desks ready")
                to_ami, to_hook = [], []
                for n in range(calls):
                    seen = len(receiver.arrived)
                    joined = set(baseline.joins)
                    call = post.call(site.queue.extension)
                    with baseline.cond:
                        baseline.cond.wait_for(partial(baseline.new_since, joined), 10)
                    [uid] = set(baseline.joins) - joined
                    stamp, at_ami = baseline.joins[uid]
                    receiver.wait_for(partial(arrived, receiver, seen, "call.queued"), 10, f"call.queued of call {n}")
                    at_hook = next(t for t, e in receiver.arrived[seen:] if e["type"] == "call.queued")
                    to_ami.append((at_ami - stamp) * 1000)
                    to_hook.append((at_hook - stamp) * 1000)
                    cancel(pbx, post, call)
                    if (n + 1) % 25 == 0:
                        print(f"{n + 1} calls", file=sys.stderr, flush=True)
                    receiver.wait_for(partial(arrived, receiver, seen, "call.unanswered"), 10,
                                      f"call.unanswered of call {n}")
                    wait_until(partial(idle, pbx), 10, "idle Asterisk")
            finally:
                baseline.close()
                sidecar.close()
                for phone in (post, *desks):
                    phone.close()
                receiver.stop()
    print(f"\n### QueueCallerJoin to CCTV webhook ({calls} calls, loopback)\n")
    print("| from Asterisk's QueueCallerJoin Timestamp to | p50 ms | p95 ms | max ms |")
    print("|---|---:|---:|---:|")
    for name, values in (("a plain AMI client receiving it (baseline)", to_ami),
                         ("the webhook receiver verifying `call.queued` (sidecar)", to_hook)):
        print(f"| {name} | {statistics.median(values):.1f} | {pct(values, 0.95):.1f} | {max(values):.1f} |")
    print(f"\n(timestampevents has microsecond resolution; {len(to_hook)} samples each)")


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime of every thread


def proc_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cost(posts: int, seconds: float, folder: Path) -> None:
    rows: list[tuple[str, float, float, int, int, list[float]]] = []
    password = "cam-" + secrets.token_hex(10)
    with TestCamera([f"post-{n + 1:02d}" for n in range(posts)], user="viewer", password=password) as camera:
        site_file = write_site(folder, posts, camera, free_port(), password)
        site = load_site(site_file)
        with Asterisk(site, command="bench/queue_to_webhook.py", templates=templates(folder)):
            for label, args in (("no cameras (`--no-cameras`)", ("--no-cameras",)),
                                (f"{posts} cameras, probed every 60 s", ())):
                sidecar = Sidecar(site_file, f"http://{site.sidecar.host}:{site.sidecar.port}" if site.sidecar else "",
                                  extra_args=args, log_file=folder / f"sidecar{len(rows)}.log", verbose=True)
                try:
                    sidecar.start()
                    sidecar.wait_ami()
                    assert sidecar.pid is not None
                    pid = sidecar.pid
                    start_cpu, start = proc_cpu(pid), time.monotonic()
                    rss = [proc_rss_mib(pid)]
                    while time.monotonic() - start < seconds:
                        time.sleep(1.0)
                        rss.append(proc_rss_mib(pid))
                    cpu = proc_cpu(pid) - start_cpu
                    wall = time.monotonic() - start
                    probes = len(re.findall(r"DEBUG sip_refuge\.sidecar\.cameras: post \S+: camera ", sidecar.log()))
                    faults = sum(1 for p in sidecar.posts().values() if p["camera"] and p["camera"]["ok"] is False)
                finally:
                    sidecar.close()
                rows.append((label, wall, cpu, probes, faults, rss))
    print(f"\n### Sidecar CPU and memory, {posts} posts, {seconds:.0f} s window\n")
    print("| sidecar | CPU s | CPU % of one core | probes | CPU per probe | RSS MiB (end / max) | cameras in fault |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    idle = rows[0][2] / rows[0][1]
    for label, wall, cpu, probes, faults, rss in rows:
        per = f"{(cpu - idle * wall) / probes * 1000:.0f} ms" if probes else "-"
        print(f"| {label} | {cpu:.1f} | {100 * cpu / wall:.2f} | {probes} | {per} | "
              f"{rss[-1]:.0f} / {max(rss):.0f} | {faults} |")
    print("\n(CPU per probe: the sidecar's CPU above the no-camera run, divided by the probes made in the window)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--cameras", type=int, default=20)
    parser.add_argument("--camera-seconds", type=float, default=180.0)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-cost", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-q2w-") as tmp:
        if not args.skip_latency:
            (Path(tmp) / "latency").mkdir()
            latency(args.calls, Path(tmp) / "latency")
        if not args.skip_cost:
            (Path(tmp) / "cost").mkdir()
            cost(args.cameras, args.camera_seconds, Path(tmp) / "cost")
    return 0


if __name__ == "__main__":
    sys.exit(main())
