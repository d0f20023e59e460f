"""Scale: 1,000 registered posts on one Asterisk, bursts of concurrent alarm calls, and the sidecar following.

    .venv/bin/python bench/scale.py [--posts 1000] [--desks 8] [--steps 10,25,50,100,150,200] [--loads 10]

Everything is real and on loopback. A site file with ``--posts`` posts and ``--desks`` desks is generated from
the example site and rendered by our renderer into a real Asterisk 22 (``sip_refuge/pbx/asterisk.py``); the
one change is ``timestampevents = yes`` in the sandbox's own ``manager.conf`` (not one of the site's include
files), so every AMI event carries Asterisk's clock. SIPp (``bench/sipp.py``) registers every post and desk
and answers Asterisk's qualify OPTIONS (``qualify_frequency`` as the example site has it); the real
``sip-refuge sidecar`` follows AMI and delivers to a signature-checking webhook receiver
(tests/support/receivers.py); a plain panoramisk client in this process is the baseline.

1. Start-up with ``--posts`` posts against the example's 3 (baseline): ``config check``, ``asterisk render``,
   Asterisk's boot, the sidecar's start (HTTP up; logged in to AMI and resynced).
2. The dashboard in headless Chromium, logged in as an operator: load time with ``--posts`` posts and with 3.
3. Reference: single alarm calls one after another. Then each step: N calls from N posts at once (SIPp starts
   them within one second); desks answer at once, the caller talks ``--talk`` ms and hangs up; unanswered
   callers wait in the queue. Per step: the lag from QueueCallerJoin (Asterisk's Timestamp) to the plain
   client receiving it (baseline) and to the receiver verifying ``call.queued`` (sidecar), p50/p95; events
   lost (every joined call must reach the receiver as ``call.queued``, ``call.answered`` and ``call.ended``);
   the CPU and RSS of Asterisk and of the sidecar over the step.
4. ``/metrics`` against the true counts. The knee: the first step whose sidecar p50 lag is twice the reference.
Prints Markdown.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml  # noqa: E402

from bench.common import machine_lines, percentile  # noqa: E402
from bench.queue_to_webhook import AmiBaseline, TimedReceiver, templates  # noqa: E402
from bench.sipp import DESK, OPTIONS_OK, REGISTER, SIPP, Sipp, caller, write_injection  # noqa: E402
from sip_refuge.config import Site, load_site  # noqa: E402
from sip_refuge.config.secrets import init_secrets  # noqa: E402
from sip_refuge.pbx.asterisk import Asterisk, free_port  # noqa: E402
from tests.support.browser import Browser, log_in  # noqa: E402
from tests.support.metrics import Scrape  # noqa: E402
from tests.support.operators import add_operator  # noqa: E402
from tests.support.sidecar import Sidecar, wait_until  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config" / "site.example.yaml"
CLI = Path(sys.executable).with_name("sip-refuge")
CLK_TCK = 100


def make_site(folder: Path, posts: int, desks: int, hook_port: int) -> Site:
    """The example site with ``posts`` generated posts (no cameras: 1,000 RTSP cameras are not emulated here)
    and ``desks`` desks on free loopback ports; ``queue.max_wait`` 120 s so a burst waits for the desks."""
    data = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    pbx = data["pbx"]
    start = free_port() // 2 * 2 % 40000 + 10000
    pbx.update(sip_port=free_port(), rtp_start=start, rtp_end=start + 2000)
    pbx["ami"]["port"] = free_port()
    data["queue"]["max_wait"] = 120
    data["sidecar"].update(listen=f"127.0.0.1:{free_port()}", users_file="secrets/sidecar.users")
    data["sidecar"].pop("camera_interval", None)
    data["cctv"] = [{"type": "webhook", "name": "vms-hook", "url": f"http://127.0.0.1:{hook_port}/hook",
                     "secret_file": "secrets/webhook.secret"}]
    data["desks"] = [{"id": f"desk-{n}", "name": f"Operator Desk {n}", "extension": str(2000 + n),
                      "secret_file": f"secrets/desk-{n}.secret", "workstation": f"ws-{n}"} for n in range(1, desks + 1)]
    data["posts"] = [{"id": f"post-{n:04d}", "name": f"Refuge post {n}", "extension": str(100000 + n),
                      "location": {"address": f"{n} High Street", "lat": round(53 + n / 1e4, 4), "lon": -1.26},
                      "secret_file": f"secrets/post-{n:04d}.secret",
                      "gpio": {"button": 17, "yellow": 22, "green": 23, "red": 24}, "sip_backend": "pjsua2",
                      "auto_answer": "after_alarm"} for n in range(1, posts + 1)]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    init_secrets(load_site(path, check_secrets=False))
    return load_site(path)


# -- processes ---------------------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Usage:
    """CPU share and peak RSS of some processes over a window, sampled every 0.25 s in a thread."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.cpu = {k: cpu_seconds(p) for k, p in pids.items()}
        self.rss = {k: rss_mib(p) for k, p in pids.items()}
        self.start = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.25):
            for k, p in self.pids.items():
                self.rss[k] = max(self.rss[k], rss_mib(p))

    def done(self) -> dict[str, tuple[float, float]]:
        """name -> (CPU % of one core over the window, peak RSS MiB)."""
        self._stop.set()
        self._thread.join()
        wall = time.monotonic() - self.start
        return {k: (100 * (cpu_seconds(p) - self.cpu[k]) / wall, self.rss[k]) for k, p in self.pids.items()}


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return time.perf_counter() - start


