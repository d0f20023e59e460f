"""The store's schema, one migration per version; ``PRAGMA user_version`` records how far a file has got.

Never edit a released migration: add the next one. Each runs in one transaction with the version bump, so a
crash mid-migration leaves the file at the previous version, ready to try again.
"""

from __future__ import annotations

MIGRATIONS: tuple[str, ...] = (
    # 1: incidents and their timelines, the event outbox, post/camera status and telemetry.
    """
    CREATE TABLE incidents (
        id          TEXT PRIMARY KEY,
        post_id     TEXT NOT NULL,
        state       TEXT NOT NULL,          -- pressed | queued | ringing | answered | ended
        created     TEXT NOT NULL,          -- ISO UTC
        answered_by TEXT,                   -- desk id
        answered_at TEXT,
        ended       TEXT,
        outcome     TEXT,                   -- answered | overflowed | abandoned | failed
        snapshot    TEXT                    -- path or URL of the snapshot taken when queued
    );
    CREATE INDEX incidents_created ON incidents(created);
    CREATE TABLE timeline (
        seq      INTEGER PRIMARY KEY AUTOINCREMENT,
        incident TEXT NOT NULL REFERENCES incidents(id),
        at       TEXT NOT NULL,
        kind     TEXT NOT NULL,             -- pressed | queued | rung | answered | ended | overflowed | ...
        detail   TEXT NOT NULL DEFAULT '{}' -- JSON object
    );
    CREATE INDEX timeline_incident ON timeline(incident, seq);
    CREATE TABLE events (
        seq       INTEGER PRIMARY KEY AUTOINCREMENT,  -- global order of creation
        id        TEXT NOT NULL UNIQUE,               -- the stable event id (webhook-id)
        type      TEXT NOT NULL,
        timestamp TEXT NOT NULL,
        incident  TEXT,
        post_id   TEXT,
        stream    TEXT NOT NULL,                      -- ordering unit: one incident or one post
        body      TEXT NOT NULL                       -- JSON, without camera passwords
    );
    CREATE INDEX events_incident ON events(incident);
    CREATE TABLE deliveries (
        event_seq       INTEGER NOT NULL REFERENCES events(seq),
        event_id        TEXT NOT NULL,
        target          TEXT NOT NULL,
        stream          TEXT NOT NULL,
        status          TEXT NOT NULL,      -- pending | delivered
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,      -- unix time: must survive a restart, so not monotonic
        last_error      TEXT,
        delivered_at    TEXT,
        PRIMARY KEY (event_seq, target)
    );
    CREATE INDEX deliveries_head ON deliveries(target, status, stream, event_seq);
    CREATE TABLE post_status (
        post_id  TEXT PRIMARY KEY,
        updated  TEXT NOT NULL,
        online   INTEGER,                   -- NULL: not known yet
        state    TEXT,
        contact  TEXT,
        detail   TEXT NOT NULL DEFAULT '{}'
    );
    CREATE TABLE camera_status (
        post_id  TEXT PRIMARY KEY,
        updated  TEXT NOT NULL,
        ok       INTEGER,
        reason   TEXT,
        detail   TEXT NOT NULL DEFAULT '{}'
    );
    CREATE TABLE telemetry (
        seq      INTEGER PRIMARY KEY AUTOINCREMENT,
        post_id  TEXT NOT NULL,
        received TEXT NOT NULL,
        body     TEXT NOT NULL
    );
    CREATE INDEX telemetry_post ON telemetry(post_id, seq);
    """,
    # 2: retention prunes events and telemetry by age.
    """
    CREATE INDEX events_timestamp ON events(timestamp);
    CREATE INDEX telemetry_received ON telemetry(received);
    """,
    # 3: the incident's short reference (KIR-0412) and its close-out by an operator.
    """
    ALTER TABLE incidents ADD COLUMN reference TEXT;           -- PREFIX-NNNN, shown beside the id
    ALTER TABLE incidents ADD COLUMN ref_number INTEGER;       -- the NNNN, a sequence over the whole file
    ALTER TABLE incidents ADD COLUMN closed_at TEXT;           -- ISO UTC; NULL while not closed
    ALTER TABLE incidents ADD COLUMN closed_by TEXT;           -- who closed it (operator, or the admin token)
    ALTER TABLE incidents ADD COLUMN close_reason TEXT;        -- an id of sidecar.close_reasons
    ALTER TABLE incidents ADD COLUMN close_note TEXT;          -- the operator's note, bounded
    CREATE UNIQUE INDEX incidents_ref_number ON incidents(ref_number);
    CREATE INDEX incidents_close_reason ON incidents(close_reason);
    """,
    # 4: the audit log: logins, logouts and every write an operator or the admin token made.
    """
    CREATE TABLE audit (
        seq     INTEGER PRIMARY KEY AUTOINCREMENT,
        at      TEXT NOT NULL,                -- ISO UTC
        action  TEXT NOT NULL,                -- login | logout | press | incident.close | ...
        outcome TEXT NOT NULL,                -- ok | failed | throttled | refused | HTTP status of a write
        actor   TEXT NOT NULL,                -- user name as given (also an unknown one), or "token"
        role    TEXT,                         -- operator | admin; NULL when nobody was logged in
        address TEXT NOT NULL,                -- the client's address (behind a configured proxy: the real one)
        target  TEXT,                         -- what the write was about (a post or incident id)
        detail  TEXT NOT NULL DEFAULT '{}'    -- JSON object
    );
    CREATE INDEX audit_at ON audit(at);
    """,
    # 5: an operator's acknowledgement of a call no desk had answered: it silences the pages' alarm.
    """
    ALTER TABLE incidents ADD COLUMN acknowledged_at TEXT;     -- ISO UTC; NULL while not acknowledged
    ALTER TABLE incidents ADD COLUMN acknowledged_by TEXT;     -- the operator (or the admin token)
    """,
)
