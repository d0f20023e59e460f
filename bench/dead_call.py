"""How long a post believes a dead call: ``kill -9`` of Asterisk mid-call to the post leaving the call.

    .venv/bin/python bench/dead_call.py [--runs 5] [--backends pjsua2,pyvoip] [--stages connected,queued]

Each run starts a fresh Asterisk 22 on loopback, registers desk-1 (a raw SIP robot,
:class:`tests.support.sipua.SipPeer`), starts the post agent in this process (built as
``sip-refuge post --gpio mock`` builds it), presses, lets the desk ring (``queued``) or answer
(``connected``), waits a random fraction of a probe interval (so the kill falls anywhere in the post's probe
cycle; the same phases for the baseline and each backend), then sends SIGKILL to Asterisk. Measured: from just before the kill to the runner publishing a
state other than the call's (its step is hooked by :class:`bench.common.StateLog`; nothing is polled).

**Baseline**: a bare SIP client with the same probe settings (``Settings.probe_interval``, ``probe_timeout``):
the raw client registers as the post, places the same alarm call, the desk answers (or rings), and the
client sends an OPTIONS in the dialog every ``probe_interval`` and calls the call dead when one goes
unanswered for ``probe_timeout``. Same kill at the same random phase. The ratio says what the agent adds
(machine, runner, backend) to what the probing policy itself costs.

Before this policy existed the finding was 29 min 28 s (pjsua2, session-refresh timeout) and 140 s (pyVoIP).
A measurement: it always exits 0.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import InProcessPost, machine_lines, percentile, quiet_logs, registered_desk  # noqa: E402
from sip_refuge.config import Site  # noqa: E402
from sip_refuge.pbx.asterisk import Asterisk  # noqa: E402
from sip_refuge.post.machine import Settings  # noqa: E402
from tests.support.hardening import hardening_site, kill_pbx, post_for  # noqa: E402
from tests.support.sipua import IncomingCall, OutgoingCall, SipPeer, tag_of  # noqa: E402

SETTINGS = Settings()


def ring_and_maybe_answer(desk: SipPeer, stage: str) -> IncomingCall:
    ring = desk.wait_incoming(10)
    if stage == "connected":
        ring.answer()
    return ring


def kill_at_phase(pbx: Asterisk, phase: float) -> float:
    time.sleep(phase)
    killed = time.monotonic()
    kill_pbx(pbx)
    return killed


def post_run(site: Site, backend: str, stage: str, state_dir: Path, phase: float) -> float:
    with Asterisk(site, command="bench/dead_call.py", boot_timeout=60) as pbx:
        desk = registered_desk(site, pbx)
        try:
            with InProcessPost(site, post_for(site, backend, "after_alarm").id, state_dir) as agent:
                edge = agent.press()
                ring_and_maybe_answer(desk, stage)
                agent.log.wait(stage, after=edge)
                killed = kill_at_phase(pbx, 0.5 + phase)  # the call settles (ACK, media) first
                return left_state(agent.log.entries, stage, killed)
        finally:
            desk.close()


def left_state(entries: list[tuple[float, str]], stage: str, after: float) -> float:
    """Seconds from ``after`` to the first state other than ``stage`` the runner published (stamped by the
    runner's own hook: how often this loop looks does not change the figure)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = next((at for at, state in list(entries) if at >= after and state != stage), None)
        if found is not None:
            return found - after
        time.sleep(0.05)
    raise TimeoutError(f"the post stayed {stage} for 120 s after the kill")


def bare_run(site: Site, backend: str, stage: str, phase: float) -> float:
    post = post_for(site, backend, "after_alarm")
    with Asterisk(site, command="bench/dead_call.py", boot_timeout=60) as pbx:
        desk = registered_desk(site, pbx)
        client = SipPeer(post.id, post.secret.read(), (site.pbx.host, site.pbx.sip_port), display=post.name)
        try:
            if client.register(expires=600).code != 200:
                raise RuntimeError(f"bare client could not register as {post.id}")
            call = client.call(site.queue.extension)
            ring_and_maybe_answer(desk, stage)
            if stage == "connected":
                call.wait_final(10)
            else:
                client.wait_for(lambda: next((r for r in call.responses if r.code in (180, 183)), None), 10, "18x")
                early = next(r for r in call.responses if r.code in (180, 183))
                call.dialog.remote_tag = tag_of(early.header("to") or "")
            dead = threading.Event()
            detected: list[float] = []
            prober = threading.Thread(target=probe_loop, args=(client, call, dead, detected), daemon=True)
            prober.start()  # its first probe goes probe_interval after the call is up, as the post's does
            killed = kill_at_phase(pbx, 0.5 + phase)
            prober.join(60)
            if not detected:
                raise TimeoutError("the bare client never found the call dead")
            return detected[0] - killed
        finally:
            client.close()
            desk.close()


def probe_loop(client: SipPeer, call: OutgoingCall, dead: threading.Event, detected: list[float]) -> None:
    """The policy with nothing around it: OPTIONS every probe_interval, dead when one is unanswered for probe_timeout."""
    next_probe = time.monotonic() + SETTINGS.probe_interval
    while not dead.is_set():
        time.sleep(max(0.0, next_probe - time.monotonic()))
        try:
            client.request_in_dialog("OPTIONS", call.dialog, timeout=SETTINGS.probe_timeout)
        except TimeoutError:
            detected.append(time.monotonic())
            dead.set()
            return
        next_probe = time.monotonic() + SETTINGS.probe_interval


def row(name: str, seconds: list[float], base: list[float] | None = None,
        extra: list[float] | None = None) -> str:
    p50, p95 = percentile(seconds, .5), percentile(seconds, .95)
    ratio = f"{p50 / percentile(base, .5):.2f}x / {p95 / percentile(base, .95):.2f}x" if base else ""
    worst = max(seconds) if seconds else float("nan")
    added = f"{percentile(extra, .5) * 1000:.0f} / {percentile(extra, .95) * 1000:.0f}" if extra else ""
    return f"| {name} | {len(seconds)} | {p50:.2f} | {p95:.2f} | {worst:.2f} | {ratio} | {added} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="kills per backend, stage and baseline")
    parser.add_argument("--backends", default="pjsua2,pyvoip")
    parser.add_argument("--stages", default="connected,queued")
    parser.add_argument("--seed", type=int, default=8)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    quiet_logs(args.verbose)
    rng = random.Random(args.seed)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    results: dict[str, list[float]] = {}
    extra: dict[str, list[float]] = {}  # the post's time minus the baseline's, run by run (same kill phase)
    failures: list[str] = []
    header: list[str] = []
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="dead-call-") as tmp:
            site = hardening_site(Path(tmp) / "site")
            with Asterisk(site, command="bench/dead_call.py") as pbx:
                header = machine_lines(pbx)
            for stage in stages:
                for n in range(args.runs):
                    phase = rng.uniform(0.0, SETTINGS.probe_interval)  # the same for the baseline and each backend
                    for name in ["baseline", *backends]:
                        try:
                            seconds = (bare_run(site, backends[0], stage, phase) if name == "baseline" else
                                       post_run(site, name, stage, Path(tmp) / f"state-{name}-{n}", phase))
                            results.setdefault(f"{name}:{stage}", []).append(seconds)
                            base = results.get(f"baseline:{stage}", [])
                            if name != "baseline" and len(base) == n + 1:
                                extra.setdefault(f"{name}:{stage}", []).append(seconds - base[n])
                            print(f"# {stage} run {n + 1}: {name} {seconds:.3f} s", flush=True)
                        except Exception as exc:  # noqa: BLE001 - one bad run is reported, the measurement goes on
                            failures.append(f"{name} {stage} run {n + 1}: {exc}")
    except Exception:  # noqa: BLE001 - a measurement: print what we have and say what broke
        traceback.print_exc()
        print("\n**The run broke off early; the table holds what was measured before.**")
    elapsed = time.monotonic() - started

    print("\n## Dead call: kill -9 of Asterisk mid-call to the post leaving the call\n")
    print("\n".join(header or machine_lines()))
    print(f"- probe_interval {SETTINGS.probe_interval:g} s, probe_timeout {SETTINGS.probe_timeout:g} s; kill at a "
          f"random phase of the probe cycle; {args.runs} runs each; run took {elapsed:.0f} s\n")
    print("| measurement | n | p50 s | p95 s | max s | p50 / p95 vs baseline | added by the agent, p50 / p95 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for stage in stages:
        base = results.get(f"baseline:{stage}", [])
        print(row(f"baseline: bare client probing, {stage}", base))
        for backend in backends:
            print(row(f"{backend}: post leaves `{stage}`", results.get(f"{backend}:{stage}", []), base,
                      extra.get(f"{backend}:{stage}")))
    if failures:
        print("\nFailures:\n" + "\n".join(f"- {f}" for f in failures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
