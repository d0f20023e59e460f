"""The sidecar's hub: turns what it learns (AMI, telemetry, cameras) into incidents and events.

Every input arrives on some worker thread (AMI, camera monitor, HTTP request); the hub serialises
them behind one lock and hands each change with its events to the outbox, which commits them in one
transaction (or, while the store cannot write, holds them in memory). Only then do live page subscribers
(server-sent events) get the events: a page never shows an event that was neither stored nor held.

Post and camera status live in memory too (loaded from the store at start, written through), so pages
show a post's latest state even while the store cannot write.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from sip_refuge.config.model import Retention, Site
from sip_refuge.sidecar.ami import Snapshot
from sip_refuge.sidecar.backlog import CALL, TELEMETRY
from sip_refuge.sidecar.calls import CallTracker, Occurrence
from sip_refuge.sidecar.events import Event, build_event, iso_utc
from sip_refuge.sidecar.outbox import STORED, Outbox
from sip_refuge.sidecar.retention import Pruner, TelemetryBudget
from sip_refuge.sidecar.store import CameraStatus, PostStatus, Store, StoreError
from sip_refuge.telemetry import SelfTestReport, SelfTestResult, Telemetry, shown_status

log = logging.getLogger(__name__)

SUBSCRIBER_BACKLOG = 200  # events kept for a slow page; beyond that it is dropped and reconnects
SNAPSHOTS_KEPT = 200  # call snapshots kept in memory; an older incident's snapshot URL answers 404


class _Waking(queue.Queue["Event | None"]):
    """A subscriber's queue that calls ``wake()`` after each put (with the queue's lock held)."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__(SUBSCRIBER_BACKLOG)
        self._wake = wake

    def _put(self, item: Event | None) -> None:
        super()._put(item)
        self._wake()