def start_sidecar(site: Site, log: Path) -> tuple[Sidecar, float, float]:
    """Start the sidecar; seconds until /healthz answers, and until it is logged in to AMI and resynced
    (nan when no Asterisk runs)."""
    assert site.sidecar is not None
    sidecar = Sidecar(site.path, f"http://127.0.0.1:{site.sidecar.port}", log_file=log)
    start = time.monotonic()
    sidecar.start(timeout=120)
    up = time.monotonic() - start
    synced = float("nan")
    try:
        wait_until(lambda: sidecar.health()["ami"]["resynced_at"], 0.5, "resync")
        synced = time.monotonic() - start
    except AssertionError:
        pass
    return sidecar, up, synced


def wait_resynced(sidecar: Sidecar, start: float) -> float:
    wait_until(lambda: sidecar.health()["ami"]["resynced_at"], 120, "AMI resync")
    return time.monotonic() - start


# -- the dashboard -----------------------------------------------------------------------------------------

def dashboard(site: Site, sidecar: Sidecar, folder: Path, loads: int) -> dict[str, list[float]]:
    """Seconds per load of ``/`` in Chromium as a logged-in operator: to the load event, and to the page's first
    ``/api/v1/posts`` answer arriving; plus ``/api/v1/posts`` alone over HTTP with the bearer token."""
    password = add_operator(site, "bench-operator")
    out: dict[str, list[float]] = {"load": [], "posts": [], "api": []}
    with Browser(folder / f"profile-{len(site.posts)}") as browser:
        page = browser.page()
        log_in(page, sidecar.url + "/", "bench-operator", password)
        for _ in range(loads):
            start = time.perf_counter()
            with page.expect_response(lambda r: "/api/v1/posts" in r.url, timeout=60_000) as answer:
                page.goto(sidecar.url + "/", wait_until="load", timeout=60_000)
                out["load"].append(time.perf_counter() - start)
            answer.value.finished()
            out["posts"].append(time.perf_counter() - start)
            count = page.locator("#posts > li").count()
            if count != len(site.posts):
                raise AssertionError(f"the dashboard shows {count} posts, not {len(site.posts)}")
        if browser.errors:
            raise AssertionError(f"the dashboard had errors: {browser.errors}")
    for _ in range(loads):
        start = time.perf_counter()
        sidecar.get("/api/v1/posts").raise_for_status()
        out["api"].append(time.perf_counter() - start)
    return out


# -- calls -------------------------------------------------------------------------------------------------

class Step:
    def __init__(self, label: str, calls: int) -> None:
        self.label, self.calls = label, calls
        self.to_ami: list[float] = []
        self.to_hook: list[float] = []
        self.lost: list[str] = []
        self.answered = 0
        self.failed = 0
        self.usage: dict[str, tuple[float, float]] = {}


