"""``sip-refuge sidecar SITE``: build the hub and own every background thread of the sidecar.

Threads: the AMI follower (its own asyncio loop), one outbox worker per CCTV target, the camera
monitor, a ticker for timers (post offline after grace; storing writes held while the database failed),
the retention pruner, the snapshot taker, the HTTP server's event loop (this, the main thread: every
connection, event stream and live view) with its request threads for the Flask app, and one decoder per
camera while anyone watches it live.
"""

from __future__ import annotations

import argparse
import functools
import logging
import signal
import threading
import time
from typing import Any

from sip_refuge.config import Site, load_site
from sip_refuge.config.commands import warning_text
from sip_refuge.config.model import PRIMARY
from sip_refuge.config.secrets import Masker
from sip_refuge.errors import SidecarError
from sip_refuge.logs import setup_logging
from sip_refuge.sidecar.access import Access
from sip_refuge.sidecar.ami import AmiFollower
from sip_refuge.sidecar.core import Hub
from sip_refuge.sidecar.events import Revealer
from sip_refuge.sidecar.outbox import Outbox
from sip_refuge.sidecar.retention import Pruner
from sip_refuge.sidecar.store import Store
from sip_refuge.sidecar.targets import make_target

log = logging.getLogger(__name__)


class SidecarRunner:
    def __init__(self, site: Site, *, cameras: bool = True) -> None:
        if site.sidecar is None:
            raise SidecarError(f"{site.path}: the site has no sidecar section")
        self.site, self.conf = site, site.sidecar
        self.stop_event = threading.Event()
        # Refuses (SidecarError, with the recovery) a database file that is empty, not SQLite or damaged.
        self.store = Store(self.conf.database)
        targets = [make_target(t) for t in site.cctv]
        self.outbox = Outbox(self.store, targets, reveal=Revealer(site), mask=Masker.for_site(site),
                             concurrency={t.name: t.concurrency for t in site.cctv})
        base = self.conf.public_url or f"http://{self.conf.host}:{self.conf.port}"
        self.monitor: Any = None
        watch = cameras and any(p.camera for p in site.posts)
        self.hub = Hub(site, self.store, self.outbox, base_url=base,
                       snapshot=(lambda post_id: self.monitor.snapshot(post_id)) if watch else None)
        self.hub.pruner = Pruner(self.store, self.conf.retention)
        recorder = self.hub.recorder
        if watch:
            from sip_refuge.sidecar.cameras import CameraMonitor  # opencv only when cameras are checked

            # Seeded from the store, so a restarted sidecar does not repeat camera.fault for a known fault.
            known = {k: (bool(v.ok), v.reason or "") for k, v in self.store.camera_statuses().items()
                     if v.ok is not None}
            self.monitor = CameraMonitor.for_site(site, on_change=recorder.on_camera_change, initial=known)
        # One follower per PBX (both of a pair), into the one recorder: one incident log.
        self.amis = [AmiFollower(site.pbx.ami_of(role), site.queue.name, name="ami" if role == PRIMARY else f"ami-{role}",
                                 on_event=functools.partial(recorder.on_ami_event, role=role),
                                 on_resync=functools.partial(recorder.on_resync, role=role),
                                 on_link=functools.partial(self._on_link, role),
                                 on_error=self.hub.links[role].on_error) for role in site.pbx.roles]
        self.ami = self.amis[0]
        self.threads: list[threading.Thread] = []
        self.server: Any = None

    def _on_link(self, role: str, up: bool) -> None:
        self.hub.links[role].on_link(up)
        self.hub.recorder.on_pbx_link(role, up)

    def start(self) -> None:
        for warning in self.site.warnings:
            log.warning("%s", warning_text(warning))
        for ami in self.amis:
            ami.start()
        self._thread("outbox", lambda: self.outbox.run(self.stop_event))
        self._thread("ticker", self._tick)
        if self.hub.snapshots is not None:
            self._thread("snapshots", self.hub.snapshots.run)
        pruner = self.hub.pruner
        if pruner is not None:
            self._thread("retention", lambda: pruner.run(self.stop_event))
        if self.monitor is not None:
            self._thread("cameras", lambda: self.monitor.run(self.stop_event))

    def _thread(self, name: str, body: Any) -> None:
        thread = threading.Thread(target=body, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def _tick(self) -> None:
        while not self.stop_event.is_set():
            try:
                deadline = self.hub.recorder.tick()
            except Exception:  # noqa: BLE001 - thread boundary: keep timing posts out
                log.exception("sidecar timer failed")
                deadline = None
            wait = 1.0 if deadline is None else max(0.05, min(1.0, deadline - time.monotonic()))
            self.stop_event.wait(wait)

    def serve(self) -> None:
        """Serve HTTP until SIGINT/SIGTERM, then stop every thread."""
        from sip_refuge.sidecar.web import MAX_BODY, create_app
        from sip_refuge.sidecar.web.admission import Admission
        from sip_refuge.sidecar.web.server import HttpServer

        admission = Admission(self.conf.limits, trusted=self.site.pbx.networks.posts, proxies=self.conf.proxies)
        token = self.conf.token.read()
        access = Access.for_site(self.site, self.store, token)
        if not access.operators.current():
            log.warning("no operators in sidecar.users_file: nobody can log in to the pages (only the bearer "
                        "token reads them); run: sip-refuge users add %s NAME", self.site.path)
        app = create_app(self.hub, token=token, cameras=self.monitor, stop=self.stop_event,
                         http=admission.status, access=access)
        # Bound before any thread starts: a port in use is a clear error, not a half-started sidecar.
        self.server = HttpServer(app, admission, host=self.conf.host, port=self.conf.port, max_body=MAX_BODY)
        self.start()
        log.info("sidecar for %s on http://%s:%s/ (dashboard), /operator?desk=ID, /metrics",
                 self.site.name, self.conf.host, self.server.port)
        try:
            self.server.run(on_signal=self._signal)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the clean stop
            self._close_server()
            self.stop()

    def _signal(self, signum: int) -> None:
        """SIGINT/SIGTERM, in the server's loop; the server stops once this returns (a second one is ignored)."""
        log.info("sidecar stopping (signal %d)", signum)
        self.stop_event.set()
        self.hub.fanout.close()  # event streams end cleanly, with the end of their body

    def _close_server(self) -> None:
        # The server has stopped (its streams ended, its request threads joined); the live views' decoders
        # stop with their last viewer, and are joined here.
        self.stop_event.set()
        self.hub.fanout.close()
        if self.monitor is not None:
            self.monitor.close_feeds()

    def stop(self) -> None:
        self.stop_event.set()
        self.hub.close()  # event streams, and the snapshot worker (joined below with the other threads)
        for ami in self.amis:
            ami.stop()
        for thread in self.threads:
            thread.join(10)
        self.outbox.close()
        self.store.close()


def run(args: argparse.Namespace) -> int:
    site = load_site(args.site)
    setup_logging(getattr(args, "verbose", False), Masker.for_site(site))
    SidecarRunner(site, cameras=not getattr(args, "no_cameras", False)).serve()
    return 0
