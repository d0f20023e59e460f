"""The audit log: who logged in (or failed to, and from where), who logged out, and every write an operator
or the admin token made. Each entry goes to the store's ``audit`` table (``GET /api/v1/audit``, admins only)
and to the sidecar's log (logger ``sip_refuge.audit``), so it survives a database that cannot take writes.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sip_refuge.config.files import printable
from sip_refuge.sidecar.events import iso_utc
from sip_refuge.sidecar.store import Store, StoreError

log = logging.getLogger("sip_refuge.audit")

OK = "ok"
MAX_TEXT = 300  # characters of a name, target or detail kept


class AuditLog:
    def __init__(self, store: Store, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.store, self.clock = store, clock
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str]] = Counter()  # (action, outcome) since start: /metrics

    def counts(self) -> dict[tuple[str, str], int]:
        """Entries recorded since start by (action, outcome), stored or not."""
        with self._lock:
            return dict(self._counts)

    def record(self, action: str, outcome: str, *, actor: str, address: str, role: str | None = None,
               target: str | None = None, **detail: Any) -> dict[str, Any]:
        # Names, paths and details come from clients: a line break in one must not forge a log line of its own.
        actor, target = _shown(actor), _shown(target) if target is not None else None
        detail = {k: _shown(v) if isinstance(v, str) else v for k, v in detail.items()}
        entry = {"at": iso_utc(self.clock()), "action": action, "outcome": outcome, "actor": actor, "role": role,
                 "address": address, "target": target, "detail": detail}
        with self._lock:
            self._counts[(action, outcome)] += 1
        extra = "".join(f" {k}={v}" for k, v in detail.items())
        log.log(logging.INFO if outcome == OK else logging.WARNING, "audit: %s %s by %s%s from %s%s%s", action,
                outcome, actor, f" ({role})" if role else "", address, f" on {target}" if target else "", extra)
        try:
            self.store.add_audit(entry)
        except StoreError as exc:  # the log line above keeps the entry; the store's fault is on /healthz
            log.error("audit: could not store the entry above: %s", exc)
        return entry

    def entries(self, limit: int, before: int | None = None) -> list[dict[str, Any]]:
        return self.store.audit(limit, before)


def _shown(text: str) -> str:
    return printable(text)[:MAX_TEXT]
