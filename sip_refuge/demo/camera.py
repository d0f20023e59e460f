"""A test RTSP camera server whose picture can be switched at runtime: normal, black, frozen or blurred.

Run it with Debian's ``/usr/bin/python3`` (GStreamer's Python bindings, python3-gi, are a Debian package and
not in the venv)::

    /usr/bin/python3 sip_refuge/demo/camera.py --port 8554 --control 8555 \\
        --mount /market-place --mount /bus-station [--user cam --password secret]

Each mount serves an H.264 test pattern that scrolls sideways, so every frame differs from the one before,
as a live street camera's does. A loopback HTTP control port switches a mount's picture:

    curl -X POST --data black http://127.0.0.1:8555/mounts/market-place/mode
    curl http://127.0.0.1:8555/mounts

Modes: ``normal`` (scrolling colour bars with a corner of snow), ``black`` (lens covered, camera dead),
``frozen`` (a sharp still picture, GStreamer's "colors" pattern: a hung encoder) and ``blur`` (defocused or
fogged lens: the picture scaled down 16 times and back up).

A switch changes properties of the running pipelines, so clients already connected see it at once (the
next frames change; no reconnect). Pipelines are made per mount when the first client connects and shared
by later clients; a new pipeline starts in the mount's current mode. ``--port 0`` / ``--control 0`` pick
free ports; the ready line names the ports really used:

    rtsp-camera ready rtsp=rtsp://127.0.0.1:PORT control=http://127.0.0.1:PORT mounts=/a,/b

The :class:`TestCamera` helper at the end starts the server from a test (only the standard library there:
tests import this module under the venv's Python).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote
from urllib.request import Request, urlopen

MODES = ("normal", "black", "frozen", "blur")
READY = re.compile(r"rtsp-camera ready rtsp=(?P<rtsp>\S+) control=(?P<control>\S+) mounts=(?P<mounts>\S*)")
SCROLL = 4  # pixels per frame in normal mode; any motion makes consecutive probes differ across the frame


def launch_line(width: int, height: int, fps: int) -> str:
    # A new client restarts the pipeline, and with it the bars' scroll, from the same first frame. The
    # ball moves by the wall clock instead, so two probes seconds or minutes apart see different pictures.
    # Both selector inputs come from one picture, so switching to blur and back keeps time and caps intact.
    size = f"width={width},height={height},framerate={fps}/1"
    small = f"video/x-raw,width={max(width // 16, 2)},height={max(height // 16, 2)}"
    return (
        f"( compositor name=mix background=black ! videoconvert ! video/x-raw,format=I420,{size} ! tee name=t "
        f"videotestsrc name=src is-live=true pattern=smpte horizontal-speed={SCROLL} ! "
        f"video/x-raw,format=AYUV,{size} ! mix.sink_0 "
        "videotestsrc name=ball is-live=true pattern=ball animation-mode=wall-time background-color=0x00000000 ! "
        f"video/x-raw,format=AYUV,{size} ! "
        # A CCTV-style time stamp: the ball's wall-clock orbit repeats, and a probe every N seconds could
        # land on the same spot each time; the seconds never repeat within a day.
        "clockoverlay name=clock time-format=\"%H:%M:%S\" font-desc=\"Sans Bold 28\" halignment=right "
        "valignment=top shaded-background=true ! mix.sink_1 "
        "t. ! queue max-size-buffers=2 leaky=downstream ! sel.sink_0 "
        f"t. ! queue max-size-buffers=2 leaky=downstream ! videoscale ! {small} ! videoscale ! "
        f"video/x-raw,width={width},height={height} ! sel.sink_1 "
        "input-selector name=sel sync-streams=false ! "
        f"x264enc tune=zerolatency speed-preset=ultrafast key-int-max={fps} ! rtph264pay name=pay0 pt=96 )"
    )


class CameraServer:
    """The gst-rtsp-server side: one shared media factory per mount and the mode each mount shows."""

    def __init__(self, port: int, mounts: list[str], *, width: int, height: int, fps: int,
                 user: str | None, password: str | None) -> None:
        import gi

        gi.require_version("Gst", "1.0")
        gi.require_version("GstRtspServer", "1.0")
        from gi.repository import GLib, Gst, GstRtspServer

        Gst.init(None)
        self.glib: Any = GLib
        self.modes = dict.fromkeys(mounts, "normal")
        self.pipelines: dict[str, list[Any]] = {m: [] for m in mounts}
        self.lock = threading.Lock()
        self.server: Any = GstRtspServer.RTSPServer()
        self.server.set_address("127.0.0.1")
        self.server.set_service(str(port))
        if user is not None and password is not None:
            self._require_login(GstRtspServer, user, password)
        points = self.server.get_mount_points()
        for mount in mounts:
            factory = GstRtspServer.RTSPMediaFactory()
            factory.set_launch(launch_line(width, height, fps))
            factory.set_shared(True)
            if user is not None:
                permissions = GstRtspServer.RTSPPermissions()
                permissions.add_permission_for_role("viewer", "media.factory.access", True)
                permissions.add_permission_for_role("viewer", "media.factory.construct", True)
                factory.set_permissions(permissions)
            factory.connect("media-configure", self._on_media, mount)
            points.add_factory(mount, factory)
        self.server.attach(None)
        self.port: int = self.server.get_bound_port()

    def _require_login(self, rtsp: Any, user: str, password: str) -> None:
        auth = rtsp.RTSPAuth()
        token = rtsp.RTSPToken()
        token.set_string("media.factory.role", "viewer")
        auth.add_basic(rtsp.RTSPAuth.make_basic(user, password), token)
        self.server.set_auth(auth)

    def _on_media(self, _factory: Any, media: Any, mount: str) -> None:
        pipeline = media.get_element()
        with self.lock:
            self.pipelines[mount].append(pipeline)
            self._apply(pipeline, self.modes[mount])
        media.connect("unprepared", self._on_unprepared, mount, pipeline)

    def _on_unprepared(self, _media: Any, mount: str, pipeline: Any) -> None:
        with self.lock:
            if pipeline in self.pipelines[mount]:
                self.pipelines[mount].remove(pipeline)

    @staticmethod
    def _apply(pipeline: Any, mode: str) -> None:
        src, sel = pipeline.get_by_name("src"), pipeline.get_by_name("sel")
        # The SMPTE pattern's corner of snow changes every frame even without scrolling, so the still frame
        # is the sharp, noise-free "colors" pattern: identical frames, as from a hung encoder.
        src.set_property("pattern", {"black": "black", "frozen": "colors"}.get(mode, "smpte"))
        src.set_property("horizontal-speed", 0 if mode == "frozen" else SCROLL)
        # The ball hides (transparent) in every mode but normal and blur.
        ball = pipeline.get_by_name("ball")
        ball.set_property("foreground-color", 0xFFFFFFFF if mode in ("normal", "blur") else 0x00000000)
        pipeline.get_by_name("clock").set_property("silent", mode not in ("normal", "blur"))
        sel.set_property("active-pad", sel.get_static_pad("sink_1" if mode == "blur" else "sink_0"))

    def set_mode(self, mount: str, mode: str) -> None:
        """Switch ``mount`` to ``mode`` in the GLib main loop; returns once the running pipelines have it."""
        done = threading.Event()

        def apply() -> bool:
            with self.lock:
                self.modes[mount] = mode
                for pipeline in self.pipelines[mount]:
                    self._apply(pipeline, mode)
            done.set()
            return False  # run once

        self.glib.idle_add(apply)
        done.wait(5)

    def run(self) -> None:
        self.glib.MainLoop().run()


def control_handler(server: CameraServer) -> type[BaseHTTPRequestHandler]:
    class Control(BaseHTTPRequestHandler):
        def _reply(self, status: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/mounts":
                self._reply(200, dict(server.modes))
            else:
                self._reply(404, {"error": "GET /mounts"})

        def do_POST(self) -> None:
            match = re.fullmatch(r"/mounts(/.+)/mode", self.path)
            length = int(self.headers.get("Content-Length") or 0)
            mode = self.rfile.read(min(length, 64)).decode("ascii", "replace").strip()
            if match is None or match.group(1) not in server.modes:
                self._reply(404, {"error": f"no such mount; mounts: {sorted(server.modes)}"})
            elif mode not in MODES:
                self._reply(400, {"error": f"mode must be one of {', '.join(MODES)}"})
            else:
                server.set_mode(match.group(1), mode)
                self._reply(200, {"mount": match.group(1), "mode": mode})

        def log_message(self, format: str, *args: Any) -> None:
            pass  # tests read stdout for the ready line only

    return Control


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Test RTSP camera with switchable picture (see module doc).")
    parser.add_argument("--port", type=int, default=8554, help="RTSP port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--control", type=int, default=0, help="HTTP control port on 127.0.0.1 (0: any)")
    parser.add_argument("--mount", action="append", required=True, help="a mount path, e.g. /market-place")
    parser.add_argument("--size", default="640x360", help="picture size WIDTHxHEIGHT")
    parser.add_argument("--fps", type=int, default=15)
    parser.add_argument("--user", help="require RTSP Basic login with this user name")
    parser.add_argument("--password", default=os.environ.get("RTSP_CAMERA_PASSWORD"),
                        help="the login's password (default: $RTSP_CAMERA_PASSWORD)")
    args = parser.parse_args(argv)
    mounts = ["/" + m.strip("/") for m in args.mount]
    width, height = (int(v) for v in args.size.lower().split("x"))
    if args.user is not None and not args.password:
        parser.error("--user needs --password or $RTSP_CAMERA_PASSWORD")
    server = CameraServer(args.port, mounts, width=width, height=height, fps=args.fps,
                          user=args.user, password=args.password)
    control = ThreadingHTTPServer(("127.0.0.1", args.control), control_handler(server))
    threading.Thread(target=control.serve_forever, name="control", daemon=True).start()
    print(f"rtsp-camera ready rtsp=rtsp://127.0.0.1:{server.port} control=http://127.0.0.1:"
          f"{control.server_address[1]} mounts={','.join(mounts)}", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    return 0


class TestCamera:
    """Starts this server as a subprocess (Debian's python3) and switches its mounts; for tests and the demo."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, mounts: list[str], *, user: str | None = None, password: str | None = None,
                 python: str = "/usr/bin/python3", size: str = "640x360", fps: int = 15,
                 timeout: float = 20.0, port: int = 0, control_port: int = 0) -> None:
        cmd = [python, os.path.abspath(__file__), "--port", str(port), "--control", str(control_port),
               "--size", size, "--fps", str(fps)]
        for mount in mounts:
            cmd += ["--mount", mount]
        env = dict(os.environ)
        if user is not None:
            cmd += ["--user", user]
            env["RTSP_CAMERA_PASSWORD"] = password or ""
        # stderr goes to a file, not a pipe nobody drains: GStreamer warnings must never block the server.
        self.errors = tempfile.TemporaryFile(mode="w+")
        # Its own session: a Ctrl-C at the terminal reaches the demo, which then stops the camera in order.
        self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.errors, text=True, env=env,
                                        start_new_session=True)
        match = self._await_ready(timeout)
        self.rtsp: str = match.group("rtsp")
        self.control: str = match.group("control")
        self.port = int(self.rtsp.rsplit(":", 1)[1])

    def _await_ready(self, timeout: float) -> re.Match[str]:
        lines: list[str] = []
        found: list[re.Match[str]] = []

        def read() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                lines.append(line)
                match = READY.search(line)
                if match:
                    found.append(match)
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        if not found:
            self.process.kill()
            self.process.wait()
            self.errors.seek(0)
            err = self.errors.read()
            self.stop()
            raise RuntimeError(f"test camera did not start within {timeout} s: {''.join(lines)}{err}")
        return found[0]

    def url(self, mount: str, *, user: str | None = None, password: str | None = None) -> str:
        if user is None:
            return f"{self.rtsp}/{mount.strip('/')}"
        login = quote(user, safe="") + (":" + quote(password, safe="") if password is not None else "")
        return self.rtsp.replace("rtsp://", f"rtsp://{login}@", 1) + "/" + mount.strip("/")

    def set_mode(self, mount: str, mode: str) -> None:
        request = Request(f"{self.control}/mounts/{mount.strip('/')}/mode", data=mode.encode(), method="POST")
        with urlopen(request, timeout=10) as reply:
            reply.read()

    def modes(self) -> dict[str, str]:
        with urlopen(f"{self.control}/mounts", timeout=10) as reply:
            result: dict[str, str] = json.loads(reply.read())
            return result

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.errors.close()

    def __enter__(self) -> TestCamera:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
