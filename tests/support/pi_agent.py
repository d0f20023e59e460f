"""The post agent with its SIP backend's digits on stdin/stdout; run inside the emulated Pi by test_pi_post.py.

Copied into the arm64 root and run with the venv the README made, so it imports only the installed
``sip_refuge`` (never the checkout). It builds the agent as ``sip-refuge post SITE --post ID --gpio mock
--audio null`` does (``load_post``, ``build_runner``, the control server, so ``sip-refuge press`` and
``status`` work), and adds what a separate process cannot otherwise show: the RFC 4733 digits its backend
hears and sends on the current call.

    stdin:  ``dtmf DIGITS`` (send on the current call) | ``stop``
    stdout: ``ready`` | ``heard CALL DIGIT`` | ``sent CALL DIGITS`` | ``stopped``
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

from sip_refuge.post.agent import build_runner, load_post
from sip_refuge.post.control import ControlServer, control_port
from sip_refuge.post.events import Tick
from sip_refuge.post.soundcard import Sound

_out = threading.Lock()


def say(line: str) -> None:
    with _out:
        print(line, flush=True)


def main(site_file: str, post_id: str, state_dir: str) -> int:
    site, post = load_post(site_file, post_id)
    runner = build_runner(site, post, gpio="mock", sound=Sound("null"),
                          spool=Path(state_dir) / f"post-{post_id}-telemetry.jsonl")
    backend: Any = runner.backend  # on_dtmf is a hook of both backends, outside the SipBackend Protocol
    backend.on_dtmf = lambda call_id, digit: say(f"heard {call_id} {digit}")
    server = ControlServer(control_port(site, post), runner.control)
    server.start()
    thread = threading.Thread(target=runner.run, name="runner", daemon=True)
    thread.start()
    say("ready")
    for line in sys.stdin:
        word, _, argument = line.strip().partition(" ")
        if word == "stop":
            break
        if word == "dtmf":
            call = runner.status().get("call") or {}
            runner.backend.send_dtmf(str(call.get("id")), argument)
            say(f"sent {call.get('id')} {argument}")
    runner.stop_event.set()
    runner.emit(Tick())
    thread.join(30)
    server.stop()
    say("stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:4]))
