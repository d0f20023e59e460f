"""Camera probing, snapshots and the MJPEG live view against the real test RTSP camera (gst-rtsp-server)."""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from sip_refuge.config.model import Camera, Secret
from sip_refuge.sidecar.cameras import CameraError, CameraMonitor, CameraProbe, shrink
from tests.support.rtsp_camera import TestCamera

pytestmark = pytest.mark.integration

USER = "refuge"
PASSWORD = "pw-" + secrets.token_urlsafe(12)
MOUNTS = ["/market-place", "/bus-station"]


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def decode(jpeg: bytes) -> Any:
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None, "not a JPEG"
    return image


class Changes:
    """Records on_change calls from the monitor thread."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bool, str]] = []
        self.lock = threading.Lock()

    def __call__(self, post_id: str, ok: bool, reason: str) -> None:
        with self.lock:
            self.seen.append((post_id, ok, reason))

    def of(self, post_id: str) -> list[tuple[bool, str]]:
        with self.lock:
            return [(ok, reason) for p, ok, reason in self.seen if p == post_id]

    def wait(self, post_id: str, change: tuple[bool, str], timeout: float = 20.0) -> None:
        """Wait until ``change`` is the latest one reported for ``post_id``."""
        wait_for(lambda: self.of(post_id)[-1:] == [change], timeout, f"{post_id} -> {change} (seen {self.of(post_id)})")


@pytest.fixture(scope="module")
def camera() -> Iterator[TestCamera]:
    with TestCamera(MOUNTS, user=USER, password=PASSWORD) as cam:
        yield cam


@pytest.fixture(scope="module")
def cameras(camera: TestCamera, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Camera]:
    secret = tmp_path_factory.mktemp("secrets") / "camera"
    secret.write_text(PASSWORD + "\n")
    # The site keeps the password apart from the URL; the probe puts it in.
    return {mount.strip("/"): Camera(camera.url(mount), USER, Secret(file=secret)) for mount in MOUNTS}


def quick(post_id: str, cam: Camera) -> CameraProbe:
    return CameraProbe(post_id, cam, open_timeout=3.0, read_timeout=3.0)


def test_probe_reports_ok_with_frame_size_and_thumbnail(cameras: dict[str, Camera]) -> None:
    """A probe of a healthy camera (with login) reports ok, 640x360, once, and leaves a thumbnail."""
    changes = Changes()
    monitor = CameraMonitor(cameras, interval=60, on_change=changes)
    health = monitor.probe("market-place")
    assert (health.ok, health.reason, health.width, health.height) == (True, "ok", 640, 360)
    monitor.probe("market-place")
    assert changes.of("market-place") == [(True, "ok")]  # reported on the first probe, not repeated
    state = monitor.state("market-place")
    assert (state.ok, state.probes, state.width) == (True, 2, 640)
    thumb = monitor.thumbnail("market-place")
    assert thumb is not None
    assert decode(thumb).shape == (180, 320, 3)


def test_black_and_frozen_faults_and_recovery(camera: TestCamera, cameras: dict[str, Camera]) -> None:
    """black -> camera fault "black", normal -> ok, frozen -> fault "frozen"; the other camera stays ok."""
    changes = Changes()
    monitor = CameraMonitor(cameras, interval=0.5, on_change=changes, initial={"market-place": (True, "ok")})
    monitor.start()
    try:
        changes.wait("bus-station", (True, "ok"))
        camera.set_mode("/market-place", "black")
        changes.wait("market-place", (False, "black"))
        camera.set_mode("/market-place", "normal")
        changes.wait("market-place", (True, "ok"))
        camera.set_mode("/market-place", "frozen")
        changes.wait("market-place", (False, "frozen"))
        camera.set_mode("/market-place", "normal")
        changes.wait("market-place", (True, "ok"))
    finally:
        camera.set_mode("/market-place", "normal")
        monitor.stop()
    # Each transition is reported once, and the seeded state ("ok") is not repeated.
    assert changes.of("market-place") == [(False, "black"), (True, "ok"), (False, "frozen"), (True, "ok")]
    assert changes.of("bus-station") == [(True, "ok")]


def test_blur_against_the_cameras_own_baseline(camera: TestCamera, cameras: dict[str, Camera]) -> None:
    """After learning its sharpness, a camera whose picture goes soft reports "blurred", then recovers."""
    changes = Changes()
    monitor = CameraMonitor({"bus-station": cameras["bus-station"]}, interval=60, on_change=changes)
    try:
        for _ in range(3):
            assert monitor.probe("bus-station").ok
        camera.set_mode("/bus-station", "blur")
        assert monitor.probe("bus-station").reason == "blurred"
        camera.set_mode("/bus-station", "normal")
        assert monitor.probe("bus-station").ok
    finally:
        camera.set_mode("/bus-station", "normal")
    assert changes.of("bus-station") == [(True, "ok"), (False, "blurred"), (True, "ok")]


def test_switch_reaches_an_already_connected_client(camera: TestCamera, cameras: dict[str, Camera]) -> None:
    """A mode switch changes the picture of a stream opened before it (no reconnect needed)."""
    capture = quick("bus-station", cameras["bus-station"]).open()
    try:
        ok, frame = capture.read()
        assert ok and shrink(frame).std() > 20
        camera.set_mode("/bus-station", "black")
        deadline = time.monotonic() + 10
        while True:
            ok, frame = capture.read()
            assert ok and time.monotonic() < deadline, "the open stream never turned black"
            if shrink(frame).max() < 20:
                break
    finally:
        capture.release()
        camera.set_mode("/bus-station", "normal")


def test_snapshot_is_a_full_size_jpeg(cameras: dict[str, Camera]) -> None:
    """snapshot() returns a JPEG of a fresh full-size frame; a post without a camera is a CameraError."""
    monitor = CameraMonitor(cameras, interval=60, on_change=Changes())
    data = monitor.snapshot("market-place")
    assert data[:2] == b"\xff\xd8"
    assert decode(data).shape == (360, 640, 3)
    with pytest.raises(CameraError):
        monitor.snapshot("nowhere")


def test_mjpeg_yields_jpeg_parts_at_a_bounded_rate(cameras: dict[str, Camera]) -> None:
    """The live view yields multipart JPEG parts, at most mjpeg_fps a second, and ends on stop."""
    monitor = CameraMonitor(cameras, interval=60, on_change=Changes(), mjpeg_fps=5)
    stop = threading.Event()
    stream = monitor.mjpeg("market-place", stop)
    stamps = []
    for part in stream:
        head, _, rest = part.partition(b"\r\n\r\n")
        assert head.startswith(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: ")
        jpeg = rest[: int(head.rsplit(b" ", 1)[1])]
        assert decode(jpeg).shape == (360, 640, 3)
        stamps.append(time.monotonic())
        if len(stamps) == 6:
            stop.set()
    assert len(stamps) == 6  # the generator ended by itself once stop was set
    assert stamps[-1] - stamps[0] >= 5 * 0.2 * 0.9  # the 15 fps stream is thinned to 5 fps


def test_unreachable_cameras_fault_without_stalling_the_monitor(cameras: dict[str, Camera]) -> None:
    """A refused and a silent camera fault "unreachable" within their timeouts; the good one goes on."""
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # accepts the TCP connection but never answers RTSP
    bad = {"refused": Camera(f"rtsp://127.0.0.1:{refused.getsockname()[1]}/x", USER, cameras["bus-station"].password),
           "silent": Camera(f"rtsp://127.0.0.1:{silent.getsockname()[1]}/x")}
    changes = Changes()
    monitor = CameraMonitor({**bad, "bus-station": cameras["bus-station"]}, interval=0.5, on_change=changes,
                            probe_factory=quick)
    monitor.start()
    try:
        changes.wait("refused", (False, "unreachable"))
        changes.wait("silent", (False, "unreachable"))
        probes = monitor.state("bus-station").probes
        wait_for(lambda: monitor.state("bus-station").probes >= probes + 2, 30, "the good camera to be probed on")
        assert monitor.state("bus-station").ok
        assert "no picture from rtsp://refuge@127.0.0.1:" in monitor.state("refused").detail
    finally:
        thread = monitor._thread
        monitor.stop(timeout=15)
        refused.close()
        silent.close()
    assert thread is not None and not thread.is_alive(), "stop() did not end the monitor thread"


def test_password_never_logged_or_shown(cameras: dict[str, Camera], caplog: pytest.LogCaptureFixture,
                                        capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """No log line, state, error or native (FFmpeg/OpenCV) output carries the camera password."""
    caplog.set_level(logging.DEBUG, logger="sip_refuge")
    wrong = tmp_path / "wrong"
    wrong.write_text("not-" + PASSWORD)
    good = cameras["market-place"]
    probe_cams = {"good": good, "wrong-login": Camera(good.rtsp_url, USER, Secret(file=wrong)),
                  "gone": Camera("rtsp://127.0.0.1:9/x", USER, good.password)}
    monitor = CameraMonitor(probe_cams, interval=60, on_change=Changes(), probe_factory=quick)
    reasons = {post_id: monitor.probe(post_id).reason for post_id in probe_cams}
    assert reasons == {"good": "ok", "wrong-login": "unreachable", "gone": "unreachable"}
    with pytest.raises(CameraError) as error:
        monitor.snapshot("gone")
    assert PASSWORD in monitor.probes["good"].url  # the capture itself does use it
    shown = [caplog.text, str(error.value), repr(monitor.states()), capfd.readouterr().err]
    assert "rtsp://refuge@127.0.0.1" in caplog.text  # the user name helps; the password stays out
    for text in shown:
        assert PASSWORD not in text
