"""The incident recorder: turns what the sidecar learns (AMI, telemetry, cameras, close-outs) into the record.

Every input arrives on some worker thread (AMI, camera monitor, HTTP request); the recorder serialises them
behind one lock and hands each change with its events to the outbox, which commits them in one transaction
(or, while the store cannot write, holds them in memory). Only then do live pages get the events, through
the fan-out: a page never shows an event that was neither stored nor held.

What is live (post and camera status, the calls on the board) is kept in memory too, written through to the
store, so pages show it even while the store cannot write; :meth:`Recorder.state` hands the read model a copy.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from sip_refuge.config.model import PRIMARY, Retention, Site
from sip_refuge.config.secrets import incident_snapshot_url
from sip_refuge.sidecar import alarm, calls, closeout
from sip_refuge.sidecar.ami import Snapshot
from sip_refuge.sidecar.backlog import CALL, TELEMETRY
from sip_refuge.sidecar.board import CallBoard, LiveCall, References
from sip_refuge.sidecar.calls import CallTracker, Occurrence
from sip_refuge.sidecar.events import (
    DEVICE_FAULTS,
    POST_FAULT,
    POST_OK,
    Event,
    build_event,
    closed_event,
    iso_utc,
    pbx_event,
)
from sip_refuge.sidecar.fanout import Fanout
from sip_refuge.sidecar.link import AmiLink
from sip_refuge.sidecar.outbox import STORED, Outbox
from sip_refuge.sidecar.pair import PbxChange, PbxWatch, tag_event, tag_snapshot
from sip_refuge.sidecar.records import CameraStatus, Incident, PostStatus
from sip_refuge.sidecar.retention import TelemetryBudget
from sip_refuge.sidecar.snapshots import SnapshotCache
from sip_refuge.sidecar.status import StatusBoard
from sip_refuge.sidecar.store import Store, StoreError
from sip_refuge.telemetry import SelfTestReport, SelfTestResult, Telemetry

log = logging.getLogger(__name__)

ADOPT_RECENT = 200  # incidents read back at a resync to find those a previous process left open
# Timeline kinds of the tracker's steps; a CCTV event's kind is its type's second word (queued, answered...).
STEPS = {calls.CALL_RUNG: "desk_rung", calls.CALL_REQUEUED: "requeued", calls.CALL_OVERFLOWED: "overflowed",
         calls.CALL_OVERFLOW_ANSWERED: "overflow_answered"}


@dataclass(frozen=True)
class LiveState:
    """A consistent copy of what is live, for the read model."""

    posts: Mapping[str, PostStatus]
    cameras: Mapping[str, CameraStatus]
    online: Mapping[str, bool | None]
    calls: tuple[LiveCall, ...]


class Recorder:
    def __init__(self, site: Site, store: Store, outbox: Outbox, fanout: Fanout, *, base_url: str,
                 link: AmiLink | None = None, snapshots: SnapshotCache | None = None,
                 clock: Callable[[], float] = time.monotonic, links: Mapping[str, AmiLink] | None = None) -> None:
        """``links``: the AMI link of each PBX of a pair (``link`` is the primary's)."""
        self.site, self.store, self.outbox, self.fanout = site, store, outbox, fanout
        self.base_url = base_url.rstrip("/")
        self.link, self.snapshots, self.clock = link, snapshots, clock
        self.links = dict(links or ({PRIMARY: link} if link is not None else {}))
        self.tracker = CallTracker(site)
        self.pbxs = PbxWatch(site, clock(), self.tracker.grace)
        self.lock = threading.RLock()
        self.board = CallBoard()
        self.statuses = StatusBoard(store.post_statuses(), store.camera_statuses())
        self.references = References(site.reference_prefix, store.last_reference_number())
        self._closed: set[str] = set()  # incidents closed by this process (the store may not have them yet)
        retention = site.sidecar.retention if site.sidecar else Retention()
        self._telemetry_budget = TelemetryBudget(retention.telemetry_per_post)

    # -- inputs ------------------------------------------------------------------------------------
    def on_ami_event(self, event: Mapping[str, str], role: str = PRIMARY) -> None:
        """An AMI event of the PBX of ``role`` (the primary, or the secondary of a pair)."""
        with self.lock:
            self._apply_all(self.tracker.handle(tag_event(event, role), self.clock()))

    def on_resync(self, snap: Snapshot, role: str = PRIMARY) -> None:
        with self.lock:
            self._adopt_open_incidents()
            snap = tag_snapshot(snap, role)
            self._apply_all(self.tracker.resync(self.clock(), snap.contacts, snap.channels, snap.queue_entries,
                                                restarted=snap.restarted, contact_uris=snap.contact_uris,
                                                alarm_channels=snap.alarm_channels, fresh=snap.fresh,
                                                gone=snap.gone, pbx=role))
        link = self.links.get(role)
        if link is not None:
            link.resynced()

    def on_pbx_link(self, role: str, up: bool) -> None:
        """The AMI link to the PBX of ``role`` went up or down (on a pair: ``pbx.up`` / ``pbx.down``)."""
        with self.lock:
            self.tracker.pbx_link(role, up)
            self._pbx_changes(self.pbxs.link(role, up, self.clock()))

    def tick(self) -> float | None:
        """Fire timers (post offline after grace) and store writes held in memory; return the next deadline
        on the recorder's clock."""
        with self.lock:
            self.outbox.flush()
            now = self.clock()
            self._apply_all(self.tracker.tick(now))
            self._pbx_changes(self.pbxs.tick(now))
            due = [d for d in (self.tracker.next_deadline(), self.pbxs.next_deadline()) if d is not None]
            return min(due) if due else None

    def on_camera_change(self, post_id: str, ok: bool, reason: str) -> None:
        with self.lock:
            now = datetime.now(UTC)
            status = self.statuses.camera(post_id, ok, reason, iso_utc(now))
            self._record(lambda store: store.save_camera_status(status),
                         [build_event("camera.ok" if ok else "camera.fault", self.site, post_id=post_id, now=now,
                                      reason=reason)])

    def on_telemetry(self, post_id: str, message: Telemetry) -> None:
        """A post agent's report (already validated): remember it, show its state, and raise selftest.failed."""
        with self.lock:
            now = datetime.now(UTC)
            before = self.statuses.faults(post_id) & DEVICE_FAULTS
            status = self.statuses.telemetry(post_id, message, iso_utc(now))
            events = self._fault_events(post_id, before, set(message.faults) & DEVICE_FAULTS, now)
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
            self.fanout.publish_status(post_id)

    def _fault_events(self, post_id: str, before: set[str], after: set[str], now: datetime) -> list[Event]:
        """``post.fault`` for each device fault the agent reports anew (a stuck button cannot call: the control
        room must hear of it as of a dead camera), ``post.ok`` once the last one has cleared."""
        events = [build_event(POST_FAULT, self.site, post_id=post_id, now=now, reason=fault,
                              extra={"faults": sorted(after)}) for fault in sorted(after - before)]
        if before and not after:
            events.append(build_event(POST_OK, self.site, post_id=post_id, now=now, extra={"faults": []}))
        return events

    def close_incident(self, incident_id: str, body: object, *, by: str | None) -> Incident:
        """An operator closes an incident (see :mod:`closeout` for the rules); returns it as closed. Raises
        CloseRefused (404, 409, 422), or StoreError when the store cannot be read."""
        with self.lock:
            close = closeout.parse(body, self.site.close_reasons)
            live = self.board.get(incident_id) is not None
            incident = closeout.check(self.store.incident(incident_id), incident_id, live=live,
                                      closed=incident_id in self._closed)
            now = datetime.now(UTC)
            desk = incident.answered_by if incident.answered_by in {d.id for d in self.site.desks} else None
            if incident.post_id not in {p.id for p in self.site.posts}:
                raise closeout.CloseRefused(409, f"incident {incident_id}: its post {incident.post_id!r} is no "
                                                 "longer in the site file")
            event = closed_event(self.site, incident=incident.id, reference=incident.reference,
                                 post_id=incident.post_id, now=now, reason=close.reason.id, label=close.reason.label,
                                 note=close.note, outcome=incident.outcome, closed_by=by, desk_id=desk)
            step = {"reason": close.reason.id, "note": close.note, "by": by}

            def changes(store: Store) -> None:
                store.close_incident(incident.id, reason=close.reason.id, note=close.note, by=by, at=now)
                store.add_timeline(incident.id, "closed", now, {k: v for k, v in step.items() if v is not None})

            self._record(changes, [event])
            self._closed.add(incident.id)
            log.info("incident %s (%s) closed: %s", incident.reference or incident.id, incident.post_id,
                     close.reason.id)
            return replace(incident, closed_at=iso_utc(now), closed_by=by, close_reason=close.reason.id,
                           close_note=close.note)

    def acknowledge_incident(self, incident_id: str, body: object, *, by: str | None) -> dict[str, str | None]:
        """An operator acknowledges the alarm of a call no desk answered, live or missed (see :mod:`alarm`);
        every page silences it. Returns ``{incident, reference, acknowledged_at, acknowledged_by, desk}``.
        Raises AcknowledgeRefused (404, 409, 422), or StoreError when the store cannot be read."""
        with self.lock:
            desk = alarm.parse(body, self.site.desks)
            live = self.board.get(incident_id)
            if live is not None:
                alarm.check_live(live)
                post_id, reference = live.post_id, live.reference
            else:
                over = alarm.check_over(self.store.incident(incident_id), incident_id)
                post_id, reference = over.post_id, over.reference
                if post_id not in {p.id for p in self.site.posts}:
                    raise alarm.AcknowledgeRefused(409, f"incident {incident_id}: its post {post_id!r} is no "
                                                        "longer in the site file")
            now = datetime.now(UTC)
            at = iso_utc(now)
            step = {k: v for k, v in {"by": by, "desk": desk}.items() if v is not None}

            def changes(store: Store) -> None:
                store.acknowledge_incident(incident_id, by=by, at=now)
                store.add_timeline(incident_id, "acknowledged", now, step)

            self._record(changes, [])
            self.board.acknowledge(incident_id, at, by)
            # Pages only: no CCTV target gets it (see alarm.py), so it goes to the fan-out, not the outbox.
            self.fanout.publish([alarm.acknowledged_event(self.site, incident=incident_id, reference=reference,
                                                          post_id=post_id, at=now, by=by, desk=desk)])
            log.info("incident %s (%s) acknowledged by %s", reference or incident_id, post_id, by)
            return {"incident": incident_id, "reference": reference, "acknowledged_at": at, "acknowledged_by": by,
                    "desk": desk}

    # -- what is live ----------------------------------------------------------------------------
    def state(self) -> LiveState:
        with self.lock:
            return LiveState(self.statuses.posts(), self.statuses.cameras(),
                             {p.id: self.tracker.is_online(p.id) for p in self.site.posts}, self.board.calls())

    # -- internals ---------------------------------------------------------------------------------
    def _pbx_changes(self, changes: list[PbxChange]) -> None:
        for change in changes:
            (log.error if change.type == "pbx.down" else log.warning)(
                "%s: the %s PBX (%s): %s", change.type, change.role, change.host, change.reason)
            event = pbx_event(change.type, self.site, role=change.role, host=change.host, now=datetime.now(UTC),
                              reason=change.reason)
            self._record(lambda store: None, [event])

    def _apply_all(self, occurrences: list[Occurrence]) -> None:
        for occ in occurrences:
            try:
                self._apply(occ)
            except Exception:  # noqa: BLE001 - one bad occurrence must not stop following the rest
                log.exception("could not record %s for post %s", occ.type, occ.post.id)

    def _apply(self, occ: Occurrence) -> None:
        now = datetime.now(UTC)
        at, post = iso_utc(now), occ.post.id
        if occ.type in ("post.offline", "post.online"):
            status = self.statuses.reachability(post, occ.type == "post.online", at)
            self._record(lambda store: store.save_post_status(status),
                         [build_event(occ.type, self.site, post_id=post, now=now, extra=occ.detail)])
            return
        incident = occ.incident or ""
        live = self.board.get(incident)
        reference, snapshot_url = (live.reference, live.snapshot_url) if live else (None, None)
        number: int | None = None
        queued = occ.type == "call.queued"
        if queued:
            reference, number = self.references.next()
            if self.snapshots is not None and occ.post.camera is not None:
                snapshot_url = incident_snapshot_url(self.site, self.base_url, incident)
        self.board.apply(occ, at, reference=reference, snapshot_url=snapshot_url)
        desk = occ.desk.id if occ.desk else None
        step = {k: v for k, v in {**occ.detail, "desk": desk}.items() if v is not None}
        outcome = str(occ.detail.get("outcome")) if "outcome" in occ.detail else None

        def changes(store: Store) -> None:
            if queued:
                assert reference is not None and number is not None
                store.open_incident(incident, post, now, reference=(reference, number))
                if snapshot_url is not None:
                    store.update_incident(incident, snapshot=snapshot_url)
                if occ.detail.get("pbx"):
                    store.update_incident(incident, pbx=str(occ.detail["pbx"]))
            elif occ.type == calls.CALL_MOVED:  # the next leg, on the other PBX, waits for a desk
                store.update_incident(incident, state="queued", pbx=str(occ.detail.get("pbx") or "") or None)
            elif occ.type == "call.answered":
                store.update_incident(incident, state="answered", answered_by=desk, answered_at=at)
            elif occ.type in ("call.unanswered", calls.CALL_OVERFLOWED) and outcome == "overflowed":
                store.update_incident(incident, state="overflowed")
            elif occ.type == calls.CALL_REQUEUED:
                store.update_incident(incident, state="queued")
            elif occ.type in ("call.ended", "call.unanswered"):
                store.update_incident(incident, state="ended", ended=at, outcome=outcome)
            store.add_timeline(incident, STEPS.get(occ.type) or occ.type.split(".")[1], now, step)

        events: list[Event] = []
        if occ.type not in calls.INTERNAL:
            unanswered = occ.type == "call.unanswered"
            # call.unanswered names its outcome as ``reason``; call.ended keeps ``outcome`` (ended, overflowed).
            extra = {k: v for k, v in occ.detail.items() if not (unanswered and k == "outcome")}
            events.append(build_event(occ.type, self.site, post_id=post, now=now, incident=incident,
                                      reference=reference, desk_id=desk, snapshot_url=snapshot_url,
                                      reason=outcome if unanswered else None, extra=extra))
        self._record(changes, events)
        if occ.type in calls.INTERNAL:
            self.fanout.publish_call(incident, post)
        if queued and snapshot_url is not None and self.snapshots is not None:
            self.snapshots.take(incident, post)

    def _record(self, changes: Callable[[Store], None], events: list[Event], *, kind: str = CALL,
                size: int = 0) -> str:
        """Store ``changes`` with ``events`` (or hold them in memory while the store cannot write), then
        hand the events to live pages. A write that fails for any other reason raises: pages see nothing."""
        result = self.outbox.record(changes, events, kind=kind, size=size)
        # Even a write lost to full memory goes to pages: it costs nothing, and an operator watching the
        # dashboard must see a live call. /healthz, /metrics and the log report the loss.
        self.fanout.publish(events)
        return result

    def _adopt_open_incidents(self) -> None:
        """Incidents still open in the store that this process does not follow (it was restarted, maybe
        SIGKILLed, while they were live) go back to the tracker and the board, so the resync closes the ones
        whose call is gone."""
        try:
            incidents = self.store.incidents(ADOPT_RECENT)
        except StoreError as exc:
            # Calls of this process are followed anyway; a store that cannot be read must not stop the resync.
            log.error("open incidents could not be read back for the resync: %s", exc)
            return
        for inc in incidents:
            if inc.state == "ended" or self.board.get(inc.id) is not None:
                continue
            queued = next((t for t in inc.timeline if t.kind == "queued"), None)
            uniqueid = str(queued.detail.get("uniqueid") or "") if queued else ""
            overflowed = inc.state == "overflowed"
            if self.tracker.adopt(inc.id, inc.post_id, uniqueid, self.clock(), inc.answered_by,
                                  overflowed=overflowed, pbx=inc.pbx or PRIMARY) is None:
                continue
            overflowed_at = next((t.at for t in reversed(inc.timeline) if t.kind in ("unanswered", "overflowed")),
                                 None) if overflowed else None
            self.board.put(LiveCall(inc.id, inc.reference, inc.post_id, inc.state if inc.state in
                                    ("queued", "answered", "overflowed") else "queued", inc.created,
                                    desk=inc.answered_by, answered_at=inc.answered_at, overflowed_at=overflowed_at,
                                    snapshot_url=inc.snapshot, acknowledged_at=inc.acknowledged_at,
                                    acknowledged_by=inc.acknowledged_by))

