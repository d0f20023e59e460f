"""The sidecar's HTTP/1.1 server: one asyncio loop owns every connection; the Flask app runs in a bounded pool.

Why not waitress, the server before: each open event stream or live view held one of its 32 request threads,
so 32 open pages stopped telemetry and ``/healthz``; it had no deadline for request headers and no cap per
client, and it spooled large bodies to disk before the app could refuse them. Here:

- every connection is admitted against the caps of :mod:`.admission` (503 with Retry-After beyond them);
- a request's headers must arrive within ``header_timeout`` (slowloris), and its body within as long again;
  a kept-alive connection waits ``idle_timeout`` for its next request, and a client that reads nothing for
  ``idle_timeout`` is dropped; headers are limited to 16 KiB (:data:`.exchange.MAX_HEADER`);
- a body over ``max_body`` is refused by its Content-Length before any of it is read, or cut off as it
  streams in (chunked); bodies stay in memory, nothing goes to disk;
- only a fully read request takes a request thread, and the loop writes the answer, so no thread ever
  waits for a client;
- event streams and live views (:class:`.stream.Stream` bodies) run as coroutines in the loop.

h11 (pure Python, sans-I/O) parses and frames HTTP/1.1; this module and :mod:`.exchange` (one connection)
move bytes and keep time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import resource
import signal
import socket
import threading
from collections import deque
from collections.abc import Callable

from sip_refuge.errors import SidecarError
from sip_refuge.sidecar.web import wsgi
from sip_refuge.sidecar.web.admission import Admission
from sip_refuge.sidecar.web.exchange import LINGER_BYTES, READ_SIZE, Closed, Exchange, raw

log = logging.getLogger(__name__)

QUEUE_WAIT = 10.0  # seconds a read request may wait for a request thread before its 503
LINGER, MAX_LINGERING = 2.0, 256  # see HttpServer.linger()
DRAIN = 10.0  # seconds requests in flight get to finish when the sidecar stops


class HttpServer:
    """Serve ``app`` on ``host:port`` until :meth:`stop` (or SIGINT/SIGTERM when :meth:`run` has ``on_signal``)."""

    def __init__(self, app: wsgi.WsgiApp, admission: Admission, *, host: str, port: int, max_body: int) -> None:
        self.app, self.admission, self.max_body = app, admission, max_body
        self.limits = admission.limits
        self.workers = wsgi.Workers(self.limits.workers)
        self.sock = _listen(host, port, self.limits.connections)
        self.host, self.port = self.sock.getsockname()[:2]
        self._waiting: deque[tuple[bool, asyncio.Future[None]]] = deque()
        self._connections: dict[asyncio.Task[None], str] = {}  # task -> reading | working | streaming
        self._lingering = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._stop_asked = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    # -- life cycle ------------------------------------------------------------------------------------------
    def run(self, on_signal: Callable[[int], None] | None = None) -> None:
        """Serve in this thread until :meth:`stop`; with ``on_signal``, SIGINT/SIGTERM call it and stop."""
        asyncio.run(self._main(on_signal))

    def start(self) -> HttpServer:
        """Serve in a background thread (tests); returns once the loop runs."""
        self._thread = threading.Thread(target=self.run, name="http-loop", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise SidecarError("the HTTP server did not start")
        return self

    def stop(self, timeout: float = DRAIN + 5) -> None:
        """Stop serving (from any thread but the loop's): streams end, requests in flight finish, threads join."""
        self._stop_asked.set()
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stopping.set)
        if self._thread is not None:
            self._thread.join(timeout)

    async def _main(self, on_signal: Callable[[int], None] | None) -> None:
        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        server = await asyncio.start_server(self._accept, sock=self.sock)
        signals = (signal.SIGINT, signal.SIGTERM) if on_signal is not None else ()
        for sig in signals:
            self._loop.add_signal_handler(sig, functools.partial(self._signalled, sig, on_signal))
        self.workers.start()
        self._ready.set()
        try:
            if not self._stop_asked.is_set():
                await self._stopping.wait()
        finally:
            server.close()  # no new connections
            await self._drain()
            self.workers.stop(timeout=5)
            for sig in signals:  # only now: a second Ctrl-C while draining goes to _signalled, which ignores it
                self._loop.remove_signal_handler(sig)

    def _signalled(self, signum: int, on_signal: Callable[[int], None] | None) -> None:
        assert self._stopping is not None
        if self._stopping.is_set():
            return  # a second Ctrl-C must not interrupt the clean stop
        if on_signal is not None:
            on_signal(signum)
        self._stopping.set()

    async def _drain(self) -> None:
        """Streams and idle connections end now; requests in the app get :data:`DRAIN` seconds to answer."""
        for task, state in list(self._connections.items()):
            if state != "working":
                task.cancel()
        busy = [t for t, state in self._connections.items() if state == "working"]
        if busy:
            await asyncio.wait(busy, timeout=DRAIN)
        rest = list(self._connections)
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    # -- request threads ---------------------------------------------------------------------------------------
    async def take_worker(self, priority: bool) -> bool:
        """Wait (at most :data:`QUEUE_WAIT`) for a request thread; False: answer 503."""
        if self.admission.take_worker(priority):
            return True
        # No cap on how many wait: each waiter is a connection, and connections are capped already.
        assert self._loop is not None
        entry = (priority, self._loop.create_future())
        self._waiting.append(entry)
        try:
            await asyncio.wait({entry[1]}, timeout=QUEUE_WAIT)
        except BaseException:
            if entry[1].done():
                self.release_worker()  # handed a thread just as this connection was cancelled: give it back
            raise
        finally:
            if not entry[1].done():
                entry[1].cancel()
                self._waiting.remove(entry)
        return not entry[1].cancelled()  # done and not cancelled: release_worker() handed it a thread

    def release_worker(self) -> None:
        self.admission.release_worker()
        for wanted in (True, False):  # telemetry and health checks first
            for entry in [e for e in self._waiting if e[0] is wanted]:
                if not self.admission.take_worker(wanted):
                    break
                self._waiting.remove(entry)
                entry[1].set_result(None)

    # -- connections -------------------------------------------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else ("", 0)
        refusal = self.admission.connect(client[0])
        if refusal is not None:
            await self.linger(reader, writer, raw(503, refusal.detail))
            return
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = "reading"
        try:
            await Exchange(self, reader, writer, client, task).serve()
        except (Closed, ConnectionError, asyncio.CancelledError):
            pass
        except Exception:  # noqa: BLE001 - connection boundary: one client's surprise must not stop the server
            log.exception("HTTP connection from %s failed", client[0])
        finally:
            del self._connections[task]
            self.admission.disconnect(client[0])
            await _close(writer)

    def state(self, task: asyncio.Task[None], state: str) -> None:
        self._connections[task] = state

    @property
    def stopping(self) -> bool:
        return self._stopping is not None and self._stopping.is_set()

    async def linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answer: bytes) -> None:
        """Send a last answer, then read and drop what the client still sends (for at most :data:`LINGER` s
        and :data:`LINGER_BYTES`) before closing: closing with unread input resets the connection, and the
        reset can destroy the answer before the client has read it."""
        self._lingering += 1
        try:
            writer.write(answer)
            if self._lingering > MAX_LINGERING:
                return  # a flood of refused connections must not be held open: close them at once
            async with asyncio.timeout(LINGER):
                await writer.drain()
                writer.write_eof()
                dropped = 0
                while dropped < LINGER_BYTES and (chunk := await reader.read(READ_SIZE)):
                    dropped += len(chunk)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            self._lingering -= 1
            await _close(writer)


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close after what is written has gone out, but wait for a client that reads nothing only so long."""
    try:
        writer.close()
        async with asyncio.timeout(LINGER):
            await writer.wait_closed()
    except (TimeoutError, ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.transport.abort()


def _listen(host: str, port: int, connections: int) -> socket.socket:
    """The listening socket, bound now so that a port in use is a clear error before anything starts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + 256  # and the store, AMI, cameras, targets
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < wanted:
            log.warning("only %d open files allowed: sidecar.limits.connections (%d) cannot all be open", new,
                        connections)
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError as exc:
        raise SidecarError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock
