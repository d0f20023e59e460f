"""``/api/v1/events``: server-sent events of the same events the CCTV targets get (without secrets)."""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator

from flask import Blueprint, Response, stream_with_context

from sip_refuge.sidecar.web.context import hub

bp = Blueprint("stream", __name__)

KEEPALIVE = 15.0  # seconds; a comment line keeps proxies from closing an idle stream


@bp.get("/api/v1/events")
def events() -> Response:
    h = hub()
    subscription = h.subscribe()

    def generate() -> Iterator[str]:
        try:
            yield "retry: 2000\n\n"
            while True:
                try:
                    event = subscription.get(timeout=KEEPALIVE)
                except queue.Empty:
                    yield ": keep-alive\n\n"
                    continue
                if event is None:  # the sidecar is stopping, or this reader fell too far behind
                    return
                yield f"id: {event.id}\nevent: {event.type}\ndata: {json.dumps(event.body)}\n\n"
        finally:
            h.unsubscribe(subscription)

    return Response(stream_with_context(generate()), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
