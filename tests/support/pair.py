"""A PBX pair on loopback for tests and benches: the agent site with ``pbx.secondary_host`` 127.0.0.2, two real
Asterisks (the primary on 127.0.0.1, the secondary on 127.0.0.2, the same ports) and a desk robot registered with
both, as a desk phone with two accounts is (docs/admin-guide.md, "The PBX pair")."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from sip_refuge.config import Site, load_site
from sip_refuge.config.model import PRIMARY, SECONDARY
from sip_refuge.config.secrets import init_secrets
from sip_refuge.pbx.asterisk import Asterisk, free_port
from tests.support.desk_robot import DeskRobot
from tests.support.sites import agent_site
from tests.support.waiting import wait_for

SECONDARY_HOST = "127.0.0.2"


def pair_site(folder: Path, *, sidecar: dict[str, Any] | None = None, cctv: list[dict[str, Any]] | None = None) -> Site:
    """The agent site as a PBX pair: the secondary on 127.0.0.2 with the primary's ports, posts re-registering
    every 5 s (so an idle post learns of a dead PBX within seconds), qualify every 5 s. ``sidecar``: more keys of
    the sidecar section; ``cctv``: the site's CCTV targets (none by default)."""
    base = agent_site(folder)
    data = yaml.safe_load(base.path.read_text(encoding="utf-8"))
    port = data["pbx"]["sip_port"]
    while not _free_on(SECONDARY_HOST, port) or not _free_on(SECONDARY_HOST, data["pbx"]["ami"]["port"]):
        port = free_port()  # the same port must be free on both addresses
        data["pbx"]["sip_port"], data["pbx"]["ami"]["port"] = port, free_port()
    data["pbx"].update(secondary_host=SECONDARY_HOST, register_interval=5)
    data["sidecar"].update(sidecar or {})
    data["cctv"] = cctv or []
    base.path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    init_secrets(load_site(base.path, check_secrets=False))
    return load_site(base.path)


def _free_on(host: str, port: int) -> bool:
    import socket

    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


class Pair:
    """The two Asterisks of a pair site. Use as a context manager; both are started."""

    def __init__(self, site: Site, command: str) -> None:
        self.site = site
        self.primary = Asterisk(site, command=command, boot_timeout=60, role=PRIMARY)
        self.secondary = Asterisk(site, command=command + " --role secondary", boot_timeout=60, role=SECONDARY)

    def __enter__(self) -> Pair:
        self.primary.start()
        try:
            self.secondary.start()
        except BaseException:
            self.primary.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.primary.close()
        self.secondary.close()

    def both(self) -> tuple[Asterisk, Asterisk]:
        return self.primary, self.secondary

    def ensure_running(self) -> None:
        for pbx in self.both():
            if not pbx.running:
                pbx.start()

    def kill_primary(self) -> None:
        """``kill -9`` of the primary Asterisk: no BYE, no unregistration, its sockets just gone."""
        pid = self.primary.pid
        assert pid is not None and self.primary.running
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not self.primary.running, 10, "the primary gone after SIGKILL")
        self.primary.stop()  # reaps it; nothing is left to stop

    def desk(self, *, answer_after: float | None = None) -> DeskRobot:
        """desk-1 of the site as a robot that registers with both PBXs (use it in ``with``, or start and stop it)."""
        d = self.site.desks[0]
        robot = DeskRobot(d.id, d.secret.read(), (self.site.pbx.host, self.site.pbx.sip_port),
                          answer_after=answer_after, display=d.name,
                          also=((SECONDARY_HOST, self.site.pbx.sip_port),))
        return robot

    def wait_desk_ready(self, timeout: float = 30.0) -> None:
        """desk-1 free in the queue of every running PBX (the queue lets nobody join while it is unknown)."""
        desk = self.site.desks[0].id
        for pbx in self.both():
            if pbx.running:
                wait_for(lambda: _desk_free(pbx, desk, self.site.queue.name), timeout,  # noqa: B023 - used at once
                         f"{desk} free in the queue of the {pbx.role}")

    def wait_post_registered(self, post_id: str, timeout: float = 30.0) -> None:
        """Both running PBXs hold a contact of ``post_id``."""
        for pbx in self.both():
            if pbx.running:
                wait_for(lambda: f"Contact:  {post_id}/" in pbx.cli(f"pjsip show contacts like {post_id}"),  # noqa: B023
                         timeout, f"{post_id} registered with the {pbx.role}")


def _desk_free(pbx: Asterisk, desk: str, queue: str) -> bool:
    return bool(re.search(rf"\(PJSIP/{desk}\).*\(Not in use\)", pbx.cli(f"queue show {queue}")))


def pbx_of(ring_dest: tuple[str, int], site: Site) -> str:
    """Which PBX of the pair sent a desk its INVITE: ``primary`` or ``secondary``."""
    return site.pbx.role_of(ring_dest[0]) if ring_dest[0] in (site.pbx.host, site.pbx.secondary_host) else "?"
