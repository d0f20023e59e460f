"""The incident log as files: JSON (every field, the timeline as a list) and CSV (one row per incident).

Columns only ever get added at the end of the CSV, so a spreadsheet built on an earlier export still lines up.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from typing import TextIO

from sip_refuge.sidecar.records import Incident

CSV_COLUMNS = ("id", "post_id", "state", "created", "answered_by", "answered_at", "ended", "outcome",
               "snapshot", "timeline", "reference", "closed_at", "closed_by", "close_reason", "close_note",
               "acknowledged_at", "acknowledged_by")


def write_json(incidents: Iterable[Incident], out: TextIO) -> None:
    json.dump([i.to_dict() for i in incidents], out, indent=1)
    out.write("\n")


def write_csv(incidents: Iterable[Incident], out: TextIO) -> None:
    """One row per incident; the timeline is one cell, ``AT kind; AT kind ...``, for spreadsheets."""
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for inc in incidents:
        timeline = "; ".join(f"{t.at} {t.kind}" + (f" {json.dumps(t.detail)}" if t.detail else "")
                             for t in inc.timeline)
        writer.writerow([inc.id, inc.post_id, inc.state, inc.created, inc.answered_by or "",
                         inc.answered_at or "", inc.ended or "", inc.outcome or "", inc.snapshot or "",
                         timeline, inc.reference or "", inc.closed_at or "", inc.closed_by or "",
                         inc.close_reason or "", inc.close_note or "", inc.acknowledged_at or "",
                         inc.acknowledged_by or ""])
