"""Failover on the PBX pair: how long from the press (or from the kill) until a desk rings, per SIP backend, next to
press-to-ring with both PBXs up, in the same run.

    .venv/bin/python bench/failover.py [--runs 5] [--backends pjsua2,pyvoip]

Two real Asterisk 22 on loopback (the primary on 127.0.0.1, the secondary on 127.0.0.2, rendered from one site
file), posts as ``sip-refuge post`` processes (pressed through their control socket, as ``sip-refuge press``
does), the desk a SIP robot registered with both PBXs in this process; times are ``time.monotonic()`` here, the
ring the moment the robot parsed the INVITE. Each run, per backend:

- **baseline**: both PBXs up, the post idle: press → desk INVITE (through the primary).
- **idle**: ``kill -9`` of the primary, the press right after it (the post has not noticed yet: the worst case):
  press → desk INVITE through the secondary.
- **ringing**: press, the desk rings through the primary (not answering), ``kill -9``: kill → the desk rings again
  through the secondary (and press → that ring).
- **talking**: press, the desk answers through the primary, ``kill -9``: kill → the desk rings through the
  secondary.

After each kill the primary is started again and the post and desk registered with it before the next step.
Prints the machine, the date and a Markdown table; the verdict checks the promise (every ring within 30 s of
its press). A measurement: it always exits 0.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine_lines, percentile, quiet_logs  # noqa: E402
from sip_refuge.config import Site  # noqa: E402
from tests.support.agent import AgentProcess  # noqa: E402
from tests.support.desk_robot import DeskRobot, Ring  # noqa: E402
from tests.support.pair import SECONDARY_HOST, Pair, pair_site, pbx_of  # noqa: E402
from tests.support.sites import POSTS  # noqa: E402

PROMISE = 30.0  # seconds from a press to a desk ringing, whatever PBX died (Code Blue, ASME A17.1)


class Run:
    def __init__(self, site: Site, pair: Pair, desk: DeskRobot, agent: AgentProcess) -> None:
        self.site, self.pair, self.desk, self.agent = site, pair, desk, agent
        self.values: dict[str, list[float]] = {}
        self.failures: list[str] = []

    def add(self, name: str, seconds: float) -> None:
        self.values.setdefault(name, []).append(seconds)

    def ready(self) -> None:
        """Both PBXs up, the post idle and registered with both, the desk free in both queues."""
        self.pair.ensure_running()
        both = {self.site.pbx.host: True, SECONDARY_HOST: True}
        self.agent.wait_status(lambda s: s["state"] == "idle" and s["registrations"] == both, 60, "idle on both")
        self.pair.wait_post_registered(self.agent.post.id, 60)
        self.pair.wait_desk_ready(60)

    def ring(self, index: int, pbx: str) -> Ring:
        ring = self.desk.wait_ring(60, index=index)
        if pbx_of(ring.call.dest, self.site) != pbx:
            raise RuntimeError(f"the desk rang through {ring.call.dest}, not the {pbx}")
        return ring

    def finish(self, ring: Ring) -> None:
        self.desk.answer(ring)
        self.agent.wait_status(lambda s: s["state"] == "connected", 20, "connected")
        self.desk.hangup(ring)
        self.agent.wait_status(lambda s: s["state"] == "idle", 30, "idle")

    def baseline(self) -> None:
        self.ready()
        n = len(self.desk.rings)
        pressed = time.monotonic()
        self.agent.press()
        ring = self.ring(n, "primary")
        self.add("baseline", ring.invite_at - pressed)
        self.finish(ring)

    def idle(self) -> None:
        self.ready()
        n = len(self.desk.rings)
        self.pair.kill_primary()
        pressed = time.monotonic()
        self.agent.press()
        ring = self.ring(n, "secondary")
        self.add("idle", ring.invite_at - pressed)
        self.finish(ring)

    def ringing(self) -> None:
        self.ready()
        n = len(self.desk.rings)
        pressed = time.monotonic()
        self.agent.press()
        self.ring(n, "primary")
        self.agent.wait_status(lambda s: s["state"] == "queued", 10, "queued")
        killed = time.monotonic()
        self.pair.kill_primary()
        ring = self.ring(n + 1, "secondary")
        self.add("ringing_kill", ring.invite_at - killed)
        self.add("ringing_press", ring.invite_at - pressed)
        self.finish(ring)

    def talking(self) -> None:
        self.ready()
        n = len(self.desk.rings)
        self.agent.press()
        first = self.ring(n, "primary")
        self.desk.answer(first)
        self.agent.wait_status(lambda s: s["state"] == "connected", 20, "connected")
        killed = time.monotonic()
        self.pair.kill_primary()
        ring = self.ring(n + 1, "secondary")
        self.add("talking_kill", ring.invite_at - killed)
        self.finish(ring)


def measure(site: Site, pair: Pair, backend: str, runs: int, state: Path) -> Run:
    with pair.desk(answer_after=None) as desk, AgentProcess(site, POSTS[backend], state) as agent:
        run = Run(site, pair, desk, agent)
        for n in range(runs):
            for step in (run.baseline, run.idle, run.ringing, run.talking):
                try:
                    step()
                except Exception as exc:  # noqa: BLE001 - one bad step is reported, the measurement goes on
                    run.failures.append(f"{backend} run {n} {step.__name__}: {exc}")
                    for pbx in pair.both():
                        if pbx.running:
                            pbx.cli("channel request hangup all")
        return run


ROWS = (("baseline", "both up: press → desk rings (primary)"),
        ("idle", "primary killed while idle: press → desk rings (secondary)"),
        ("ringing_kill", "killed while the desk rings: kill → rings again (secondary)"),
        ("ringing_press", "… the same: press → rings again (secondary)"),
        ("talking_kill", "killed mid-conversation: kill → rings again (secondary)"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of the four steps per backend")
    parser.add_argument("--backends", default="pjsua2,pyvoip")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    quiet_logs(args.verbose)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    results: dict[str, Run] = {}
    header: list[str] = []
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="failover-") as tmp:
            site = pair_site(Path(tmp) / "site")
            with Pair(site, "bench/failover.py") as pair:
                header = machine_lines(pair.primary)
                for backend in backends:
                    print(f"# {backend}: {args.runs} runs ...", flush=True)
                    results[backend] = measure(site, pair, backend, args.runs, Path(tmp) / f"state-{backend}")
    except Exception:  # noqa: BLE001 - a measurement: print what we have and say what broke
        traceback.print_exc()
        print("\n**The run broke off early; the table holds what was measured before.**")
    elapsed = time.monotonic() - started
    print("\n## Failover: desk ringing after a kill -9 of the primary PBX, same run\n")
    print("\n".join(header or machine_lines()))
    print(f"- {args.runs} runs per backend; pbx.register_interval 5 s, qualify 5 s; run took {elapsed:.0f} s\n")
    print("| backend | measurement | n | p50 s | p95 s | max s | p50 vs baseline |")
    print("|---|---|---:|---:|---:|---:|---:|")
    worst = 0.0
    for backend, run in results.items():
        base = percentile(run.values.get("baseline", []), .5) if run.values.get("baseline") else None
        for key, label in ROWS:
            values = run.values.get(key, [])
            if not values:
                continue
            p50, p95 = percentile(values, .5), percentile(values, .95)
            ratio = f"{p50 / base:.0f}x" if base and key != "baseline" else ""
            print(f"| {backend} | {label} | {len(values)} | {p50:.2f} | {p95:.2f} | {max(values):.2f} | {ratio} |")
            if key in ("idle", "ringing_press", "baseline"):
                worst = max(worst, max(values))
    failures = [f for run in results.values() for f in run.failures]
    if failures:
        print("\nFailures:\n" + "\n".join(f"- {f}" for f in failures))
    verdict = "holds" if results and worst <= PROMISE and not failures else "NOT shown"
    print(f"\nPromise (a desk rings within {PROMISE:g} s of every press): {verdict} (slowest {worst:.2f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
