"""``sip-refuge demo``: everything on loopback in one command, stopped cleanly by Ctrl-C.

Started in this order, stopped in reverse: test camera, Asterisk, webhook printer (the CCTV
stand-in), sidecar, post agents (one per SIP backend, mock GPIO), desk robots. Every child runs in
its own session, so a Ctrl-C reaches only the demo, which then stops each part and checks that no
port is left open.
"""

from __future__ import annotations

import argparse
import json
import secrets as random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import wave
from collections.abc import Callable
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

from sip_refuge.config import Site, load_site
from sip_refuge.config.passwords import hash_password
from sip_refuge.config.secrets import init_secrets
from sip_refuge.config.users import set_user
from sip_refuge.control import ask, control_port
from sip_refuge.errors import RefugeError

REPO = Path(__file__).resolve().parents[2]
DEMO_SITE = REPO / "config" / "demo.yaml"
VOICE = Path(__file__).with_name("operator-voice.wav")
CAMERA_CONTROL = 8555
ANSWER_AFTER = 4.0  # seconds the desk phones ring before the robot operator picks up
TALK_FOR = 20.0  # seconds the robot operator stays on the line after its message
READY_LINE = "sip-refuge demo is ready"
LOGIN_LINE = "operator login"
DEMO_OPERATOR = "demo"


def say(text: str) -> None:
    print(text, flush=True)


def ports_of(site: Site) -> list[tuple[str, int, str]]:
    assert site.sidecar is not None
    out = [("udp", site.pbx.sip_port, "Asterisk SIP"), ("tcp", site.pbx.ami.port, "Asterisk AMI"),
           ("tcp", site.sidecar.port, "sidecar"), ("tcp", CAMERA_CONTROL, "camera control")]
    out += [("tcp", control_port(site, p), f"post {p.id} control") for p in site.posts]
    for target in site.cctv:
        url = str(getattr(target.options, "url", None) or "")
        if url.startswith("http://127.0.0.1:"):
            out.append(("tcp", int(url.split(":")[2].split("/")[0]), f"CCTV stand-in {target.name}"))
    for post in site.posts:
        if post.camera and post.camera.rtsp_url.startswith("rtsp://127.0.0.1:"):
            out.append(("tcp", int(post.camera.rtsp_url.split(":")[2].split("/")[0]), "test camera"))
    return sorted(set(out))


def busy(kind: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM) as s:
        if kind == "tcp":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


