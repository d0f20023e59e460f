"""The camera snapshot taken when each call is queued (the events' ``snapshot_url``), kept in memory.

A snapshot takes seconds (the camera's next key frame), so it never holds up ``call.queued``: the recorder
asks for one with :meth:`SnapshotCache.take` and goes on. One worker takes them in turn, so a burst of calls
cannot start a burst of threads; the runner owns that thread (``run`` is its body, ``close`` ends it). Only
the newest ``kept`` snapshots stay; an older incident's snapshot URL answers 404.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable

log = logging.getLogger(__name__)

SNAPSHOTS_KEPT = 200


class SnapshotCache:
    def __init__(self, source: Callable[[str], bytes | None], kept: int = SNAPSHOTS_KEPT) -> None:
        self.source, self.kept = source, kept
        self._lock = threading.Lock()
        self._images: OrderedDict[str, bytes] = OrderedDict()
        self._done: OrderedDict[str, threading.Event] = OrderedDict()  # incidents asked for, oldest first
        self._jobs: queue.SimpleQueue[tuple[str, str] | None] = queue.SimpleQueue()
        self._closed = False

    def take(self, incident: str, post_id: str) -> None:
        """Take ``post_id``'s snapshot for ``incident`` soon (in the worker)."""
        with self._lock:
            if self._closed:
                return
            self._done[incident] = threading.Event()
            self._forget_old()
        self._jobs.put((incident, post_id))

    def get(self, incident: str, wait: float = 0.0) -> bytes | None:
        """The JPEG of ``incident``; waits up to ``wait`` s if it is still being taken."""
        with self._lock:
            done = self._done.get(incident)
        if done is not None and wait > 0:
            done.wait(wait)
        with self._lock:
            return self._images.get(incident)

    def run(self) -> None:
        """The worker: take snapshots in turn until :meth:`close`."""
        while (job := self._jobs.get()) is not None:
            incident, post_id = job
            with self._lock:
                done, closed = self._done.get(incident), self._closed
            if done is None:
                continue  # already forgotten (more than ``kept`` newer calls were queued meanwhile)
            if closed:
                done.set()  # stopping: skip the snapshots still queued
                continue
            try:
                image = self.source(post_id)
                if image:
                    with self._lock:
                        if incident in self._done:
                            self._images[incident] = image
                            self._forget_old()
            except Exception:  # noqa: BLE001 - thread boundary: a failed snapshot leaves the call untouched
                log.exception("post %s: snapshot for incident %s failed", post_id, incident)
            finally:
                done.set()

    def close(self) -> None:
        """Stop taking snapshots; the worker ends after the one in progress (within its camera's timeouts)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._jobs.put(None)

    def _forget_old(self) -> None:
        """Keep the newest ``kept`` incidents' snapshots (called with the lock held)."""
        while len(self._done) > self.kept:
            old, done = self._done.popitem(last=False)
            self._images.pop(old, None)
            done.set()  # nobody waits any longer for a snapshot that will not be kept
        while len(self._images) > self.kept:
            self._images.popitem(last=False)
