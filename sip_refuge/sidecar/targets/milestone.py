"""Milestone XProtect Generic Event, "Compatible" data source: one plain ASCII string over TCP (port 1234).

XProtect matches the string against each generic event's expression and fires the rules an installer made
(for example "show the post's camera on the workstation's Smart Client"). The Compatible data source echoes
every byte back; reading the echo is our only acknowledgement that the event server took the string, so we
wait for it. The camera is added to XProtect once, so the message names the post, never a camera password.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any

from sip_refuge.config.cctv import milestone as schema
from sip_refuge.config.cctv.milestone import DEFAULT_PORT, DEFAULT_TEMPLATE, check_template
from sip_refuge.config.model import CctvTarget
from sip_refuge.sidecar.events import Event
from sip_refuge.sidecar.targets import DEFAULT_TIMEOUT, TargetError

KIND = schema.KIND
Options = schema.MilestoneOptions
read = schema.read


def message_fields(event: Event) -> dict[str, str]:
    data: Mapping[str, Any] = event.body.get("data", {})
    post = data.get("post") or {}
    desk = data.get("desk") or {}
    values = {
        "type": event.type, "post_id": event.post_id, "post_name": post.get("name"),
        "incident": event.incident, "reference": data.get("reference"), "desk_id": desk.get("id"),
        "desk_name": desk.get("name"), "workstation": desk.get("workstation"), "timestamp": event.timestamp, "event_id": event.id,
        "reason": data.get("reason"), "snapshot_url": data.get("snapshot_url"),
    }
    return {k: "" if v is None else str(v) for k, v in values.items()}


class MilestoneTarget:
    reveal_credentials = False

    def __init__(self, name: str, host: str, port: int = DEFAULT_PORT, template: str = DEFAULT_TEMPLATE, *,
                 echo: bool = True, timeout: float = DEFAULT_TIMEOUT) -> None:
        check_template(template)
        self.name = name
        self.host = host
        self.port = port
        self.template = template
        self.echo = echo
        self._timeout = timeout

    def message(self, event: Event) -> bytes:
        # Compatible means ASCII: anything else (an accented post name) becomes "?" rather than failing.
        return self.template.format_map(message_fields(event)).encode("ascii", "replace")

    def deliver(self, event: Event) -> None:
        message = self.message(event)
        where = f"{self.host}:{self.port}"
        try:
            with socket.create_connection((self.host, self.port), timeout=self._timeout) as sock:
                sock.sendall(message)
                if self.echo:
                    echoed = self._read_echo(sock, len(message))
                    if echoed != message:
                        raise TargetError(f"{self.name}: {where} echoed {echoed!r}, not the event string")
        except TimeoutError:
            raise TargetError(f"{self.name}: {where} did not echo within {self._timeout:g} s") from None
        except OSError as exc:
            raise TargetError(f"{self.name}: cannot reach {where} ({exc.strerror or type(exc).__name__})") from None

    @staticmethod
    def _read_echo(sock: socket.socket, size: int) -> bytes:
        got = b""
        while len(got) < size:
            chunk = sock.recv(size - len(got))
            if not chunk:
                break  # closed early: the comparison reports what arrived
            got += chunk
        return got

    def close(self) -> None:
        pass  # a connection per event: the event server expects short-lived clients


def from_config(config: CctvTarget, *, timeout: float = DEFAULT_TIMEOUT) -> MilestoneTarget:
    options = config.options
    assert isinstance(options, Options)
    return MilestoneTarget(config.name, options.host, options.port, options.template, echo=options.echo,
                           timeout=timeout)
