"""The post agent's local control socket: ``sip-refuge press`` and ``sip-refuge status`` talk to it.

One JSON line in, one JSON line out, on 127.0.0.1 only. ``press`` works only on a mock-GPIO agent
(demo, tests): on a real post the button is the only way to raise an alarm.
"""

from __future__ import annotations

import json
import logging
import socketserver
import threading
from collections.abc import Callable
from typing import Any

# The client side (the port, one request) is shared with the sidecar and the CLI: it lives in sip_refuge.control.
from sip_refuge.control import DEFAULT_BASE_PORT, MAX_LINE, ask, control_port
from sip_refuge.errors import RefugeError

__all__ = ["DEFAULT_BASE_PORT", "ControlServer", "ask", "control_port"]

log = logging.getLogger(__name__)


Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlServer:
    """Serves ``handle(request) -> reply`` on 127.0.0.1:``port`` in one thread the runner owns."""

    def __init__(self, port: int, handle: Handler) -> None:
        outer = self

        class RequestHandler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                line = self.rfile.readline(MAX_LINE)
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError("not an object")
                    reply = outer.handle(request)
                except ValueError as exc:
                    reply = {"ok": False, "error": f"bad request: {exc}"}
                except Exception as exc:  # noqa: BLE001 - thread boundary: answer, log, keep serving
                    log.exception("control request %r failed", line[:200])
                    reply = {"ok": False, "error": f"the agent could not do that: {exc}"}
                self.wfile.write(json.dumps(reply).encode() + b"\n")

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True

        self.handle = handle
        try:
            self.server = Server(("127.0.0.1", port), RequestHandler)
        except OSError as exc:
            raise RefugeError(f"cannot open the control port 127.0.0.1:{port}: {exc.strerror}") from None
        self.thread = threading.Thread(target=self.server.serve_forever, name="control", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

