"""Camera health, snapshots and live view: the only module of sip-refuge that imports opencv.

A probe opens the post camera's RTSP stream, reads a couple of frames and closes it again: decoding a
stream only once per interval costs far less CPU than keeping 20 streams open and decoded (see
``bench/camera_probe.py``). :func:`analyse` judges one frame, shrunk first, against the previous probe's
picture and the camera's own learned sharpness; it is pure, so the rules are unit-tested on synthetic frames.

Only :class:`CameraMonitor` owns threads: its probe thread, and one live-view decoder per camera while anyone
watches it (:meth:`CameraMonitor.feed`, shared by all its viewers). It reports transitions through
``on_change(post_id, ok, reason)``; the sidecar turns them into ``camera.fault`` / ``camera.ok`` events. The capture URL holds the camera
password; logs and every string a page can show use the masked URL.
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import cv2
import numpy as np

from sip_refuge.config.model import Camera, Site
from sip_refuge.errors import SidecarError
from sip_refuge.sidecar.events import camera_url
from sip_refuge.sidecar.live import LiveFeed

log = logging.getLogger(__name__)

ANALYSIS_WIDTH = 320  # analysis runs on a grey picture this wide: cheap, and still shows focus
THUMB_WIDTH = 320
MJPEG_MIMETYPE = "multipart/x-mixed-replace; boundary=frame"
# TCP: UDP RTP is lost behind NAT and firewalls. A short analysis: the SDP of most cameras names the size.
# FFmpeg's default 1 s stream analysis made every open take 1.2 s, and OpenCV opens one stream at a
# time per process: a call's snapshot and the operator's live view queued behind each other. RTSP
# gives the codec parameters in the SDP, so 0.2 s of analysis is plenty (an open takes about 0.35 s).
FFMPEG_OPTIONS = "rtsp_transport;tcp|analyzeduration;200000|probesize;50000"
_env_lock = threading.Lock()


class CameraError(SidecarError):
    """A camera gave no picture (its message holds only the masked URL)."""


@dataclass(frozen=True)
class Limits:
    """Thresholds of :func:`analyse`; grey levels are 0-255 on the shrunk grey picture."""

    black_mean: float = 20.0  # darker than this and ...
    black_spread: float = 10.0  # ... this flat: black (dead sensor, covered lens, no video signal)
    uniform_spread: float = 6.0  # any brightness this flat: uniform (sprayed, taped, white-out)
    still_change: float = 0.1  # mean absolute difference below which two pictures are the very same
    frozen_after: int = 2  # the very same picture on this many probes in a row after the first: frozen
    blur_ratio: float = 0.25  # sharper than this share of the learned median sharpness, or blurred
    baseline_min: int = 3  # healthy probes needed before blur is judged
    baseline_size: int = 20  # healthy sharpness values kept


LIMITS = Limits()


@dataclass(frozen=True)
class Baseline:
    """What a camera has learned: recent healthy sharpness values and how long its picture has been still."""

    sharpness: tuple[float, ...] = ()
    still: int = 0

    def median(self, limits: Limits = LIMITS) -> float | None:
        return statistics.median(self.sharpness) if len(self.sharpness) >= limits.baseline_min else None

    def learn(self, health: Health, limits: Limits = LIMITS) -> Baseline:
        """The baseline after ``health``; only healthy pictures teach sharpness, so a blur never looks normal."""
        if health.reason == "unreachable":
            return self
        still = self.still + 1 if health.still else 0
        sharpness = self.sharpness
        if health.ok:
            sharpness = (sharpness + (health.sharpness,))[-limits.baseline_size:]
        return Baseline(sharpness, still)


@dataclass(frozen=True)
class Health:
    """The verdict on one probe. ``picture`` (the shrunk grey frame) is what the next probe compares with."""

    ok: bool
    reason: str  # ok | unreachable | black | uniform | frozen | blurred
    detail: str
    width: int = 0
    height: int = 0
    mean: float = 0.0
    spread: float = 0.0  # standard deviation of grey levels
    sharpness: float = 0.0  # variance of the Laplacian
    change: float | None = None  # mean absolute difference from the previous picture
    still: bool = False
    picture: Any = field(default=None, repr=False, compare=False)


def shrink(frame: Any, width: int = ANALYSIS_WIDTH) -> Any:
    """A grey copy of ``frame`` at most ``width`` wide, aspect kept."""
    grey = frame if frame.ndim == 2 else cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
    h, w = grey.shape[:2]
    if w <= width:
        return grey
    return cv2.resize(grey, (width, max(1, round(h * width / w))), interpolation=cv2.INTER_AREA)


def analyse(frame: Any, previous: Any, baseline: Baseline, limits: Limits = LIMITS) -> Health:
    """Judge ``frame`` (BGR or grey, any size; None when the camera gave none).

    ``previous`` is the last probe's :attr:`Health.picture` (or None). Frozen is judged on the whole frame
    (mean absolute difference), because a live scene, like a test pattern, can have large static areas.
    """
    if frame is None:
        return Health(False, "unreachable", "no picture from the camera")
    height, width = frame.shape[:2]
    picture = shrink(frame)
    mean, spread = (float(v.flat[0]) for v in cv2.meanStdDev(picture))
    sharpness = float(cv2.Laplacian(picture, cv2.CV_64F).var())
    change = None
    if previous is not None and previous.shape == picture.shape:
        change = float(np.mean(cv2.absdiff(picture, previous)))
    still = change is not None and change < limits.still_change
    seen = dict(width=width, height=height, mean=mean, spread=spread, sharpness=sharpness, change=change,
                still=still, picture=picture)
    median = baseline.median(limits)
    if mean < limits.black_mean and spread < limits.black_spread:
        return Health(False, "black", f"black picture (mean {mean:.0f}, spread {spread:.1f})", **seen)
    if spread < limits.uniform_spread:
        return Health(False, "uniform", f"uniform picture (mean {mean:.0f}, spread {spread:.1f})", **seen)
    if still and baseline.still + 1 >= limits.frozen_after:
        return Health(False, "frozen", f"same picture on {baseline.still + 2} probes in a row", **seen)
    if median is not None and sharpness < limits.blur_ratio * median:
        return Health(False, "blurred", f"sharpness {sharpness:.0f}, usually {median:.0f} (defocus or "
                      "obstruction)", **seen)
    return Health(True, "ok", f"{width}x{height}", **seen)


def _ffmpeg_options() -> None:
    # FFmpeg reads its capture options from the environment on every open. All captures here use the same
    # value, so it is set once, on first use rather than at import, and the opens need no lock.
    with _env_lock:
        if os.environ.get("OPENCV_FFMPEG_CAPTURE_OPTIONS") != FFMPEG_OPTIONS:
            os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = FFMPEG_OPTIONS


def encode_jpeg(frame: Any, width: int | None = None, quality: int = 80) -> bytes:
    if width is not None and frame.shape[1] > width:
        height = max(1, round(frame.shape[0] * width / frame.shape[1]))
        frame = cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise CameraError("could not encode a JPEG")
    return bytes(data.tobytes())


class CameraProbe:
    """Opens one post camera's stream on demand. ``safe_url`` (password masked) is for logs and pages."""

    def __init__(self, post_id: str, camera: Camera, *, open_timeout: float = 15.0, read_timeout: float = 10.0,
                 frames: int = 2) -> None:
        self.post_id = post_id
        self.url = camera_url(camera, reveal=True)
        self.safe_url = camera_url(camera, reveal=False)
        self.open_timeout, self.read_timeout, self.frames = open_timeout, read_timeout, frames

    def open(self) -> Any:
        """An opened cv2.VideoCapture; the caller releases it. Raises :class:`CameraError`."""
        _ffmpeg_options()
        # Generous timeouts: the first frame comes only with the stream's next key frame. One decoder thread:
        # a few frames do not repay starting a pool, and frame threading adds a frame of delay per thread.
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(self.open_timeout * 1000),
                  cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(self.read_timeout * 1000), cv2.CAP_PROP_N_THREADS, 1]
        try:
            capture = cv2.VideoCapture(self.url, cv2.CAP_FFMPEG, params)
        except cv2.error as exc:
            raise CameraError(f"post {self.post_id}: cannot open {self.safe_url}: {type(exc).__name__}") from None
        if not capture.isOpened():
            capture.release()
            raise CameraError(f"post {self.post_id}: cannot open {self.safe_url} (unreachable, refused, "
                              "wrong login or no video)")
        return capture

    def frame(self) -> Any:
        """A fresh frame (BGR): open, read a few frames (the first may predate the key frame), close."""
        capture = self.open()
        try:
            frame = None
            for _ in range(self.frames):
                ok, image = capture.read()
                if not ok:
                    break
                frame = image
        finally:
            capture.release()
        if frame is None:
            raise CameraError(f"post {self.post_id}: {self.safe_url} opened but sent no frame")
        return frame