class Demo:
    def __init__(self, site_path: Path, log_dir: Path) -> None:
        self.site_path, self.log_dir = site_path, log_dir
        self.stop_event = threading.Event()
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.operator = (DEMO_OPERATOR, "")

    # -- parts ---------------------------------------------------------------------------------
    def child(self, name: str, *argv: str) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - kept open for the child's lifetime
        proc = subprocess.Popen([sys.executable, "-m", "sip_refuge.cli", *argv], stdout=log, stderr=log,
                                start_new_session=True)
        self.children.append((name, proc))
        return proc

    def stop_children(self) -> None:
        for _name, proc in reversed(self.children):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in reversed(self.children):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                say(f"  {name} did not stop in time; killing it")
                proc.kill()
                proc.wait()

    def wait_until(self, what: str, probe: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stop_event.is_set():
                raise KeyboardInterrupt
            for name, proc in self.children:
                if proc.poll() is not None:
                    raise RefugeError(f"{name} stopped (status {proc.returncode}); see {self.log_dir / name}.log")
            try:
                if probe():
                    return
            except (OSError, RefugeError, ValueError):
                pass
            time.sleep(0.2)
        raise RefugeError(f"timed out waiting for {what}; logs are in {self.log_dir}")

    def run(self) -> int:
        site = load_site(self.site_path, check_secrets=False)
        created = init_secrets(site)
        if created:
            say(f">> created {len(created)} demo secrets in {created[0].parent}")
        self.operator = self._operator_login(load_site(self.site_path, check_secrets=False))
        site = load_site(self.site_path)
        taken = [f"{what} ({kind} {port})" for kind, port, what in ports_of(site) if busy(kind, port)]
        if taken:
            raise RefugeError("ports the demo needs are in use: " + ", ".join(taken)
                              + "; stop what uses them (another demo?) and try again")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._signal)
        with ExitStack() as stack:
            try:
                self._start(site, stack)
                self._screen(site)
                while not self.stop_event.wait(0.5):
                    for name, proc in self.children:
                        if proc.poll() is not None:
                            raise RefugeError(f"{name} stopped (status {proc.returncode}); "
                                              f"see {self.log_dir / name}.log")
            except KeyboardInterrupt:
                pass
            finally:
                say("\n>> stopping the demo ...")
                self.stop_children()
        left = [f"{what} ({kind} {port})" for kind, port, what in ports_of(site) if busy(kind, port)]
        if left:
            say("!! still in use after stopping: " + ", ".join(left))
            return 1
        say(">> stopped; nothing left running")
        return 0

    def _operator_login(self, site: Site) -> tuple[str, str]:
        """The demo's operator (an admin, so the audit log can be read too), with a new password each run: the
        pages need a login, and only this run's screen shows the password."""
        users = site.sidecar.users_file if site.sidecar is not None else None
        if users is None:
            raise RefugeError(f"{self.site_path}: the demo site needs sidecar.users_file (config/demo.yaml has one)")
        password = random.token_urlsafe(12)
        set_user(users, DEMO_OPERATOR, "admin", hash_password(password))
        return DEMO_OPERATOR, password

    def _signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop_event.set()

    def _start(self, site: Site, stack: ExitStack) -> None:
        from sip_refuge.demo.camera import TestCamera
        from sip_refuge.demo.receiver import WebhookPrinter
        from sip_refuge.pbx.asterisk import Asterisk, find_asterisk

        say(">> Asterisk 22 (the first run builds a Debian-unstable root folder: about 30 s) ...")
        find_asterisk(progress=lambda line: say(f"   {line}"))
        mounts = [p.camera.rtsp_url.rsplit("/", 1)[1] for p in site.posts if p.camera]
        rtsp_port = int(next(p.camera.rtsp_url for p in site.posts if p.camera).split(":")[2].split("/")[0])
        say(f">> test camera on rtsp://127.0.0.1:{rtsp_port}/ ({', '.join(mounts)})")
        camera = stack.enter_context(TestCamera([f"/{m}" for m in mounts], port=rtsp_port,
                                                control_port=CAMERA_CONTROL))
        self.camera = camera
        pbx = stack.enter_context(Asterisk(site, command="sip-refuge demo"))
        say(f">> Asterisk running (logs: {pbx.messages_log})")
        for target in site.cctv:
            url = str(getattr(target.options, "url", None) or "")
            if target.type == "webhook" and target.secret is not None and url.startswith("http://127.0.0.1:"):
                printer = WebhookPrinter(int(url.split(":")[2].split("/")[0]), target.secret.read(), say)
                printer.start()
                stack.callback(printer.stop)
        say(">> sidecar ...")
        self.child("sidecar", "sidecar", str(self.site_path))
        assert site.sidecar is not None
        health = f"http://{site.sidecar.host}:{site.sidecar.port}/healthz"
        self.wait_until("the sidecar to connect to Asterisk", lambda: _json(health).get("status") == "ok", 60)
        for post in site.posts:
            say(f">> post {post.id} ({post.sip_backend}, mock GPIO) ...")
            # The mock sound card: the post's microphone hears the one voice the package ships (a caller, here),
            # and what its speaker plays is kept beside the logs, so the demo's self-test has a speaker to hear.
            self.child(f"post-{post.id}", "post", str(self.site_path), "--post", post.id, "--gpio", "mock",
                       "--state-dir", str(self.log_dir), "--audio-in", str(VOICE),
                       "--audio-out", str(self.log_dir / f"post-{post.id}-speaker.wav"))
        for post in site.posts:
            self.wait_until(f"post {post.id} to register", partial(_registered, control_port(site, post)), 60)
        self._robots(site, stack)

    def _robots(self, site: Site, stack: ExitStack) -> None:
        from sip_refuge.demo.robot import DeskRobot

        with wave.open(str(VOICE)) as wav:
            voice = wav.readframes(wav.getnframes())
        for desk in site.desks:
            robot = stack.enter_context(DeskRobot(desk.id, desk.secret.read(), (site.pbx.host, site.pbx.sip_port),
                                                  answer_after=ANSWER_AFTER, display=desk.name))
            robot.wait_registered(timeout=30)
            say(f">> desk robot {desk.id} ({desk.name}) answers after {ANSWER_AFTER:.0f} s")
            threading.Thread(target=self._operator, args=(robot, voice), name=f"operator-{desk.id}",
                             daemon=True).start()

    def _operator(self, robot: Any, voice: bytes) -> None:
        """The robot operator: speaks once answered, stays on the line a while, then hangs up."""
        handled: set[int] = set()
        while not self.stop_event.wait(0.2):
            for index, ring in enumerate(list(robot.rings)):
                if index in handled or ring.answered_at is None:
                    continue
                handled.add(index)
                try:
                    robot.play_pcm(voice, ring)
                    if not self.stop_event.wait(TALK_FOR) and ring.ended_at is None:
                        robot.hangup(ring)
                except Exception as exc:  # noqa: BLE001 - thread boundary: the demo goes on
                    say(f"   desk robot: {exc}")

    def _screen(self, site: Site) -> None:
        assert site.sidecar is not None
        base = f"http://{site.sidecar.host}:{site.sidecar.port}"
        rel = self.site_path
        lines = [
            "",
            "=" * 78,
            f" {READY_LINE}: {site.name}",
            "=" * 78,
            f" dashboard       {base}/",
            f" operator page   {base}/operator?desk={site.desks[0].id}",
            f" metrics         {base}/metrics",
            f" {LOGIN_LINE}   name {self.operator[0]}, password {self.operator[1]}   (new each run)",
            "",
            " press a post's button (in another terminal):",
        ]
        lines += [f"   .venv/bin/sip-refuge press {rel} --post {p.id}      # {p.name}, {p.sip_backend}"
                  for p in site.posts]
        lines += [
            f"   .venv/bin/sip-refuge status {rel} --post {site.posts[0].id}",
            "   or the dashboard's press button (logged in as the operator above)",
            "",
            " make a camera fault (black picture), and mend it:",
            f"   curl -X POST --data black http://127.0.0.1:{CAMERA_CONTROL}/mounts/{site.posts[-1].id}/mode",
            f"   curl -X POST --data normal http://127.0.0.1:{CAMERA_CONTROL}/mounts/{site.posts[-1].id}/mode",
            "",
            f" the desk robot answers after {ANSWER_AFTER:.0f} s and speaks; CCTV events print below as [cctv].",
            f" logs: {self.log_dir}/   Ctrl-C stops everything.",
            "=" * 78,
        ]
        say("\n".join(lines))


def _registered(port: int) -> bool:
    return bool(ask(port, {"cmd": "status"}, timeout=1).get("registered"))


def _json(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            body: dict[str, Any] = json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        body = json.loads(exc.read() or b"{}")
    return body


def run(args: argparse.Namespace) -> int:
    site_path = Path(args.site) if getattr(args, "site", None) else DEMO_SITE
    log_dir = Path(args.log_dir) if getattr(args, "log_dir", None) else REPO / "var" / "demo"
    return Demo(site_path, log_dir).run()
