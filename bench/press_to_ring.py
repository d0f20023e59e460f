"""Press-to-ring latency of the post agent, per SIP backend, next to a bare SIP client on the same Asterisk.

    .venv/bin/python bench/press_to_ring.py [--presses 50] [--backends pjsua2,pyvoip] [--sidecar up|down]

One Asterisk 22 on loopback serves everything, in one run, calls one after the other (each hung up and
Asterisk idle again before the next). The desk is a raw SIP robot (:class:`tests.support.sipua.SipPeer`,
registered as desk-1, ringing at once) in this process, so every timestamp is ``time.monotonic()`` of one
process:

- **press → desk INVITE**: from just before the post's MockPanel button pin is driven low (gpiozero's edge;
  the agent is built by ``build_runner(gpio="mock")`` and runs in a thread) to the desk parsing the INVITE
  the queue sent it. Split into edge → ``backend.dial()`` (gpiozero, runner, machine) and the rest (SIP stack).
- **desk 200 OK → post connected**: from just before the desk sends its 200 OK to the runner publishing
  state ``connected`` (its step hooked by the bench; the product is not polled).
- **baseline**: the same post's account on a bare raw SIP client (registered as the post, same INVITE to
  the queue, same digest challenge): client INVITE → desk INVITE, and desk 200 OK → client gets 200 OK.
  Measured in a block before each backend's block and pooled.

Prints the machine, the date and a Markdown table; the verdict line checks the issue's target (pjsua2 p95
within 1.5x of the baseline). A measurement: it always exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402 (after the path set-up above)
    InProcessPost,
    TelemetrySink,
    machine_lines,
    make_site,
    percentile,
    quiet_logs,
    registered_desk,
    settle,
)
from sip_refuge.config import Site  # noqa: E402
from sip_refuge.pbx.asterisk import Asterisk, free_port  # noqa: E402
from tests.support.sipua import OutgoingCall, SipPeer  # noqa: E402
from tests.support.sites import POSTS  # noqa: E402

TARGET = 1.5  # the target: pjsua2 p95 within 1.5x of the baseline
CALL_HOLD = 0.05  # seconds the answered call stays up before the desk hangs up


@dataclass
class Series:
    """Milliseconds per sample, by measurement name."""

    values: dict[str, list[float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def add(self, name: str, seconds: float) -> None:
        self.values.setdefault(name, []).append(seconds * 1000)


def early(call: OutgoingCall) -> bool:
    return any(r.code in (180, 183) for r in call.responses)


def ended(call: OutgoingCall) -> bool:
    return call.ended


def bare_block(site: Site, pbx: Asterisk, post_id: str, presses: int, out: Series) -> None:
    post = site.post(post_id)
    desk = registered_desk(site, pbx)
    client = SipPeer(post.id, post.secret.read(), (site.pbx.host, site.pbx.sip_port), display=post.name)
    try:
        if client.register(expires=600).code != 200:
            raise RuntimeError(f"bare client could not register as {post.id}")
        for n in range(presses):
            settle(pbx, site)
            try:
                sent = time.monotonic()
                call = client.call(site.queue.extension)
                ring = desk.wait_incoming(10, index=n)
                out.add("invite", ring.invite.at - sent)
                # The bare client's "queued": Asterisk's first 18x (183 with the queue's early media, or 180).
                client.wait_for(partial(early, call), 10, "18x")
                answered = time.monotonic()
                ring.answer()
                final = call.wait_final(10)
                out.add("connected", final.at - answered)
                time.sleep(CALL_HOLD)
                ring.hangup()
                client.wait_for(partial(ended, call), 10, "BYE from Asterisk")
            except Exception as exc:  # noqa: BLE001 - one bad call is reported, the measurement goes on
                out.failures.append(f"baseline call {n}: {exc}")
                pbx.cli("channel request hangup all")
    finally:
        try:
            client.register(expires=0, timeout=2)
        except TimeoutError:
            pass
        client.close()
        desk.close()


def post_block(site: Site, pbx: Asterisk, backend: str, presses: int, state_dir: Path, out: Series) -> None:
    desk = registered_desk(site, pbx)
    try:
        with InProcessPost(site, POSTS[backend], state_dir) as agent:
            log = agent.log
            for n in range(presses):
                settle(pbx, site)
                try:
                    edge = agent.press()
                    ring = desk.wait_incoming(10, index=n)
                    out.add("invite", ring.invite.at - edge)
                    dialled = next(at for at in log.dials if at >= edge)
                    out.add("edge_to_dial", dialled - edge)
                    out.add("dial_to_invite", ring.invite.at - dialled)
                    log.wait("queued", after=edge)
                    answered = time.monotonic()
                    ring.answer()
                    connected = log.wait("connected", after=answered)
                    out.add("connected", connected - answered)
                    emitted = next(at for at in log.answers if at >= answered)
                    out.add("answer_to_event", emitted - answered)
                    out.add("event_to_connected", connected - emitted)
                    time.sleep(CALL_HOLD)
                    ring.hangup()
                    log.wait("idle", after=answered)
                except Exception as exc:  # noqa: BLE001 - one bad call is reported, the measurement goes on
                    out.failures.append(f"{backend} press {n}: {exc} (state {log.state})")
                    pbx.cli("channel request hangup all")
                    try:
                        log.wait("idle", after=0.0, timeout=15)
                    except TimeoutError:
                        pass
    finally:
        desk.close()


def row(name: str, ms: list[float], base_p95: float | None = None) -> str:
    p50, p95, worst = percentile(ms, .5), percentile(ms, .95), max(ms) if ms else float("nan")
    ratio = f"{p95 / base_p95:.2f}x" if base_p95 else ""
    return f"| {name} | {len(ms)} | {p50:.1f} | {p95:.1f} | {worst:.1f} | {ratio} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presses", type=int, default=50, help="presses (and baseline calls) per backend")
    parser.add_argument("--backends", default="pjsua2,pyvoip")
    parser.add_argument("--sidecar", choices=("up", "down"), default="up",
                        help="up: a sink accepts telemetry; down: nothing listens (telemetry piles up)")
    parser.add_argument("--switch-interval", type=float, help="diagnosis: sys.setswitchinterval (GIL) in seconds")
    parser.add_argument("--dump", type=Path, help="also write every sample (ms) to this JSON file")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    quiet_logs(args.verbose)
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    baseline, results = Series(), {b: Series() for b in backends}
    header: list[str] = []
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="press-to-ring-") as tmp, TelemetrySink() as sink:
            site = make_site(Path(tmp) / "site", sidecar_port=sink.port if args.sidecar == "up" else free_port())
            with Asterisk(site, command="bench/press_to_ring.py", boot_timeout=60) as pbx:
                header = machine_lines(pbx)
                for backend in backends:
                    print(f"# {backend}: {args.presses} baseline calls, then {args.presses} presses ...", flush=True)
                    bare_block(site, pbx, POSTS[backend], args.presses, baseline)
                    post_block(site, pbx, backend, args.presses, Path(tmp) / f"state-{backend}", results[backend])
    except Exception:  # noqa: BLE001 - a measurement: print what we have and say what broke
        traceback.print_exc()
        print("\n**The run broke off early; the table holds what was measured before.**")
    elapsed = time.monotonic() - started
    if args.dump:
        args.dump.write_text(json.dumps({"baseline": baseline.values, **{b: r.values for b, r in results.items()}}))

    print("\n## Press to ring: post agent vs a bare SIP client, same Asterisk, same run\n")
    print("\n".join(header or machine_lines()))
    print(f"- {args.presses} calls per backend and per baseline block, sequential, hung up between; "
          f"sidecar {args.sidecar}" + (" (a telemetry sink in its own process)" if args.sidecar == "up" else " (nothing listens)")
          + (f"; GIL switch interval {sys.getswitchinterval() * 1000:g} ms" if args.switch_interval else "")
          + f"; run took {elapsed:.0f} s\n")
    base_invite, base_conn = baseline.values.get("invite", []), baseline.values.get("connected", [])
    b95i = percentile(base_invite, .95) if base_invite else None
    b95c = percentile(base_conn, .95) if base_conn else None
    print("| measurement | n | p50 ms | p95 ms | max ms | p95 vs baseline |")
    print("|---|---:|---:|---:|---:|---:|")
    print(row("baseline: bare client INVITE → desk INVITE", base_invite))
    for b in backends:
        print(row(f"{b}: button edge → desk INVITE", results[b].values.get("invite", []), b95i))
        print(row(f"{b}: … of which edge → backend.dial()", results[b].values.get("edge_to_dial", [])))
        print(row(f"{b}: … of which backend.dial() → desk INVITE", results[b].values.get("dial_to_invite", [])))
    print(row("baseline: desk 200 OK → bare client gets 200 OK", base_conn))
    for b in backends:
        print(row(f"{b}: desk 200 OK → post `connected`", results[b].values.get("connected", []), b95c))
        print(row(f"{b}: … of which 200 OK → backend emits CallAnswered", results[b].values.get("answer_to_event", [])))
        print(row(f"{b}: … of which CallAnswered → runner publishes `connected`",
                  results[b].values.get("event_to_connected", [])))
    print()
    failures = baseline.failures + [f for b in backends for f in results[b].failures]
    for failure in failures:
        print(f"- failed: {failure}")
    pj = results.get("pjsua2")
    if pj is not None and pj.values.get("invite") and b95i:
        p95 = percentile(pj.values["invite"], .95)
        verdict = "PASS" if p95 <= TARGET * b95i else "FAIL"
        print(f"**Verdict (target: pjsua2 p95 within {TARGET}x of the baseline): {verdict}** — "
              f"pjsua2 button edge → desk INVITE p95 {p95:.1f} ms vs baseline p95 {b95i:.1f} ms "
              f"({p95 / b95i:.2f}x)" + (f"; {len(failures)} failed calls" if failures else ""))
    else:
        print("**Verdict: no pjsua2 measurement (not run, or every press failed)**")
    return 0


if __name__ == "__main__":
    sys.exit(main())
