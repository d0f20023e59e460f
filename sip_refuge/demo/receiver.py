"""The demo's stand-in for a CCTV system: receives the sidecar's signed webhooks and prints them.

It verifies every Standard Webhooks signature, ignores repeats of a ``webhook-id`` (deliveries are
at-least-once) and prints one readable line per event: what a VMS would be told.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


class WebhookPrinter:
    def __init__(self, port: int, secret: str, out: Callable[[str], None] = print) -> None:
        self.hook, self.out = Webhook(secret), out
        self.seen: set[str] = set()
        self.events: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status = outer.receive(body, {k.lower(): v for k, v in self.headers.items()})
                self.send_response(status)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="webhook-printer", daemon=True)

    def receive(self, body: bytes, headers: dict[str, str]) -> int:
        try:
            event = self.hook.verify(body, headers)
        except WebhookVerificationError:
            self.out("[cctv] REFUSED a webhook with a bad signature")
            return 401
        event_id = headers.get("webhook-id", "")
        if event_id in self.seen:
            return 204
        self.seen.add(event_id)
        self.events.append(event)
        self.out("[cctv] " + describe(event))
        return 204

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def describe(event: dict[str, Any]) -> str:
    data = event.get("data") or {}
    post = (data.get("post") or {}).get("name") or (data.get("post") or {}).get("id")
    parts = [f"{event.get('type')}: {post}"]
    if data.get("desk"):
        parts.append(f"answered by {data['desk'].get('name')} (workstation {data['desk'].get('workstation')})")
    if (data.get("camera") or {}).get("rtsp_url") and event.get("type") == "call.queued":
        parts.append(f"camera {data['camera']['rtsp_url']}")
    if data.get("reason"):
        parts.append(f"reason {data['reason']}")
    if data.get("snapshot_url"):
        parts.append(f"snapshot {data['snapshot_url']}")
    return ", ".join(parts) + f"  {json.dumps({'incident': data.get('incident')})}"
