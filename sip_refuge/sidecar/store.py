"""The sidecar's durable store: incidents and timelines, the event outbox, post/camera status, telemetry.

:class:`Store` is the one object the sidecar holds; its tables are in parts: the connection, schema and
failure handling (:mod:`~sip_refuge.sidecar.store_base`), the event outbox
(:mod:`~sip_refuge.sidecar.store_events`), the incident log (:mod:`~sip_refuge.sidecar.store_incidents`), and
here the audit log, post and camera status and telemetry.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sip_refuge.sidecar.events import iso_utc
from sip_refuge.sidecar.records import CameraStatus, Delivery, Incident, PostStatus, StoreFault, TimelineEntry
from sip_refuge.sidecar.store_events import DELIVERED, PENDING, EventTables
from sip_refuge.sidecar.store_incidents import IncidentTables
from sip_refuge.sidecar.storefile import StoreError

__all__ = ["DELIVERED", "PENDING", "CameraStatus", "Delivery", "Incident", "PostStatus", "Store", "StoreError",
           "StoreFault", "TimelineEntry"]


def _opt_bool(value: object) -> bool | None:
    return None if value is None else bool(value)


class Store(EventTables, IncidentTables):
    """Open (creating and migrating as needed) the database at ``path``; ``":memory:"`` works for tests.

    An existing file must be an SQLite database that passes ``PRAGMA quick_check``, else SidecarError
    says which file and how to recover it. A missing file is created, atomically.
    """

    # -- audit log ----------------------------------------------------------------------------------------

    def add_audit(self, entry: dict[str, Any]) -> None:
        """One audit entry (``sidecar.access.audit``): at, action, outcome, actor, role, address, target, detail."""
        values: dict[str, object] = {**entry, "detail": json.dumps(entry.get("detail") or {})}
        self._exec("INSERT INTO audit (at, action, outcome, actor, role, address, target, detail)"
                   " VALUES (:at, :action, :outcome, :actor, :role, :address, :target, :detail)", values)

    def audit(self, limit: int = 100, before: int | None = None) -> list[dict[str, Any]]:
        """Newest first; ``before`` a ``seq`` pages back."""
        rows = self._all("SELECT * FROM audit WHERE seq < ? ORDER BY seq DESC LIMIT ?",
                         (before if before is not None else 2**63 - 1, limit))
        return [{**dict(r), "detail": json.loads(r["detail"])} for r in rows]

    # -- post and camera status, telemetry --------------------------------------------------------------

    def save_post_status(self, status: PostStatus) -> None:
        self._exec("INSERT OR REPLACE INTO post_status (post_id, updated, online, state, contact, detail)"
                   " VALUES (?, ?, ?, ?, ?, ?)",
                   (status.post_id, status.updated, status.online, status.state, status.contact,
                    json.dumps(status.detail or {})))

    def post_statuses(self) -> dict[str, PostStatus]:
        return {r["post_id"]: PostStatus(r["post_id"], r["updated"], _opt_bool(r["online"]), r["state"],
                                         r["contact"], json.loads(r["detail"]))
                for r in self._all("SELECT * FROM post_status ORDER BY post_id")}

    def save_camera_status(self, status: CameraStatus) -> None:
        self._exec("INSERT OR REPLACE INTO camera_status (post_id, updated, ok, reason, detail)"
                   " VALUES (?, ?, ?, ?, ?)",
                   (status.post_id, status.updated, status.ok, status.reason, json.dumps(status.detail or {})))

    def camera_statuses(self) -> dict[str, CameraStatus]:
        return {r["post_id"]: CameraStatus(r["post_id"], r["updated"], _opt_bool(r["ok"]), r["reason"],
                                           json.loads(r["detail"]))
                for r in self._all("SELECT * FROM camera_status ORDER BY post_id")}

    def add_telemetry(self, post_id: str, at: datetime, body: dict[str, Any]) -> None:
        self._exec("INSERT INTO telemetry (post_id, received, body) VALUES (?, ?, ?)",
                   (post_id, iso_utc(at), json.dumps(body, separators=(",", ":"))))

    def telemetry(self, post_id: str, limit: int = 20) -> list[tuple[str, dict[str, Any]]]:
        """The latest reports of a post, newest first, as (received, body)."""
        rows = self._all("SELECT received, body FROM telemetry WHERE post_id = ? ORDER BY seq DESC LIMIT ?",
                          (post_id, limit))
        return [(str(r[0]), json.loads(r[1])) for r in rows]

    # -- retention ----------------------------------------------------------------------------------------
    # Each call deletes at most ``batch`` rows in one short transaction, so the hub's writes are never held
    # up for long behind a large prune.

    def prune_telemetry(self, before: str, batch: int = 1000) -> int:
        """Delete up to ``batch`` telemetry reports received before ``before`` (ISO UTC)."""
        return self._exec("DELETE FROM telemetry WHERE seq IN (SELECT seq FROM telemetry WHERE received < ?"
                          " ORDER BY received LIMIT ?)", (before, batch)).rowcount

    def trim_telemetry(self, post_id: str, keep_bytes: int) -> int:
        """Keep only the newest reports of ``post_id`` that fit in ``keep_bytes`` (of JSON); the rest go."""
        return self._exec(
            "DELETE FROM telemetry WHERE post_id = :post AND seq <= (SELECT seq FROM (SELECT seq, SUM(length(body))"
            " OVER (ORDER BY seq DESC) AS kept FROM telemetry WHERE post_id = :post) WHERE kept > :keep"
            " ORDER BY seq DESC LIMIT 1)", {"post": post_id, "keep": keep_bytes}).rowcount

    def prune_audit(self, before: str, batch: int = 1000) -> int:
        """Delete up to ``batch`` audit entries made before ``before`` (ISO UTC)."""
        return self._exec("DELETE FROM audit WHERE seq IN (SELECT seq FROM audit WHERE at < ? ORDER BY at LIMIT ?)",
                          (before, batch)).rowcount

    def telemetry_posts(self) -> list[str]:
        return [str(r[0]) for r in self._all("SELECT DISTINCT post_id FROM telemetry")]
