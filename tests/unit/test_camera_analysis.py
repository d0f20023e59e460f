"""analyse() and Baseline on synthetic frames (black, uniform, frozen, blurred, normal); the monitor's bookkeeping."""

from __future__ import annotations

import threading
from typing import Any

import cv2
import numpy as np
import pytest

from sip_refuge.config.model import Camera
from sip_refuge.sidecar.cameras import (
    Baseline,
    CameraError,
    CameraMonitor,
    CameraProbe,
    Health,
    Limits,
    analyse,
    encode_jpeg,
    shrink,
)


def scene(seed: int = 1, width: int = 640, height: int = 360) -> Any:
    """A sharp, busy BGR picture: random rectangles on a gradient, different for each seed."""
    rng = np.random.default_rng(seed)
    image: Any = np.tile(np.linspace(40, 200, width, dtype=np.uint8), (height, 1))
    image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    for _ in range(40):
        x, y = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.rectangle(image, (x, y), (x + int(rng.integers(10, 80)), y + int(rng.integers(10, 60))), colour, -1)
    return image


def learned(count: int = 5) -> Baseline:
    """The baseline of a camera after ``count`` healthy probes of changing scenes."""
    baseline, previous = Baseline(), None
    for seed in range(count):
        health = analyse(scene(seed), previous, baseline)
        assert health.ok, health
        baseline, previous = baseline.learn(health), health.picture
    return baseline


def test_normal_picture_is_ok_with_its_size() -> None:
    health = analyse(scene(), None, Baseline())
    assert (health.ok, health.reason, health.width, health.height) == (True, "ok", 640, 360)
    assert health.picture.shape == (180, 320)  # shrunk before analysis


def test_unreachable_when_no_frame() -> None:
    health = analyse(None, None, Baseline())
    assert (health.ok, health.reason) == (False, "unreachable")
    assert Baseline((1.0, 2.0), 1).learn(health) == Baseline((1.0, 2.0), 1)


@pytest.mark.parametrize("level", [0, 12])
def test_black(level: int) -> None:
    frame = np.full((360, 640, 3), level, np.uint8)
    frame[::7, ::11] += 3  # a little sensor noise does not make it a picture
    health = analyse(frame, None, learned())
    assert (health.ok, health.reason) == (False, "black")


@pytest.mark.parametrize("level", [128, 250])
def test_uniform_grey_or_white(level: int) -> None:
    health = analyse(np.full((360, 640, 3), level, np.uint8), None, Baseline())
    assert (health.ok, health.reason) == (False, "uniform")


def test_dark_night_scene_with_street_lights_is_not_black() -> None:
    night = (scene(3).astype(np.float32) * 0.1).astype(np.uint8)
    for x in (80, 300, 520):
        cv2.circle(night, (x, 60), 14, (255, 255, 240), -1)
    health = analyse(night, None, Baseline())
    assert health.mean < 20 and health.ok, health


def test_frozen_after_the_same_picture_on_three_probes() -> None:
    limits = Limits(frozen_after=2)
    baseline, previous, reasons = learned(), None, []
    for _ in range(4):
        health = analyse(scene(9), previous, baseline, limits)
        reasons.append(health.reason)
        baseline, previous = baseline.learn(health, limits), health.picture
    assert reasons == ["ok", "ok", "frozen", "frozen"]
    # It recovers as soon as the picture moves.
    assert analyse(scene(10), previous, baseline, limits).reason == "ok"


def test_mostly_static_scene_with_small_motion_is_not_frozen() -> None:
    """A street with a static background: only a small region changes, which the whole-frame metric sees."""
    baseline, previous = learned(), None
    for step in range(5):
        frame = scene(4)
        cv2.circle(frame, (100 + 30 * step, 200), 12, (255, 255, 255), -1)
        health = analyse(frame, previous, baseline)
        assert health.ok, health
        baseline, previous = baseline.learn(health), health.picture


def test_blurred_against_own_baseline() -> None:
    baseline = learned()
    blurred = cv2.GaussianBlur(scene(20), (0, 0), 6)
    health = analyse(blurred, None, baseline)
    assert (health.ok, health.reason) == (False, "blurred")
    assert "sharpness" in health.detail
    # A blurred picture never teaches the baseline, so a long defocus stays a fault.
    assert baseline.learn(health).sharpness == baseline.sharpness