@dataclass(frozen=True)
class CameraState:
    """What the dashboard shows for one camera. ``ok`` is None until the first probe."""

    post_id: str
    url: str  # masked
    ok: bool | None = None
    reason: str = "not probed yet"
    detail: str = ""
    width: int = 0
    height: int = 0
    probes: int = 0
    checked: float | None = None  # time.time() of the last probe
    baseline: Baseline = Baseline()
    health: Health | None = field(default=None, repr=False, compare=False)


class CameraMonitor:
    """Probes every post camera each ``interval`` seconds in one worker thread and reports transitions.

    ``on_change(post_id, ok, reason)`` runs in the worker thread whenever a camera's (ok, reason) differs
    from the last one reported; ``initial`` seeds that from the store, so a restart repeats nothing.
    """

    def __init__(self, cameras: Mapping[str, Camera], *, interval: float,
                 on_change: Callable[[str, bool, str], None],
                 initial: Mapping[str, tuple[bool, str]] | None = None, limits: Limits = LIMITS,
                 probe_factory: Callable[[str, Camera], CameraProbe] = CameraProbe,
                 mjpeg_fps: float = 5.0) -> None:
        self.interval, self.on_change, self.limits, self.mjpeg_fps = interval, on_change, limits, mjpeg_fps
        self.probes = {post_id: probe_factory(post_id, cam) for post_id, cam in cameras.items()}
        self._states = {p: CameraState(p, probe.safe_url) for p, probe in self.probes.items()}
        self._reported = dict(initial or {})
        self._thumbs: dict[str, bytes] = {}
        self._feeds: dict[str, LiveFeed] = {}
        self._lock = threading.Lock()
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def for_site(cls, site: Site, on_change: Callable[[str, bool, str], None], **options: Any) -> CameraMonitor:
        interval = site.sidecar.camera_interval if site.sidecar is not None else 60
        cameras = {p.id: p.camera for p in site.posts if p.camera is not None}
        return cls(cameras, interval=options.pop("interval", interval), on_change=on_change, **options)

    # -- lifecycle ---------------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Probe until ``stop`` is set. Each camera is due ``interval`` after its last probe began."""
        due = dict.fromkeys(self.probes, time.monotonic())
        while due and not stop.is_set():
            post_id = min(due, key=due.__getitem__)
            if stop.wait(max(0.0, due[post_id] - time.monotonic())):
                break
            due[post_id] = time.monotonic() + self.interval
            try:
                self.probe(post_id)
            except Exception:  # noqa: BLE001 - thread boundary: one camera's surprise must not stop the rest
                log.exception("post %s: camera probe failed unexpectedly", post_id)

    def start(self) -> None:
        """Run in a background thread; ``stop()`` ends it."""
        if self._thread is not None:
            raise SidecarError("the camera monitor is already running")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.run, args=(self._stop,), name="cameras", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop and join; a probe in progress ends within its open/read timeouts."""
        if self._stop is None or self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout)
        self._stop = self._thread = None

    # -- probing -----------------------------------------------------------------------------------------
    def probe(self, post_id: str) -> Health:
        """Probe one camera now (in the caller's thread), update its state and report a transition."""
        probe = self.probes[post_id]
        with self._lock:
            state = self._states[post_id]
        frame = None
        try:
            frame = probe.frame()
        except CameraError as exc:
            log.debug("%s", exc)
        previous = state.health.picture if state.health is not None else None
        health = analyse(frame, previous, state.baseline, self.limits)
        if frame is None:
            health = replace(health, detail=f"no picture from {probe.safe_url}")
        else:
            self._thumbs[post_id] = encode_jpeg(frame, THUMB_WIDTH, 70)
        with self._lock:
            self._states[post_id] = replace(
                state, ok=health.ok, reason=health.reason, detail=health.detail, width=health.width or state.width,
                height=health.height or state.height, probes=state.probes + 1, checked=time.time(),
                baseline=state.baseline.learn(health, self.limits), health=health)
        log.debug("post %s: camera %s: %s (%s)", post_id, probe.safe_url, health.reason, health.detail)
        if self._reported.get(post_id) != (health.ok, health.reason):
            log.log(logging.INFO if health.ok else logging.WARNING, "post %s: camera %s: %s", post_id,
                    "ok" if health.ok else f"fault ({health.reason})", health.detail)
            self.on_change(post_id, health.ok, health.reason)
            # Only once the callback took it: a failed callback is retried on the next probe.
            self._reported[post_id] = (health.ok, health.reason)
        return health

    def state(self, post_id: str) -> CameraState:
        with self._lock:
            return self._states[post_id]

    def states(self) -> dict[str, CameraState]:
        with self._lock:
            return dict(self._states)

    def thumbnail(self, post_id: str) -> bytes | None:
        """The JPEG of the last probe's frame (THUMB_WIDTH wide), for the dashboard."""
        return self._thumbs.get(post_id)

    def snapshot(self, post_id: str, quality: int = 85) -> bytes:
        """A JPEG of a fresh full-size frame (taken when a call is queued). Raises :class:`CameraError`."""
        if post_id not in self.probes:
            raise CameraError(f"post {post_id} has no camera")
        frame = self.probes[post_id].frame()
        self._thumbs[post_id] = encode_jpeg(frame, THUMB_WIDTH, 70)
        return encode_jpeg(frame, None, quality)

    # -- live view ---------------------------------------------------------------------------------------
    def mjpeg(self, post_id: str, stop: threading.Event, *, width: int = 640) -> Iterator[bytes]:
        """Multipart JPEG parts (:data:`MJPEG_MIMETYPE`) of the live stream at ``mjpeg_fps`` at most.

        Runs until ``stop`` is set or the consumer closes the generator (a WSGI server does when the client
        goes away); the capture is released either way. While the camera gives no picture, a placeholder
        part is sent each second, so a departed client is still noticed. A post without a camera raises
        :class:`CameraError` here, at the call, not later inside the response.
        """
        if post_id not in self.probes:
            raise CameraError(f"post {post_id} has no camera")
        return self._live(self.probes[post_id], stop, width)

    def feed(self, post_id: str) -> LiveFeed:
        """The camera's live view shared by all its viewers (:class:`LiveFeed`). Raises :class:`CameraError`."""
        if post_id not in self.probes:
            raise CameraError(f"post {post_id} has no camera")
        with self._lock:
            feed = self._feeds.get(post_id)
            if feed is None:
                feed = self._feeds[post_id] = LiveFeed(post_id, lambda stop: self.mjpeg(post_id, stop))
            return feed

    def close_feeds(self, timeout: float = 15.0) -> None:
        """Stop every live feed's decoder and join them (a decoder waiting on its camera ends within the read
        timeout); later viewers are refused."""
        with self._lock:
            feeds = list(self._feeds.values())
        for feed in feeds:
            feed.close()
        deadline = time.monotonic() + timeout
        for feed in feeds:
            feed.join(max(0.0, deadline - time.monotonic()))

    def _live(self, probe: CameraProbe, stop: threading.Event, width: int) -> Iterator[bytes]:
        period = 1.0 / self.mjpeg_fps
        capture, sent = None, 0.0
        try:
            while not stop.is_set():
                if capture is None:
                    try:
                        capture = probe.open()
                    except CameraError as exc:
                        log.info("%s (live view)", exc)
                        yield _part(_placeholder(width, "camera unavailable"))
                        stop.wait(1.0)
                        continue
                    sent = 0.0
                # grab() decodes every frame, keeping the view current; only frames sent are converted.
                if not capture.grab():  # the stream ended or stalled past the read timeout
                    capture.release()
                    capture = None
                    stop.wait(1.0)
                    continue
                if time.monotonic() - sent >= period:
                    ok, frame = capture.retrieve()
                    if ok:
                        sent = time.monotonic()
                        yield _part(encode_jpeg(frame, width, 75))
        finally:
            if capture is not None:
                capture.release()


def _part(jpeg: bytes) -> bytes:
    head = f"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n".encode("ascii")
    return head + jpeg + b"\r\n"


def _placeholder(width: int, text: str) -> bytes:
    image = np.zeros((width * 9 // 16, width, 3), np.uint8)
    cv2.putText(image, text, (20, width * 9 // 32), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (255, 255, 255), 2)
    return encode_jpeg(image)
