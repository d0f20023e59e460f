"""Telemetry from the post to the sidecar, through a small local outbox.

A down or slow sidecar must never delay a call: ``put`` only appends to memory, and one sender thread
(owned by the runner) keeps the spool file up to date and posts in order, retrying with backoff. The
spool keeps reports across a restart of the agent; it is bounded so a long outage cannot fill the disk.
Reports are :class:`~sip_refuge.telemetry.Telemetry` messages, kept and sent as their JSON.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path

from sip_refuge.telemetry import Telemetry, TelemetryError

log = logging.getLogger(__name__)

MAX_KEPT = 1000  # oldest reports are dropped (and counted) beyond this
SETTLE = 0.05  # seconds a sender that was idle waits before sending: a call's SIP goes first


class TelemetryOutbox:
    def __init__(self, post_id: str, url: str | None, token: str | None, spool: Path | None = None,
                 *, timeout: float = 3.0) -> None:
        self.post_id, self.url, self.token, self.spool, self.timeout = post_id, url, token, spool, timeout
        self._pending: deque[str] = deque()  # each report's JSON
        self._cond = threading.Condition()
        self._stopping = False
        self._dirty = False  # the spool file is behind the pending reports
        self._thread: threading.Thread | None = None
        self.sent = 0
        self.dropped = 0
        self.last_error: str | None = None
        self._load_spool()

    # -- producer side (the runner's thread) ---------------------------------------------------------
    def put(self, report: Telemetry) -> None:
        """Queue ``report``; no I/O here (it runs on the post's one loop, between call events)."""
        text = report.to_json()
        with self._cond:
            self._pending.append(text)
            while len(self._pending) > MAX_KEPT:
                self._pending.popleft()
                self.dropped += 1
            self._dirty = True
            self._cond.notify()

    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    # -- sender thread ---------------------------------------------------------------------------
    def start(self) -> None:
        if self.url is None:
            log.info("post %s: no sidecar configured; telemetry stays local", self.post_id)
            return
        self._thread = threading.Thread(target=self._run, name=f"telemetry-{self.post_id}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(self.timeout + 2)
        self._save()  # whatever is still unsent survives a restart of the agent

    def _run(self) -> None:
        backoff = 1.0
        while True:
            self._save()
            with self._cond:
                idle = not self._pending
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if idle:
                    # Reports come in bursts at the moments that matter (a press, an answer): let the
                    # call's own SIP work have the CPU first, then send the burst.
                    until = time.monotonic() + SETTLE
                    while not self._stopping and (left := until - time.monotonic()) > 0:
                        self._cond.wait(left)
                if self._stopping:
                    return
                report = self._pending[0]
            try:
                self._send(report)
            except Exception as exc:  # noqa: BLE001 - thread boundary: keep the report, retry later
                if self.last_error is None:
                    log.warning("post %s: sidecar unreachable (%s); keeping telemetry", self.post_id, exc)
                self.last_error = str(exc)
                with self._cond:
                    self._cond.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 1.0
            if self.last_error is not None:
                log.info("post %s: sidecar reachable again", self.post_id)
            self.last_error = None
            with self._cond:
                if self._pending and self._pending[0] is report:
                    self._pending.popleft()
                self.sent += 1
                self._dirty = True

    def _send(self, report: str) -> None:
        assert self.url is not None
        request = urllib.request.Request(self.url, data=report.encode(), method="POST",
                                         headers={"Content-Type": "application/json",
                                                  "Authorization": f"Bearer {self.token or ''}"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            if 400 <= exc.code < 500 and exc.code not in (401, 403, 408, 429):
                # The sidecar refused this report for good (e.g. malformed): retrying would block the rest.
                log.error("post %s: sidecar refused telemetry (%s %s); dropping it", self.post_id, exc.code,
                          exc.read(2000).decode("utf-8", "replace").strip())
                return
            raise

    # -- spool -------------------------------------------------------------------------------------
    def _load_spool(self) -> None:
        if self.spool is None or not self.spool.exists():
            return
        for number, line in enumerate(self.spool.read_bytes().splitlines(), 1):
            # Read as the sidecar reads it: a spool of an earlier version is sent in today's form, and a damaged
            # line is dropped here rather than refused by the sidecar.
            try:
                self._pending.append(Telemetry.from_json(line).to_json())
            except TelemetryError as exc:
                log.warning("post %s: %s:%d: skipping a telemetry report that cannot be sent: %s", self.post_id,
                            self.spool, number, exc)
        while len(self._pending) > MAX_KEPT:
            self._pending.popleft()
            self.dropped += 1

    def _save(self) -> None:
        """Rewrite the spool from the pending reports when they changed (sender thread, or at stop)."""
        with self._cond:
            if not self._dirty or self.spool is None:
                return
            pending = list(self._pending)  # a cheap copy: put() waits for this lock, not for the JSON below
            self._dirty = False
        lines = "".join(r + "\n" for r in pending)
        tmp = self.spool.with_suffix(".tmp")
        try:
            self.spool.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(lines, encoding="utf-8")
            tmp.replace(self.spool)
        except OSError as exc:
            log.warning("post %s: cannot write telemetry spool %s: %s", self.post_id, self.spool, exc)
