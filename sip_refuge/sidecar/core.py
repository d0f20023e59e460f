"""The sidecar's rooms, wired together. The hub holds no logic of its own: each room does one thing.

    AMI follower ───events─────▶ Recorder ──changes + events──▶ Outbox ──▶ store, CCTV targets
    camera monitor ────────────▶ (lock, tracker,     │
    telemetry, close-out (HTTP)▶  boards)            └─events, once stored or held─▶ Fanout ──▶ pages (SSE)
                                   │  └─take─▶ SnapshotCache (a worker the runner starts)
                                   ▼ state()
                          ReadModel (posts, live calls, incidents) ◀── the Flask app
    AMI follower ──link, errors──▶ AmiLink (/healthz, /metrics)

``SidecarRunner`` builds the hub and owns every thread; tests build one on a store of their own.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sip_refuge.config.model import PRIMARY, Site
from sip_refuge.sidecar.fanout import Fanout
from sip_refuge.sidecar.link import AmiLink
from sip_refuge.sidecar.outbox import Outbox
from sip_refuge.sidecar.recorder import Recorder
from sip_refuge.sidecar.retention import Pruner
from sip_refuge.sidecar.snapshots import SnapshotCache
from sip_refuge.sidecar.store import Store
from sip_refuge.sidecar.views import ReadModel


class Hub:
    def __init__(self, site: Site, store: Store, outbox: Outbox, *, base_url: str,
                 snapshot: Callable[[str], bytes | None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.site, self.store, self.outbox = site, store, outbox
        self.links = {role: AmiLink() for role in site.pbx.roles}  # one per PBX of a pair
        self.link = self.links[PRIMARY]
        self.fanout = Fanout()
        self.snapshots = SnapshotCache(snapshot) if snapshot is not None else None
        self.recorder = Recorder(site, store, outbox, self.fanout, base_url=base_url, link=self.link,
                                 links=self.links, snapshots=self.snapshots, clock=clock)
        self.views = ReadModel(site, store, self.recorder, self.snapshots)
        self.pruner: Pruner | None = None  # set by the runner, which runs it; /healthz and /metrics show it

    def close(self) -> None:
        """The sidecar is stopping: end live pages' streams and stop taking snapshots."""
        self.fanout.close()
        if self.snapshots is not None:
            self.snapshots.close()
