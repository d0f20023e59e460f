"""``/api/v1/events`` (server-sent events), and the long-lived bodies the sidecar's server runs in its loop.

An event stream or a live camera view lasts as long as its page is open. The view that starts one returns a
:class:`Stream` as the response body; the sidecar's HTTP server (:mod:`.server`) sees it and runs
:meth:`Stream.chunks` in its event loop, so the request thread is free again at once. Any other WSGI server
(Flask's test client) simply iterates it, which blocks a thread for the stream's life as WSGI always did.
"""

from __future__ import annotations

import asyncio
import json
import queue
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Callable, Iterator
from typing import Protocol

from flask import Blueprint, Response

from sip_refuge.sidecar.core import Hub
from sip_refuge.sidecar.events import Event
from sip_refuge.sidecar.web.context import hub

bp = Blueprint("stream", __name__)

KEEPALIVE = 15.0  # seconds; a comment line keeps proxies from closing an idle stream
RETRY = b"retry: 2000\n\n"  # how long a page's EventSource waits before reconnecting


class Stream(ABC):
    """A response body that lasts: ``kind`` names the cap it counts against (``events`` or ``live``)."""

    kind: str

    @abstractmethod
    def __iter__(self) -> Iterator[bytes]:
        """The blocking fallback for a plain WSGI server."""

    @abstractmethod
    def chunks(self) -> AsyncGenerator[bytes, None]:
        """The body in an event loop; it ends when the stream does, or is cancelled when the client leaves."""

    @abstractmethod
    def close(self) -> None:
        """WSGI's close(), also for a body never iterated (refused at a cap, or the client left)."""


def waker(event: asyncio.Event) -> Callable[[], None]:
    """A nudge for ``event`` that any thread may call; it does nothing once the running loop has closed."""
    loop = asyncio.get_running_loop()

    def wake() -> None:
        try:
            loop.call_soon_threadsafe(event.set)
        except RuntimeError:  # the loop closed under the stream: nobody is waiting any more
            pass

    return wake


def _frame(event: Event) -> bytes:
    return f"id: {event.id}\nevent: {event.type}\ndata: {json.dumps(event.body)}\n\n".encode()


class EventStream(Stream):
    """The hub's events for one page; it ends when the sidecar stops or the page falls too far behind."""

    kind = "events"

    def __init__(self, source: Hub) -> None:
        self.hub = source

    def close(self) -> None:
        pass  # nothing to let go of: each iteration subscribes, and unsubscribes when it ends

    def __iter__(self) -> Iterator[bytes]:
        subscription = self.hub.subscribe()
        try:
            yield RETRY
            while True:
                try:
                    event = subscription.get(timeout=KEEPALIVE)
                except queue.Empty:
                    yield b": keep-alive\n\n"
                    continue
                if event is None:  # the sidecar is stopping, or this reader fell too far behind
                    return
                yield _frame(event)
        finally:
            self.hub.unsubscribe(subscription)

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        ready = asyncio.Event()
        subscription = self.hub.subscribe(wake=waker(ready))
        try:
            yield RETRY
            while True:
                try:
                    async with asyncio.timeout(KEEPALIVE):
                        await ready.wait()
                except TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                ready.clear()
                frames, ended = [], False
                while not ended:
                    try:
                        event = subscription.get_nowait()
                    except queue.Empty:
                        break
                    ended = event is None
                    if event is not None:
                        frames.append(_frame(event))
                if frames:
                    yield b"".join(frames)  # a burst of events in one write
                if ended:
                    return
        finally:
            self.hub.unsubscribe(subscription)


class Feed(Protocol):
    """One camera's shared live picture (:class:`sip_refuge.sidecar.cameras.LiveFeed`)."""

    def watch(self, wake: Callable[[], None]) -> object: ...

    def leave(self, viewer: object) -> None: ...

    def latest(self) -> tuple[int, bytes | None]: ...


class LiveView(Stream):
    """A camera's live view as multipart JPEG parts.

    In the loop it follows the camera's shared :class:`Feed` (one decoder for all viewers) and always sends
    the newest part, so a slow viewer skips pictures instead of queueing them. The fallback is ``parts``,
    the view's own decoder.
    """

    kind = "live"

    def __init__(self, parts: Iterator[bytes], feed: Callable[[], Feed]) -> None:
        self.parts, self.feed = parts, feed

    def __iter__(self) -> Iterator[bytes]:
        return self.parts

    def close(self) -> None:
        close = getattr(self.parts, "close", None)
        if close is not None:
            close()

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        self.close()  # the fallback's decoder never started; the shared feed decodes instead
        feed, ready = self.feed(), asyncio.Event()
        viewer = feed.watch(waker(ready))
        try:
            sent = -1
            while True:
                ready.clear()
                number, part = feed.latest()
                if part is not None and number != sent:
                    sent = number
                    yield part
                else:
                    await ready.wait()
        finally:
            feed.leave(viewer)


@bp.get("/api/v1/events")
def events() -> Response:
    # direct_passthrough: the server must get the Stream itself, not Werkzeug's wrapper around it.
    return Response(EventStream(hub()), mimetype="text/event-stream", direct_passthrough=True,
                    headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
