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
import threading
import weakref
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Iterator
from typing import Protocol

from flask import Blueprint, Response

from sip_refuge.sidecar.events import Event
from sip_refuge.sidecar.fanout import Fanout
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


class _Nudges:
    """Sets asyncio events from other threads with one loop call per burst rather than one per event.

    One published event wakes every open stream, and each ``call_soon_threadsafe`` is a system call made
    by the publishing thread (with the recorder's lock held): 200 streams would cost it 200.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: set[asyncio.Event] = set()

    def waker(self, event: asyncio.Event) -> Callable[[], None]:
        def wake() -> None:
            with self._lock:
                first = not self._pending
                self._pending.add(event)
            if first:
                try:
                    self.loop.call_soon_threadsafe(self._flush)
                except RuntimeError:  # the loop closed under the stream: nobody is waiting any more
                    pass

        return wake

    def _flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, set()
        for event in pending:
            event.set()


_nudges: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Nudges] = weakref.WeakKeyDictionary()


def waker(event: asyncio.Event) -> Callable[[], None]:
    """A nudge for ``event`` (in the running loop) that any thread may call, even after the loop closed."""
    loop = asyncio.get_running_loop()
    nudges = _nudges.get(loop)
    if nudges is None:
        nudges = _nudges[loop] = _Nudges(loop)
    return nudges.waker(event)


class _Frames:
    """Each event's SSE frame, encoded once for all the streams it goes to (used in the loop's thread only)."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._recent: OrderedDict[int, tuple[Event, bytes]] = OrderedDict()

    def __call__(self, event: Event) -> bytes:
        hit = self._recent.get(id(event))
        if hit is not None and hit[0] is event:
            return hit[1]
        frame = _frame(event)
        self._recent[id(event)] = (event, frame)
        if len(self._recent) > self.size:
            self._recent.popitem(last=False)
        return frame


_loop_frames = _Frames()


def _frame(event: Event) -> bytes:
    return f"id: {event.id}\nevent: {event.type}\ndata: {json.dumps(event.body)}\n\n".encode()


def _take_all(subscription: queue.Queue[Event | None]) -> list[Event | None]:
    """Everything queued, under one lock (Queue.get_nowait would take it, and raise Empty, once more)."""
    with subscription.mutex:
        items = list(subscription.queue)
        subscription.queue.clear()
        subscription.not_full.notify_all()
    return items


class EventStream(Stream):
    """The recorder's events for one page, from the fan-out; it ends when the sidecar stops or the page falls
    too far behind."""

    kind = "events"

    def __init__(self, source: Fanout) -> None:
        self.fanout = source

    def close(self) -> None:
        pass  # nothing to let go of: each iteration subscribes, and unsubscribes when it ends

    def __iter__(self) -> Iterator[bytes]:
        subscription = self.fanout.subscribe()
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
            self.fanout.unsubscribe(subscription)

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        ready = asyncio.Event()
        subscription = self.fanout.subscribe(wake=waker(ready))
        beat = _Beat(ready)
        try:
            yield RETRY
            while True:
                await ready.wait()
                ready.clear()
                items = _take_all(subscription)
                frames = [_loop_frames(event) for event in items if event is not None]
                if beat.due and not frames:
                    frames.append(b": keep-alive\n\n")
                beat.due = False
                if frames:
                    yield b"".join(frames)  # a burst of events in one write
                if None in items:  # the sidecar is stopping, or this reader fell too far behind
                    return
        finally:
            beat.cancel()
            self.fanout.unsubscribe(subscription)


class _Beat:
    """Sets ``ready`` and ``due`` every :data:`KEEPALIVE` seconds: one timer per stream, not one per event."""

    def __init__(self, ready: asyncio.Event) -> None:
        self.ready, self.due = ready, False
        self.loop = asyncio.get_running_loop()
        self._timer = self.loop.call_later(KEEPALIVE, self._fire)

    def _fire(self) -> None:
        self.due = True
        self.ready.set()
        self._timer = self.loop.call_later(KEEPALIVE, self._fire)

    def cancel(self) -> None:
        self._timer.cancel()


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
    return Response(EventStream(hub().fanout), mimetype="text/event-stream", direct_passthrough=True,
                    headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