class Hub:
    def __init__(self, site: Site, store: Store, outbox: Outbox, *, base_url: str,
                 snapshot: Callable[[str], bytes | None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.site, self.store, self.outbox, self.base_url = site, store, outbox, base_url.rstrip("/")
        self.tracker = CallTracker(site)
        self.snapshot_source = snapshot
        self.clock = clock
        self.lock = threading.RLock()
        self.ami_connected = False
        self.ami_last_change: str | None = None
        self.ami_last_error: str | None = None  # why the last AMI login or resync failed; None once it works
        self.ami_last_error_at: str | None = None
        self.ami_resynced_at: str | None = None  # when live state was last read back from Asterisk
        self._subscribers: list[queue.Queue[Event | None]] = []
        # The latest SNAPSHOTS_KEPT snapshots, oldest first; older incidents' snapshot URLs answer 404.
        self._snapshots: OrderedDict[str, bytes] = OrderedDict()
        self._snapshot_done: OrderedDict[str, threading.Event] = OrderedDict()
        self._snapshot_lock = threading.Lock()
        self._snapshot_jobs: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._snapshot_worker: threading.Thread | None = None
        self._closed = False
        self._snapshot_urls: dict[str, str] = {}  # live incident -> its snapshot URL
        self._post_status: dict[str, PostStatus] = store.post_statuses()
        self._camera_status: dict[str, CameraStatus] = store.camera_statuses()
        self.retention = site.sidecar.retention if site.sidecar else Retention()
        self._telemetry_budget = TelemetryBudget(self.retention.telemetry_per_post)
        self.pruner: Pruner | None = None  # set by the runner, which runs it; /healthz and /metrics show it

    # -- inputs ------------------------------------------------------------------------------------
    def on_ami_event(self, event: Mapping[str, str]) -> None:
        with self.lock:
            self._apply_all(self.tracker.handle(event, self.clock()))
            self._timeline_from_ami(event)

    def on_resync(self, snap: Snapshot) -> None:
        with self.lock:
            self._adopt_open_incidents()
            self._apply_all(self.tracker.resync(self.clock(), snap.contacts, snap.channels, snap.queue_entries,
                                                restarted=snap.restarted, contact_uris=snap.contact_uris,
                                                alarm_channels=snap.alarm_channels, fresh=snap.fresh,
                                                gone=snap.gone))
            self.ami_resynced_at = _now_iso()

    def on_ami_link(self, up: bool) -> None:
        with self.lock:
            self.ami_connected = up
            self.ami_last_change = _now_iso()

    def on_ami_error(self, error: str | None) -> None:
        """The AMI follower's latest failure (a refused login, a failed resync); None once it works again."""
        with self.lock:
            self.ami_last_error = error
            self.ami_last_error_at = None if error is None else _now_iso()

    def tick(self) -> float | None:
        """Fire timers (post offline after grace) and store writes held in memory; return the next deadline
        on the hub's clock."""
        with self.lock:
            self.outbox.flush()
            self._apply_all(self.tracker.tick(self.clock()))
            return self.tracker.next_deadline()

    def on_camera_change(self, post_id: str, ok: bool, reason: str) -> None:
        with self.lock:
            now = datetime.now(UTC)
            status = self._camera_status[post_id] = CameraStatus(post_id, iso_utc(now), ok, reason)
            self._record(lambda store: store.save_camera_status(status),
                         [build_event("camera.ok" if ok else "camera.fault", self.site, post_id=post_id, now=now,
                                      reason=reason)])

    def on_telemetry(self, post_id: str, message: Telemetry) -> None:
        """A post agent's report (already validated): remember it, show its state, and raise selftest.failed."""
        with self.lock:
            now = datetime.now(UTC)
            previous = self._post_status.get(post_id)
            last = message.last_self_test
            detail: dict[str, Any] = {"registered": message.registered, "faults": list(message.faults),
                                      "mock_gpio": message.mock_gpio}
            if last is not None:
                detail["last_self_test"] = asdict(last)
            elif previous is not None and previous.detail and "last_self_test" in previous.detail:
                detail["last_self_test"] = previous.detail["last_self_test"]
            status = self._post_status[post_id] = PostStatus(
                post_id, iso_utc(now), previous.online if previous else None, message.state,
                previous.contact if previous else None, detail)
            events = []
            report = message.detail
            if isinstance(report, SelfTestReport) and report.result is SelfTestResult.FAIL:
                events.append(build_event("selftest.failed", self.site, post_id=post_id, now=now,
                                          reason=report.detail or "self-test failed",
                                          extra={"part": report.part or None}))
            body = message.to_wire()
            size = len(json.dumps(body, separators=(",", ":")))

            def changes(store: Store) -> None:
                store.add_telemetry(post_id, now, body)
                store.save_post_status(status)

            stored = self._record(changes, events, kind=CALL if events else TELEMETRY, size=size)
            if stored == STORED:
                self._telemetry_budget.added(self.store, post_id, size)
            self._broadcast_status(post_id)

    # -- queries for the web app -------------------------------------------------------------------
    def posts(self) -> list[dict[str, Any]]:
        with self.lock:
            live = {c.post.id: c for c in self.tracker.live_calls()}
            return [self._post_view(p.id, self._post_status, self._camera_status, live) for p in self.site.posts]

    def post(self, post_id: str) -> dict[str, Any]:
        with self.lock:
            live = {c.post.id: c for c in self.tracker.live_calls()}
            return self._post_view(post_id, self._post_status, self._camera_status, live)

    def live_calls(self) -> list[dict[str, Any]]:
        with self.lock:
            return [{"incident": c.incident, "post": c.post.id, "post_name": c.post.name,
                     "desk": c.answered_by.id if c.answered_by else None,
                     "state": "answered" if c.answered_by else "queued", "rung": list(c.rung)}
                    for c in self.tracker.live_calls()]

    def snapshot(self, incident: str, wait: float = 0.0) -> bytes | None:
        """The JPEG taken when ``incident`` was queued; waits up to ``wait`` s if it is still being taken."""
        with self._snapshot_lock:
            done = self._snapshot_done.get(incident)
        if done is not None and wait > 0:
            done.wait(wait)
        with self._snapshot_lock:
            return self._snapshots.get(incident)

    # -- live subscribers (SSE) ------------------------------------------------------------------
    def subscribe(self, wake: Callable[[], None] | None = None) -> queue.Queue[Event | None]:
        """A live page's events (None: its stream ends). ``wake``, if given, runs in the publishing thread
        after each put, so an asyncio reader needs no thread of its own; it must not block."""
        q: queue.Queue[Event | None] = queue.Queue(SUBSCRIBER_BACKLOG) if wake is None else _Waking(wake)
        with self.lock:
            self._subscribers.append(q)
        return q

    def unsubscribe(self, q: queue.Queue[Event | None]) -> None:
        with self.lock:
            if q in self._subscribers:
                self._subscribers.remove(q)

    def close_subscribers(self) -> None:
        """The sidecar is stopping: end live subscribers, and tell the snapshot worker to stop (no wait)."""
        with self.lock:
            for q in self._subscribers:
                try:
                    q.put_nowait(None)
                except queue.Full:
                    pass
            self._subscribers.clear()
        self._stop_snapshots()

    def close(self, timeout: float | None = 10.0) -> None:
        """Like :meth:`close_subscribers`, then wait for the snapshot worker (a snapshot in progress ends
        within its camera's timeouts)."""
        self.close_subscribers()
        worker = self._snapshot_worker
        if worker is not None:
            worker.join(timeout)

    def _stop_snapshots(self) -> None:
        with self._snapshot_lock:
            if self._closed:
                return
            self._closed = True
            running = self._snapshot_worker is not None
        if running:
            self._snapshot_jobs.put(None)

    # -- internals ---------------------------------------------------------------------------------
    def _apply_all(self, occurrences: list[Occurrence]) -> None:
        for occ in occurrences:
            try:
                self._apply(occ)
            except Exception:  # noqa: BLE001 - one bad occurrence must not stop following the rest
                log.exception("could not record %s for post %s", occ.type, occ.post.id)

    def _apply(self, occ: Occurrence) -> None:
        now = datetime.now(UTC)
        post = occ.post.id
        if occ.type in ("post.offline", "post.online"):
            previous = self._post_status.get(post)
            status = self._post_status[post] = PostStatus(
                post, iso_utc(now), occ.type == "post.online", previous.state if previous else None,
                previous.contact if previous else None, previous.detail if previous else None)
            self._record(lambda store: store.save_post_status(status),
                         [build_event(occ.type, self.site, post_id=post, now=now, extra=occ.detail)])
            return
        incident = occ.incident or ""
        desk = occ.desk.id if occ.desk else None
        queued = occ.type == "call.queued"
        if queued and self.snapshot_source is not None and occ.post.camera is not None:
            self._snapshot_urls[incident] = f"{self.base_url}/api/v1/incidents/{incident}/snapshot.jpg"
        snapshot_url = self._snapshot_urls.get(incident)
        step = {k: v for k, v in {**occ.detail, "desk": desk}.items() if v is not None}

        def changes(store: Store) -> None:
            if queued:
                store.open_incident(incident, post, now)
                if snapshot_url is not None:
                    store.update_incident(incident, snapshot=snapshot_url)
            elif occ.type == "call.answered":
                store.update_incident(incident, state="answered", answered_by=desk, answered_at=iso_utc(now))
            else:
                store.update_incident(incident, state="ended", ended=iso_utc(now),
                                      outcome=str(occ.detail.get("outcome")))
            store.add_timeline(incident, occ.type.split(".")[1], now, step)

        reason = str(occ.detail["outcome"]) if occ.type == "call.unanswered" else None
        self._record(changes, [build_event(occ.type, self.site, post_id=post, now=now, incident=incident,
                                           desk_id=desk, snapshot_url=snapshot_url, reason=reason,
                                           extra={k: v for k, v in occ.detail.items() if k != "outcome"})])
        if queued and snapshot_url is not None:
            self._take_snapshot(incident, post)
        if occ.type in ("call.ended", "call.unanswered"):
            self._snapshot_urls.pop(incident, None)

    def _record(self, changes: Callable[[Store], None], events: list[Event], *, kind: str = CALL,
                size: int = 0) -> str:
        """Store ``changes`` with ``events`` (or hold them in memory while the store cannot write), then
        hand the events to live pages. A write that fails for any other reason raises: pages see nothing."""
        result = self.outbox.record(changes, events, kind=kind, size=size)
        # Even a write lost to full memory goes to pages: it costs nothing, and an operator watching the
        # dashboard must see a live call. /healthz, /metrics and the log report the loss.
        for event in events:
            self._to_pages(event)
        return result

    def _to_pages(self, event: Event) -> None:
        for q in list(self._subscribers):
            try:
                q.put_nowait(event)
            except queue.Full:
                # A page that stopped reading: drop it; its EventSource reconnects and reloads state.
                self._subscribers.remove(q)
                q.queue.clear()
                q.put_nowait(None)

    def _broadcast_status(self, post_id: str) -> None:
        """Pages also follow post state changes that are not CCTV events (telemetry)."""
        status = Event("status-" + post_id, "post.status", _now_iso(), None, post_id,
                       {"type": "post.status", "data": {"post": {"id": post_id}}})
        for q in list(self._subscribers):
            try:
                q.put_nowait(status)
            except queue.Full:
                pass

    def _take_snapshot(self, incident: str, post_id: str) -> None:
        # A snapshot takes seconds (the next key frame): never hold up call.queued for it. One worker thread
        # takes them in turn, so a burst of calls cannot start a burst of threads.
        with self._snapshot_lock:
            if self._closed:
                return
            self._snapshot_done[incident] = threading.Event()
            self._forget_old_snapshots()
            if self._snapshot_worker is None:
                self._snapshot_worker = threading.Thread(target=self._snapshots_run, name="snapshots", daemon=True)
                self._snapshot_worker.start()
        self._snapshot_jobs.put((incident, post_id))

    def _forget_old_snapshots(self) -> None:
        """Keep the newest SNAPSHOTS_KEPT incidents' snapshots (called with the snapshot lock held)."""
        while len(self._snapshot_done) > SNAPSHOTS_KEPT:
            old, done = self._snapshot_done.popitem(last=False)
            self._snapshots.pop(old, None)
            done.set()  # nobody waits any longer for a snapshot that will not be kept
        while len(self._snapshots) > SNAPSHOTS_KEPT:
            self._snapshots.popitem(last=False)

    def _snapshots_run(self) -> None:
        source = self.snapshot_source
        assert source is not None
        while (job := self._snapshot_jobs.get()) is not None:
            incident, post_id = job
            with self._snapshot_lock:
                done, closed = self._snapshot_done.get(incident), self._closed
            if done is None:
                continue  # already forgotten (more than SNAPSHOTS_KEPT newer calls queued meanwhile)
            if closed:
                done.set()  # stopping: skip the snapshots still queued
                continue
            try:
                image = source(post_id)
                if image:
                    with self._snapshot_lock:
                        if incident in self._snapshot_done:
                            self._snapshots[incident] = image
                            self._forget_old_snapshots()
            except Exception:  # noqa: BLE001 - thread boundary: a failed snapshot leaves the call untouched
                log.exception("post %s: snapshot for incident %s failed", post_id, incident)
            finally:
                done.set()

    def _adopt_open_incidents(self, recent: int = 200) -> None:
        """Incidents still open in the store that this process does not follow (it was restarted, maybe
        SIGKILLed, while they were live) go back to the tracker, so the resync closes the ones whose call is gone.
        """
        try:
            incidents = self.store.incidents(recent)
        except StoreError as exc:
            # Calls of this process are followed anyway; a store that cannot be read must not stop the resync.
            log.error("open incidents could not be read back for the resync: %s", exc)
            return
        for inc in incidents:
            if inc.state == "ended":
                continue
            queued = next((t for t in inc.timeline if t.kind == "queued"), None)
            uniqueid = str(queued.detail.get("uniqueid") or "") if queued else ""
            self.tracker.adopt(inc.id, inc.post_id, uniqueid, self.clock(), inc.answered_by)
            if inc.snapshot:
                self._snapshot_urls.setdefault(inc.id, inc.snapshot)

    def _timeline_from_ami(self, event: Mapping[str, str]) -> None:
        if event.get("Event") == "AgentCalled":
            call = self.tracker.calls.get(event.get("Uniqueid", ""))
            if call is not None and call.outcome is None:
                incident, now = call.incident, datetime.now(UTC)
                step = {"desk": event.get("Interface", "").removeprefix("PJSIP/")}
                self._record(lambda store: store.add_timeline(incident, "desk_rung", now, step), [])

    def _post_view(self, post_id: str, statuses: Mapping[str, PostStatus], cameras: Mapping[str, CameraStatus],
                   live: Mapping[str, Any]) -> dict[str, Any]:
        post = self.site.post(post_id)
        status, camera, call = statuses.get(post_id), cameras.get(post_id), live.get(post_id)
        shown = shown_status(status.state, status.detail) if status else shown_status(None, None)
        return {
            "id": post.id, "name": post.name, "extension": post.extension,
            "location": {"address": post.location.address, "lat": post.location.lat, "lon": post.location.lon},
            "online": self.tracker.is_online(post.id), "state": shown["state"],
            "registered": shown["registered"], "last_self_test": shown["last_self_test"],
            "faults": shown["faults"], "sip_backend": post.sip_backend, "mock_gpio": shown["mock_gpio"],
            "camera": None if post.camera is None else {
                "ok": camera.ok if camera else None, "reason": camera.reason if camera else None},
            "call": None if call is None else {
                "incident": call.incident, "state": "answered" if call.answered_by else "queued",
                "desk": call.answered_by.id if call.answered_by else None},
        }


def _now_iso() -> str:
    return iso_utc(datetime.now(UTC))
