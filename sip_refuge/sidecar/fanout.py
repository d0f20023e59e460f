"""Live pages' event feeds: every event the recorder stored (or held) goes to each subscribed page.

A subscriber is a bounded queue. A page that stops reading is dropped once its queue is full (its EventSource
reconnects and reloads the state), so a stuck browser can never hold up the recorder. ``wake``, given by an
asyncio reader (``web/stream.py``), runs in the publishing thread after each put, so the server's event loop
needs no thread per stream; it must not block.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from sip_refuge.sidecar.events import Event, iso_utc

SUBSCRIBER_BACKLOG = 200  # events kept for a slow page; beyond that it is dropped and reconnects

Subscription = queue.Queue["Event | None"]


class _Waking(queue.Queue["Event | None"]):
    """A subscriber's queue that calls ``wake()`` after each put (with the queue's lock held)."""

    def __init__(self, wake: Callable[[], None], backlog: int) -> None:
        super().__init__(backlog)
        self._wake = wake

    def _put(self, item: Event | None) -> None:
        super()._put(item)
        self._wake()


class Fanout:
    def __init__(self, backlog: int = SUBSCRIBER_BACKLOG) -> None:
        self.backlog = backlog
        self._lock = threading.Lock()
        self._subscribers: list[Subscription] = []

    def __len__(self) -> int:
        with self._lock:
            return len(self._subscribers)

    def subscribe(self, wake: Callable[[], None] | None = None) -> Subscription:
        """A live page's events (None: its stream ends)."""
        q: Subscription = queue.Queue(self.backlog) if wake is None else _Waking(wake, self.backlog)
        with self._lock:
            self._subscribers.append(q)
        return q

    def unsubscribe(self, q: Subscription) -> None:
        with self._lock:
            if q in self._subscribers:
                self._subscribers.remove(q)

    def publish(self, events: Iterable[Event]) -> None:
        for event in events:
            with self._lock:
                subscribers = list(self._subscribers)
            for q in subscribers:
                try:
                    q.put_nowait(event)
                except queue.Full:
                    # A page that stopped reading: drop it; its EventSource reconnects and reloads state.
                    self.unsubscribe(q)
                    with q.mutex:
                        q.queue.clear()
                    q.put_nowait(None)

    def publish_status(self, post_id: str) -> None:
        """Pages also follow post state changes that are not CCTV events (telemetry): ``post.status``. A full
        page just misses one (it reloads the post on the next)."""
        self._hint(Event("status-" + post_id, "post.status", iso_utc(datetime.now(UTC)), None, post_id,
                         {"type": "post.status", "data": {"post": {"id": post_id}}}))

    def publish_call(self, incident: str, post_id: str) -> None:
        """And a live call's steps that are not CCTV events (a desk rung, back in the queue, the overflow route
        answered): ``call.updated``, on which a page reads the call again."""
        self._hint(Event("call-" + incident, "call.updated", iso_utc(datetime.now(UTC)), incident, post_id,
                         {"type": "call.updated", "data": {"incident": incident, "post": {"id": post_id}}}))

    def _hint(self, status: Event) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for q in subscribers:
            try:
                q.put_nowait(status)
            except queue.Full:
                pass

    def close(self) -> None:
        """The sidecar is stopping: end every live page's stream."""
        with self._lock:
            subscribers, self._subscribers = self._subscribers, []
        for q in subscribers:
            try:
                q.put_nowait(None)
            except queue.Full:
                pass