def burst(step: Step, site: Site, pbx: Asterisk, baseline: AmiBaseline, receiver: TimedReceiver,
          folder: Path, posts: list[str], talk_ms: int, pids: dict[str, int]) -> None:
    """``len(posts)`` alarm calls started within a second; wait until every one is over and reported."""
    known = set(baseline.joins)
    seen = len(receiver.arrived)
    secrets = {p.id: p.secret.read() for p in site.posts}
    injection = write_injection(folder / f"calls-{step.label}.csv", [(p, secrets[p]) for p in posts])
    usage = Usage(pids)
    callers = Sipp(f"calls-{step.label}", folder, caller(talk_ms),
                   (site.pbx.host, site.pbx.sip_port), injection=injection, calls=len(posts), rate=len(posts),
                   service=site.queue.extension).start()
    try:
        callers.wait(600)
    finally:
        callers.stop()
    step.answered, step.failed = callers.count("SuccessfulCall(C)"), callers.count("FailedCall(C)")
    wait_until(lambda: "0 active channels" in pbx.cli("core show channels count"), 60, "idle Asterisk")
    joins = {uid: v for uid, v in baseline.joins.items() if uid not in known}

    def reported() -> bool:
        with receiver.cond:
            kinds = [(e["type"], e["data"]) for _, e in receiver.arrived[seen:]]
        queued = {d.get("uniqueid"): d["incident"] for t, d in kinds if t == "call.queued"}
        done = {(t, d["incident"]) for t, d in kinds}
        step.lost = [f"{uid}: {kind}" for uid in joins for kind in ("call.queued", "call.answered", "call.ended")
                     if (kind == "call.queued" and uid not in queued)
                     or (kind != "call.queued" and (kind, queued.get(uid)) not in done)]
        return not step.lost

    try:
        wait_until(reported, 120, f"every event of step {step.label}", interval=0.5)
    except AssertionError:
        pass  # step.lost names them
    step.usage = usage.done()
    with receiver.cond:
        hooks = {e["data"].get("uniqueid"): at for at, e in receiver.arrived[seen:] if e["type"] == "call.queued"}
    for uid, (stamp, at_ami) in joins.items():
        step.to_ami.append((at_ami - stamp) * 1000)
        if uid in hooks:
            step.to_hook.append((hooks[uid] - stamp) * 1000)
    if len(joins) != len(posts):
        step.lost.append(f"{len(posts) - len(joins)} calls never joined the queue (SIPp failed {step.failed})")


# -- the run -----------------------------------------------------------------------------------------------

def startup(folder: Path, posts: int, desks: int, loads: int) -> tuple[list[tuple[str, float, float]],
                                                                      dict[int, dict[str, list[float]]]]:
    """Start-up times and dashboard loads, ``posts`` posts against the example's 3 (sidecars without Asterisk)."""
    rows: dict[str, dict[int, float]] = {}
    pages: dict[int, dict[str, list[float]]] = {}
    for count in (3, posts):
        site = make_site(folder / f"startup-{count}", count, desks, free_port())
        rows.setdefault("`sip-refuge config check`", {})[count] = timed([str(CLI), "config", "check", str(site.path)])
        out = folder / f"render-{count}"
        rows.setdefault("`sip-refuge asterisk render`", {})[count] = timed(
            [str(CLI), "asterisk", "render", str(site.path), "--out", str(out)])
        start = time.monotonic()
        with Asterisk(site, command="bench/scale.py"):
            rows.setdefault("Asterisk boot (to fully booted)", {})[count] = time.monotonic() - start
            sidecar, up, _ = start_sidecar(site, folder / f"sidecar-{count}.log")
            try:
                rows.setdefault("sidecar start (to /healthz answering)", {})[count] = up
                rows.setdefault("sidecar start (to AMI logged in and resynced)", {})[count] = \
                    wait_resynced(sidecar, start + rows["Asterisk boot (to fully booted)"][count])
                pages[count] = dashboard(site, sidecar, folder, loads)
            finally:
                sidecar.close()
    return [(name, by[3], by[posts]) for name, by in rows.items()], pages


