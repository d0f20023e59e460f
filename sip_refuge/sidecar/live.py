"""One camera's live view shared by all who watch it: one decoder thread, only while anyone watches.

The decoder is :meth:`sip_refuge.sidecar.cameras.CameraMonitor.mjpeg` (it needs OpenCV; this module does
not). Viewers are the HTTP server's live views (:class:`sip_refuge.sidecar.web.stream.LiveView`), each a
coroutine in the server's event loop: twenty people watching one camera cost one decoder, not twenty.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator

from sip_refuge.errors import SidecarError

log = logging.getLogger(__name__)


class LiveFeed:
    """One camera's live view for all its viewers: one decoder thread, only while anyone watches.

    The thread runs ``source(stop)`` (the parts of :meth:`CameraMonitor.mjpeg`) and keeps the latest part with
    its number; after each part it calls every viewer's ``wake()`` (which must not block: an event loop's
    nudge), and each viewer takes :meth:`latest`. A viewer that writes slowly skips parts, none is queued for
    it. When the last viewer leaves the decoder stops (at its next part); the next viewer starts a fresh one.
    """

    def __init__(self, post_id: str, source: Callable[[threading.Event], Iterator[bytes]]) -> None:
        self.post_id, self.source = post_id, source
        self._lock = threading.Lock()
        self._viewers: dict[object, Callable[[], None]] = {}
        self._number, self._part = 0, b""
        self._stop: threading.Event | None = None  # the current decoder's; None while nobody watches
        self._threads: list[threading.Thread] = []  # decoders running or still ending, for join()
        self._closed = False

    def watch(self, wake: Callable[[], None]) -> object:
        """Start watching; pass the returned viewer to :meth:`leave`. Raises :class:`SidecarError` once closed."""
        viewer = object()
        with self._lock:
            if self._closed:
                raise SidecarError(f"post {self.post_id}: the sidecar is stopping")
            self._viewers[viewer] = wake
            if self._stop is None:
                self._part = b""  # never show a picture left from an earlier viewing
                self._stop = threading.Event()
                thread = threading.Thread(target=self._run, args=(self._stop,), name=f"live-{self.post_id}",
                                          daemon=True)
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]
                thread.start()
        return viewer

    def leave(self, viewer: object) -> None:
        with self._lock:
            self._viewers.pop(viewer, None)
            if not self._viewers and self._stop is not None:
                self._stop.set()
                self._stop = None

    def latest(self) -> tuple[int, bytes | None]:
        """The newest part and its number (None before the first part of this viewing)."""
        with self._lock:
            return self._number, self._part or None

    def viewers(self) -> int:
        with self._lock:
            return len(self._viewers)

    def close(self) -> None:
        """Stop the decoder without waiting (see :meth:`join`); later viewers are refused."""
        with self._lock:
            self._closed = True
            self._viewers.clear()
            if self._stop is not None:
                self._stop.set()
                self._stop = None

    def join(self, timeout: float | None = None) -> None:
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout)

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            parts = self.source(stop)
            try:
                for part in parts:
                    with self._lock:
                        if stop.is_set():  # a decoder still ending must not overwrite a newer one's part
                            break
                        self._number += 1
                        self._part = part
                        wakes = list(self._viewers.values())
                    for wake in wakes:
                        wake()
            except Exception:  # noqa: BLE001 - thread boundary: log, then decode afresh for the viewers
                log.exception("post %s: live view failed", self.post_id)
                stop.wait(1.0)
            finally:
                close = getattr(parts, "close", None)
                if close is not None:
                    close()  # a generator releases its capture