def test_blur_is_not_judged_before_a_baseline_exists() -> None:
    blurred = cv2.GaussianBlur(scene(20), (0, 0), 6)
    assert analyse(blurred, None, Baseline()).reason == "ok"


def test_mildly_softer_picture_is_still_ok() -> None:
    soft = cv2.GaussianBlur(scene(21), (3, 3), 0.6)
    assert analyse(soft, None, learned()).ok


def test_baseline_keeps_recent_healthy_values() -> None:
    limits = Limits(baseline_size=3, baseline_min=2)
    baseline = Baseline()
    assert baseline.median(limits) is None
    for value in (10.0, 20.0, 30.0, 40.0):
        baseline = baseline.learn(Health(True, "ok", "", sharpness=value), limits)
    assert baseline.sharpness == (20.0, 30.0, 40.0)
    assert baseline.median(limits) == 30.0


def test_grey_input_and_small_frames_are_accepted() -> None:
    grey = cv2.cvtColor(scene(5, 160, 90), cv2.COLOR_BGR2GRAY)
    health = analyse(grey, None, Baseline())
    assert (health.ok, health.width, health.height) == (True, 160, 90)
    assert shrink(grey) is grey


def test_resolution_change_is_not_compared() -> None:
    first = analyse(scene(6), None, Baseline())
    second = analyse(scene(6, 1280, 720), first.picture, Baseline())
    assert second.change is None or second.change >= 0  # compared only when the shrunk sizes match
    assert second.ok


def test_jpeg_encoding() -> None:
    data = encode_jpeg(scene(7), width=320)
    assert data[:2] == b"\xff\xd8"
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert decoded is not None and decoded.shape == (180, 320, 3)


class ScriptedProbe(CameraProbe):
    """A probe whose frames come from a list (None: no picture), for the monitor's bookkeeping."""

    script: list[Any] = []

    def frame(self) -> Any:
        item = self.script.pop(0)
        if item is None:
            raise CameraError(f"post {self.post_id}: cannot open {self.safe_url}")
        return item

    def open(self) -> Any:
        raise CameraError(f"post {self.post_id}: cannot open {self.safe_url}")


def test_monitor_reports_transitions_once_and_retries_a_failed_callback() -> None:
    ScriptedProbe.script = [scene(1), scene(2), None, None, np.zeros((360, 640, 3), np.uint8), scene(3), scene(4)]
    seen: list[tuple[str, bool, str]] = []
    fail = [False]

    def on_change(post_id: str, ok: bool, reason: str) -> None:
        if fail[0]:
            fail[0] = False
            raise RuntimeError("store busy")
        seen.append((post_id, ok, reason))

    monitor = CameraMonitor({"p1": Camera("rtsp://u:inline@cam/1")}, interval=60, on_change=on_change,
                            initial={"p1": (True, "ok")}, probe_factory=ScriptedProbe)
    assert monitor.state("p1").url == "rtsp://u:***@cam/1"
    for _ in range(4):
        monitor.probe("p1")
    fail[0] = True
    with pytest.raises(RuntimeError):
        monitor.probe("p1")  # black, but the callback failed, so it stays unreported ...
    monitor.probe("p1")  # ... and the next probe reports the state as it is then: ok again
    monitor.probe("p1")
    assert seen == [("p1", False, "unreachable"), ("p1", True, "ok")]
    assert monitor.state("p1").probes == 7


def test_mjpeg_sends_a_placeholder_while_the_camera_is_down() -> None:
    monitor = CameraMonitor({"p1": Camera("rtsp://cam/1")}, interval=60, on_change=lambda *_: None,
                            probe_factory=ScriptedProbe)
    stop = threading.Event()
    stream = monitor.mjpeg("p1", stop)
    part = next(stream)
    stop.set()
    assert part.startswith(b"--frame\r\nContent-Type: image/jpeg\r\n") and b"\xff\xd8" in part
    assert list(stream) == []
    with pytest.raises(CameraError):
        monitor.mjpeg("no-camera", stop)  # at the call, before any response is started