def load_run(folder: Path, posts: int, desks: int, steps: list[int], talk_ms: int, singles: int) -> None:
    hook_port = free_port()
    site = make_site(folder / "load", posts, desks, hook_port)
    receiver = TimedReceiver((site.path.parent / "secrets" / "webhook.secret").read_text().strip())
    receiver.port = hook_port
    receiver.start()
    target = (site.pbx.host, site.pbx.sip_port)
    with Asterisk(site, command="bench/scale.py", templates=templates(folder, resync_rights=False)) as pbx:
        registered = []
        for name, ids, ooc in (("posts", [p.id for p in site.posts], OPTIONS_OK), ("desks", [d.id for d in site.desks], DESK)):
            secrets = {**{p.id: p.secret.read() for p in site.posts}, **{d.id: d.secret.read() for d in site.desks}}
            inj = write_injection(folder / f"{name}.csv", [(i, secrets[i]) for i in ids])
            registered.append(Sipp(name, folder / "sipp", REGISTER, target, injection=inj, calls=len(ids), rate=200,
                                   ooc=ooc).start())
        try:
            wait_until(lambda: pbx.cli("pjsip show contacts").count(" Avail ") >= posts + desks, 120,
                       "every post and desk registered and qualified", interval=1)
            baseline = AmiBaseline("127.0.0.1", site.pbx.ami.port, site.pbx.ami.username, site.pbx.ami.secret.read())
            sidecar, _, _ = start_sidecar(site, folder / "sidecar-load.log")
            try:
                wait_resynced(sidecar, time.monotonic())
                wait_until(lambda: sum(1 for p in sidecar.posts().values() if p["online"]) == posts, 120,
                           "every post online on the sidecar", interval=1)
                pids = {"Asterisk": pbx.pid or 0, "sidecar": sidecar.pid or 0}
                reference = Step("1 (one at a time)", 1)
                for n in range(singles):
                    one = Step(f"single-{n}", 1)
                    burst(one, site, pbx, baseline, receiver, folder / "sipp", [site.posts[n].id], talk_ms, pids)
                    reference.to_ami += one.to_ami
                    reference.to_hook += one.to_hook
                    reference.lost += one.lost
                    reference.answered += one.answered
                    reference.failed += one.failed
                    reference.usage = one.usage
                results = [reference]
                for count in steps:
                    step = Step(str(count), count)
                    burst(step, site, pbx, baseline, receiver, folder / "sipp", [p.id for p in site.posts[:count]],
                          talk_ms, pids)
                    results.append(step)
                    print(f"step {count}: answered {step.answered}, lost {len(step.lost)}", file=sys.stderr, flush=True)
                truth = {"answered": sum(s.answered for s in results),
                         "online": pbx.cli("pjsip show contacts").count(" Avail ") - desks,
                         "delivered": len(receiver.events)}
                wait_until(lambda: Scrape(sidecar.metrics()).value("refuge_deliveries", target="vms-hook",
                                                                   status="delivered") == truth["delivered"],
                           30, "deliveries recorded", interval=0.5)
                scrape = Scrape(sidecar.metrics())
            finally:
                sidecar.close()
                baseline.close()
        finally:
            for sipp in registered:
                sipp.stop()
            receiver.stop()
    report_load(results, scrape, truth)


