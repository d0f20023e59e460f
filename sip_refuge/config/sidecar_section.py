"""The site file's ``sidecar`` section: its close reasons, operators' users file, retention and HTTP limits.

:mod:`sip_refuge.config.loader` reads the section's own keys and calls these for the parts with rules of their
own; each reports what is wrong through the :class:`~sip_refuge.config.reader.Reader` it is given.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sip_refuge.config.model import DEFAULT_CLOSE_REASONS, CloseReason, HttpLimits, Retention
from sip_refuge.config.reader import ID, ID_HINT, Reader
from sip_refuge.config.users import read_users
from sip_refuge.errors import RefugeError

CLOSE_REASONS_MAX = 50
CLOSE_LABEL_MAX = 80


def close_reasons(r: Reader) -> tuple[CloseReason, ...]:
    """``sidecar.close_reasons``: each ``{id, label}``, or just a label (its id is the label in lowercase
    with '-' for spaces). Ids name the reason in the API, the export and /metrics, so they stay put when
    a label is reworded."""
    out: list[CloseReason] = []
    seen: set[str] = set()
    items = list(r.items("close_reasons"))
    if not items:
        r.fail("close_reasons", "list at least one reason (or leave the key out for the defaults)")
    for i, item in items:
        if isinstance(item, str):
            label = item.strip()
            if not r.clean(f"close_reasons[{i}]", label):
                continue
            reason_id = "-".join(label.lower().split())
            where = f"close_reasons[{i}]"
        else:
            c = Reader(r.src, f"{r.at('close_reasons')}[{i}]", item, r.problems)
            reason_id = c.text("id", required=True, pattern=ID, hint=ID_HINT) or ""
            label = c.text("label", required=True) or ""
            c.done()
            where = f"close_reasons[{i}].id"
            if not reason_id or not label:
                continue
        if not label or len(label) > CLOSE_LABEL_MAX:
            r.fail(f"close_reasons[{i}]", f"a label is 1 to {CLOSE_LABEL_MAX} characters")
        elif not re.fullmatch(ID, reason_id):
            r.fail(where, f"{reason_id!r} cannot be an id ({ID_HINT}): give {{id, label}}")
        elif reason_id in seen:
            r.fail(where, f"{reason_id!r} is listed twice")
        else:
            seen.add(reason_id)
            out.append(CloseReason(reason_id, label))
    if len(out) > CLOSE_REASONS_MAX:
        r.fail("close_reasons", f"at most {CLOSE_REASONS_MAX} reasons: an operator picks one in a hurry")
    return tuple(out) or DEFAULT_CLOSE_REASONS

def users_file(r: Reader, check: bool) -> Path | None:
    """The operators' users file: checked like a secret (a regular file of mode 0600), and line by line."""
    path = r.path_value("users_file")
    if path is None or not check:
        return path
    if not os.path.lexists(path):
        r.fail("users_file", f"{path} does not exist; run: sip-refuge secrets init SITE, then add the "
                             "operators with: sip-refuge users add SITE NAME")
        return path
    try:
        read_users(path)
    except RefugeError as exc:
        r.fail("users_file", str(exc))
    return path

def retention(r: Reader) -> Retention:
    years, d = 100 * 365 * 86400, Retention()
    events = r.duration("events", d.events, low=86400, high=years)
    telemetry = r.duration("telemetry", d.telemetry, low=3600, high=years)
    per_post = r.size("telemetry_per_post", d.telemetry_per_post, low=64 * 1024, high=1 << 30)
    forever = r.has("incidents") and r.value["incidents"] == "forever"
    incidents = None if forever else r.duration("incidents", None, low=30 * 86400, high=years)
    audit = r.duration("audit", d.audit, low=30 * 86400, high=years)
    r.done()
    return Retention(events or d.events, telemetry or d.telemetry, per_post or d.telemetry_per_post, incidents,
                     audit or d.audit)

def http_limits(r: Reader) -> HttpLimits:
    d = HttpLimits()
    connections = r.integer("connections", d.connections, low=16, high=60000) or d.connections
    values = {
        "connections": connections,
        "per_client": r.integer("per_client", d.per_client, low=1, high=connections),
        "reserve": r.integer("reserve", min(d.reserve, connections // 2), low=0, high=connections // 2),
        "workers": r.integer("workers", d.workers, low=2, high=256),
        "streams": r.integer("streams", min(d.streams, connections), low=0, high=connections),
        "live_views": r.integer("live_views", d.live_views, low=0, high=1000),
        "header_timeout": r.duration("header_timeout", d.header_timeout, low=1, high=300),
        "idle_timeout": r.duration("idle_timeout", d.idle_timeout, low=1, high=3600),
    }
    r.done()
    limits = HttpLimits(**{k: v for k, v in values.items() if v is not None})
    if limits.live_views > limits.streams:
        r.fail("live_views", f"{limits.live_views} is above streams ({limits.streams}): live views are streams")
    return limits
