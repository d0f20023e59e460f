"""``sip-refuge post``, ``sip-refuge press`` and ``sip-refuge status``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from sip_refuge.config import Site, load_site
from sip_refuge.config.model import Post
from sip_refuge.config.secrets import Masker, telemetry_token
from sip_refuge.errors import RefugeError
from sip_refuge.logs import setup_logging
from sip_refuge.post.control import ControlServer, ask, control_port
from sip_refuge.post.events import Event, Tick
from sip_refuge.post.panel import MockPanel, Panel
from sip_refuge.post.runner import PostRunner
from sip_refuge.post.sip import Account, load_backend
from sip_refuge.post.sound import Sound
from sip_refuge.post.systemd import Notifier
from sip_refuge.post.telemetry import TelemetryOutbox

log = logging.getLogger(__name__)


def state_dir(args: argparse.Namespace) -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(args.state_dir) if getattr(args, "state_dir", None) else Path(base) / "sip-refuge"


def telemetry_for(site: Site, post: Post, password: str, spool: Path) -> TelemetryOutbox:
    if site.sidecar is None:
        return TelemetryOutbox(post.id, None, None, spool)
    base = site.sidecar.public_url or f"http://{site.sidecar.host}:{site.sidecar.port}"
    return TelemetryOutbox(post.id, f"{base.rstrip('/')}/api/v1/posts/{post.id}/telemetry",
                           telemetry_token(post.id, password), spool)


def load_post(path: str, post_id: str) -> tuple[Site, Post]:
    """The site and one post, reading only that post's own secret.

    A post carries just its own secret: the site's other secrets (AMI, desks, other posts, CCTV keys)
    stay in the control room, so a post taken from the street gives nothing else away.
    """
    site = load_site(path, check_secrets=False)
    post = site.post(post_id)
    try:
        post.secret.read()
    except RefugeError as exc:
        raise RefugeError(f"{path}: posts.{post.id}.secret: {exc} (copy the post's secret from the control "
                          "room; do not run `secrets init` on a post)") from None
    return site, post


def build_runner(site: Site, post: Post, *, gpio: str, sound: Sound, spool: Path) -> PostRunner:
    def panel(emit: Callable[[Event], None]) -> Panel:
        if gpio == "mock":
            return MockPanel(post.gpio, emit, post_id=post.id)
        return Panel(post.gpio, emit, pin_factory=None, post_id=post.id)  # gpiozero's default: lgpio on a Pi

    password = post.secret.read()
    return PostRunner(site, post, backend=load_backend(post.sip_backend),
                      account=Account(post, site.pbx, password, sound=sound, prompts_dir=site.prompts_dir),
                      panel=panel, telemetry=telemetry_for(site, post, password, spool))


def sound_for(args: argparse.Namespace) -> Sound:
    """The sound card the command line asks for: ``--audio-in``/``--audio-out`` (the mock card), ``--audio DEVICE``,
    else ``null`` with mock GPIO (demo, tests) and ALSA's ``default`` on a real post."""
    audio_in, audio_out = getattr(args, "audio_in", None), getattr(args, "audio_out", None)
    if (audio_in is None) != (audio_out is None):
        raise RefugeError("--audio-in and --audio-out go together: the mock card needs a microphone and a speaker")
    if audio_in is not None and getattr(args, "audio", None):
        raise RefugeError("--audio names a sound card; --audio-in/--audio-out replace it with the mock card: "
                          "give one or the other")
    device = args.audio or ("null" if args.gpio == "mock" else "default")
    if audio_in is not None and audio_out is not None:
        return Sound(device, Path(audio_in), Path(audio_out))
    return Sound(device)


def run(args: argparse.Namespace) -> int:
    site, post = load_post(args.site, args.post)
    setup_logging(getattr(args, "verbose", False), Masker.for_site(site), prefix=f"post={post.id}")
    spool = state_dir(args) / f"post-{post.id}-telemetry.jsonl"
    sound = sound_for(args)
    runner = build_runner(site, post, gpio=args.gpio, sound=sound, spool=spool)
    server = ControlServer(control_port(site, post), runner.control)
    notifier = Notifier()
    runner.on_turn = notifier.alive

    def stop(signum: int, frame: FrameType | None) -> None:
        log.info("post %s: stopping (signal %d)", post.id, signum)
        runner.stop_event.set()
        runner.emit(Tick())  # wake the loop now rather than at its next timeout

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    server.start()
    log.info("post %s (%s) starting: backend %s, gpio %s, %s, control 127.0.0.1:%d", post.id, post.name,
             post.sip_backend, args.gpio, sound.describe(), control_port(site, post))
    notifier.ready()
    try:
        runner.run()
    finally:
        server.stop()
    return 0


def press(args: argparse.Namespace) -> int:
    site = load_site(args.site, check_secrets=False)
    reply = ask(control_port(site, site.post(args.post)), {"cmd": "press"})
    if not reply.get("ok"):
        raise RefugeError(str(reply.get("error")))
    print(f"pressed the button of post {args.post}")
    return 0


def status(args: argparse.Namespace) -> int:
    site = load_site(args.site, check_secrets=False)
    reply = ask(control_port(site, site.post(args.post)), {"cmd": "status"})
    reply.pop("ok", None)
    print(json.dumps(reply, indent=2, sort_keys=True))
    return 0