def report_load(results: list[Step], scrape: Scrape, truth: dict[str, int]) -> None:
    print("\n| concurrent calls | answered | events lost | AMI client p50 / p95 ms | sidecar → verified webhook "
          "p50 / p95 ms | sidecar p50 vs reference | Asterisk CPU % / RSS MiB | sidecar CPU % / RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    ref = percentile(results[0].to_hook, 0.5)
    knee = None
    for s in results:
        p50 = percentile(s.to_hook, 0.5)
        if knee is None and s is not results[0] and p50 >= 2 * ref:
            knee = s.label
        ast, side = s.usage.get("Asterisk", (0, 0)), s.usage.get("sidecar", (0, 0))
        print(f"| {s.label} | {s.answered}/{len(s.to_ami) or s.calls} | {len(s.lost)} | "
              f"{percentile(s.to_ami, .5):.1f} / {percentile(s.to_ami, .95):.1f} | {p50:.1f} / "
              f"{percentile(s.to_hook, .95):.1f} | {p50 / ref:.2f}x | {ast[0]:.0f} / {ast[1]:.0f} | "
              f"{side[0]:.0f} / {side[1]:.0f} |")
    print(f"\nKnee (first step whose sidecar p50 lag is at least twice the reference): {knee or 'not reached'}")
    for s in results:
        for line in s.lost[:5]:
            print(f"- lost in step {s.label}: {line}")
    ended = scrape.value("refuge_calls_total", outcome="ended")
    live = sum(scrape.value("refuge_calls_live", state=k) or 0 for k in ("queued", "answered", "overflowed"))
    print("\n| `/metrics` | value | true count |\n|---|---:|---:|")
    for name, value, true in (
            ('refuge_calls_total{outcome="ended"}', ended, truth["answered"]),
            ("refuge_calls_live (all states)", live, 0),
            ("refuge_posts_online", scrape.value("refuge_posts_online"), truth["online"]),
            ('refuge_deliveries{target="vms-hook",status="delivered"}',
             scrape.value("refuge_deliveries", target="vms-hook", status="delivered"), truth["delivered"]),
            ("refuge_ami_connected", scrape.value("refuge_ami_connected"), 1)):
        print(f"| {name} | {value:.0f} | {true} |" if value is not None else f"| {name} | missing | {true} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posts", type=int, default=1000)
    parser.add_argument("--desks", type=int, default=8)
    parser.add_argument("--steps", default="10,25,50,100,150,200")
    parser.add_argument("--singles", type=int, default=10, help="single calls one after another: the reference")
    parser.add_argument("--talk", type=int, default=1000, help="ms a caller talks once a desk answered")
    parser.add_argument("--loads", type=int, default=10, help="dashboard loads per site")
    parser.add_argument("--skip-startup", action="store_true")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (logs, SIPp files, databases)")
    args = parser.parse_args()
    if shutil.which(SIPP) is None:
        parser.error(f"{SIPP} is not installed: it is Debian's sip-tester (apt-get install sip-tester)")
    steps = [int(n) for n in args.steps.split(",")]
    print("\n".join(machine_lines()))
    print(f"- command: .venv/bin/python bench/scale.py --posts {args.posts} --desks {args.desks} "
          f"--steps {args.steps} --singles {args.singles} --talk {args.talk} --loads {args.loads}")
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        folder = Path(tmp) if args.keep is None else args.keep
        folder.mkdir(parents=True, exist_ok=True)
        if not args.skip_startup:
            rows, pages = startup(folder, args.posts, args.desks, args.loads)
            print(f"\n| start-up | 3 posts (s) | {args.posts} posts (s) | ratio |\n|---|---:|---:|---:|")
            for name, small, big in rows:
                print(f"| {name} | {small:.2f} | {big:.2f} | {big / small:.1f}x |")
            print(f"\n| dashboard, {args.loads} loads each | 3 posts p50 / p95 ms | {args.posts} posts p50 / p95 ms "
                  "| p95 ratio |\n|---|---:|---:|---:|")
            for key, name in (("load", "Chromium: `/` to the load event"),
                              ("posts", "Chromium: `/` to the page's first `/api/v1/posts` answer"),
                              ("api", "`GET /api/v1/posts` alone (bearer token)")):
                few, many = pages[3][key], pages[args.posts][key]
                print(f"| {name} | {percentile(few, .5) * 1000:.0f} / {percentile(few, .95) * 1000:.0f} | "
                      f"{percentile(many, .5) * 1000:.0f} / {percentile(many, .95) * 1000:.0f} | "
                      f"{percentile(many, .95) / percentile(few, .95):.1f}x |")
        load_run(folder, args.posts, args.desks, steps, args.talk, args.singles)
    return 0


if __name__ == "__main__":
    sys.exit(main())
