"""The sidecar's HTTP/1.1 server: one asyncio loop owns every connection; the Flask app runs in a bounded pool.

Why not waitress, the server before: each open event stream or live view held one of its 32 request threads,
so 32 open pages stopped telemetry and ``/healthz``; it had no deadline for request headers and no cap per
client, and it spooled large bodies to disk before the app could refuse them. Here:

- every connection is admitted against the caps of :mod:`.admission` (503 with Retry-After beyond them);
- a request's headers must arrive within ``header_timeout`` (slowloris), and its body within as long again;
  a kept-alive connection waits ``idle_timeout`` for its next request, and a client that reads nothing for
  ``idle_timeout`` is dropped; headers are limited to ``MAX_HEADER`` bytes;
- a body over ``max_body`` is refused by its Content-Length before any of it is read, or cut off as it
  streams in (chunked); bodies stay in memory, nothing goes to disk;
- only a fully read request takes a request thread, and the loop writes the answer, so no thread ever
  waits for a client;
- event streams and live views (:class:`.stream.Stream` bodies) run as coroutines in the loop.

h11 (pure Python, sans-I/O) parses and frames HTTP/1.1; this module moves bytes and keeps time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import resource
import signal
import socket
import threading
from collections import deque
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus

import h11

from sip_refuge.errors import SidecarError
from sip_refuge.sidecar.web import wsgi
from sip_refuge.sidecar.web.admission import Admission, Refusal
from sip_refuge.sidecar.web.stream import Stream

log = logging.getLogger(__name__)

MAX_HEADER = 16 * 1024  # request line and headers; h11's own default
RETRY_AFTER = 5  # seconds, in every 503
QUEUE_WAIT = 10.0  # seconds a read request may wait for a request thread before its 503
LINGER, LINGER_BYTES, MAX_LINGERING = 2.0, 256 * 1024, 256  # see HttpServer.linger()
DRAIN = 10.0  # seconds requests in flight get to finish when the sidecar stops
READ_SIZE = 64 * 1024
SERVER = b"sip-refuge"


class _Closed(Exception):
    """End this connection now (a deadline passed, already counted)."""


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
            await self.linger(reader, writer, _raw(503, refusal.detail))
            return
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = "reading"
        try:
            await _Exchange(self, reader, writer, client, task).serve()
        except (_Closed, ConnectionError, asyncio.CancelledError):
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


def _json(status: int, detail: str) -> bytes:
    return json.dumps({"error": HTTPStatus(status).phrase, "detail": detail}).encode()


def _raw(status: int, detail: str) -> bytes:
    """A whole answer written before (or instead of) reading a request: h11 only answers a parsed one."""
    body = _json(status, detail)
    retry = f"Retry-After: {RETRY_AFTER}\r\n" if status == 503 else ""
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nServer: sip-refuge\r\n"
            f"Date: {formatdate(usegmt=True)}\r\n{retry}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode("latin-1") + body


class _Exchange:
    """One connection: its requests in turn, each read whole within its deadlines, then answered."""

    def __init__(self, server: HttpServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 client: tuple[str, int], task: asyncio.Task[None]) -> None:
        self.server, self.reader, self.writer, self.client, self.task = server, reader, writer, client, task
        self.limits, self.admission = server.limits, server.admission
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER)
        self.loop = asyncio.get_running_loop()
        self.accepted = self.loop.time()

    async def serve(self) -> None:
        first = True
        while True:
            self.server.state(self.task, "reading")
            try:
                request = await self._request(first)
                body = await self._body(request) if request is not None else None
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                self.admission.rejected("headers_too_large" if status == 431 else "bad_request")
                await self.server.linger(self.reader, self.writer, _raw(status, str(exc) or "bad request"))
                return
            if request is None or body is None:
                return
            first = False
            if not await self._answer(request, body):
                return
            if self.conn.our_state is not h11.DONE or self.conn.their_state is not h11.DONE:
                return  # Connection: close, or HTTP/1.0
            self.conn.start_next_cycle()

    # -- reading ---------------------------------------------------------------------------------------------
    async def _read(self, deadline: float, phase: str) -> None:
        """Feed h11 what arrives before ``deadline`` (loop time); past it, count ``phase`` and close."""
        try:
            async with asyncio.timeout_at(deadline):
                data = await self.reader.read(READ_SIZE)
        except TimeoutError:
            self.admission.timed_out(phase)
            if phase != "idle":  # still counted against the caps while it lingers
                detail = f"the request did not arrive within {self.limits.header_timeout} s"
                await self.server.linger(self.reader, self.writer, _raw(408, detail))
            raise _Closed from None
        self.conn.receive_data(data)

    async def _request(self, first: bool) -> h11.Request | None:
        """The next request's head, within header_timeout of the accept, or of its first byte when kept
        alive (which may wait idle_timeout for that byte); None when the client closed."""
        if first:
            deadline, phase = self.accepted + self.limits.header_timeout, "header"
        else:
            deadline, phase = self.loop.time() + self.limits.idle_timeout, "idle"
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                await self._read(deadline, phase)
                if phase == "idle":
                    deadline, phase = self.loop.time() + self.limits.header_timeout, "header"
            elif isinstance(event, h11.Request):
                # h11 bounds only a head still incomplete; one that arrived in a single read is measured here.
                if len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers) > MAX_HEADER:
                    raise h11.RemoteProtocolError("the request headers are too large", 431)
                return event
            else:
                return None  # ConnectionClosed

    async def _body(self, request: h11.Request) -> bytes | None:
        """The whole body if it is within max_body and arrives in time; otherwise answered here, and None."""
        length = next((int(v) for k, v in request.headers if k == b"content-length"), 0)
        if length > self.server.max_body:
            await self._too_large(f"this one is {length} bytes")
            return None
        if self.conn.they_are_waiting_for_100_continue:
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
        deadline, body = self.loop.time() + self.limits.header_timeout, bytearray()
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                await self._read(deadline, "body")
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.server.max_body:
                    await self._too_large("this one went on past it")
                    return None
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            else:
                return None  # ConnectionClosed half-way

    async def _too_large(self, why: str) -> None:
        self.admission.rejected("body_too_large")
        detail = f"the body limit is {self.server.max_body} bytes; {why}"
        await self.server.linger(self.reader, self.writer, _raw(413, detail))

    # -- answering -------------------------------------------------------------------------------------------
    async def _answer(self, request: h11.Request, body: bytes) -> bool:
        """Answer through the app; False when the connection must end (after a stream)."""
        method = request.method.decode("ascii")
        env = wsgi.environ(request, body, client=self.client, server=(self.server.host, self.server.port))
        if not await self.server.take_worker(self.admission.is_priority(method, env["PATH_INFO"], self.client[0])):
            self.admission.refused("workers")
            await self._error(503, f"all {self.limits.workers} request threads are busy", retry=True)
            return True
        self.server.state(self.task, "working")
        try:
            reply = await self.server.workers.run(wsgi.call, self.server.app, env)
        except Exception:  # noqa: BLE001 - the app's error handlers answer all they can; this got past them
            log.exception("%s %s failed in the app", method, env["PATH_INFO"])
            reply = wsgi.Reply(500, b"Internal Server Error", [(b"content-type", b"application/json")],
                               _json(500, "the sidecar logged the details"))
        finally:
            self.server.release_worker()
        if isinstance(reply.body, Stream):
            return await self._stream(reply, reply.body)
        headers = [(k, v) for k, v in reply.headers if method == "HEAD" or k != b"content-length"]
        if method != "HEAD":
            headers.append((b"content-length", str(len(reply.body)).encode()))
        await self._send(h11.Response(status_code=reply.status, reason=reply.reason, headers=_server(headers)),
                         h11.Data(data=reply.body), h11.EndOfMessage())
        return True

    async def _stream(self, reply: wsgi.Reply, body: Stream) -> bool:
        refusal = self.admission.open_stream(body.kind) if not self.server.stopping else \
            Refusal("stopping", "the sidecar is stopping")
        if refusal is not None:
            body.close()
            await self._error(503, refusal.detail, retry=True)
            return True
        self.server.state(self.task, "streaming")
        try:
            headers = [(k, v) for k, v in reply.headers if k != b"content-length"]
            await self._send(h11.Response(status_code=reply.status, reason=reply.reason, headers=_server(headers)))
            pump, gone = asyncio.create_task(self._pump(body)), asyncio.create_task(self._gone())
            try:
                done, _ = await asyncio.wait({pump, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (pump, gone):
                    task.cancel()
                await asyncio.gather(pump, gone, return_exceptions=True)
            failure = pump.exception() if pump in done else None
            if pump in done and failure is None:
                await self._send(h11.EndOfMessage())  # the stream ended (the sidecar stops): end the body well
            elif failure is not None and not isinstance(failure, _Closed | ConnectionError):
                log.warning("%s stream to %s failed: %r", body.kind, self.client[0], failure)
        finally:
            self.admission.close_stream(body.kind)
        return False

    async def _pump(self, body: Stream) -> None:
        async with contextlib.aclosing(body.chunks()) as chunks:
            async for chunk in chunks:
                await self._send(h11.Data(data=chunk))

    async def _gone(self) -> None:
        """Returns when the client of a stream closes (or sends far more than such a client would)."""
        received = 0
        while received < LINGER_BYTES and (chunk := await self.reader.read(READ_SIZE)):
            received += len(chunk)

    async def _send(self, *events: h11.Event) -> None:
        """Write ``events``; a client that reads nothing for idle_timeout is dropped."""
        transport = self.writer.transport
        transport.write(b"".join(self.conn.send(e) or b"" for e in events))
        if transport.is_closing():
            raise ConnectionResetError("the client has gone")
        if not transport.get_write_buffer_size():
            return  # all went out: nothing to wait for (the common case, and the cheap one)
        try:
            async with asyncio.timeout(self.limits.idle_timeout):
                await self.writer.drain()
        except TimeoutError:
            self.admission.timed_out("write")
            raise _Closed from None

    async def _error(self, status: int, detail: str, *, retry: bool = False) -> None:
        body = _json(status, detail)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if retry:
            headers.append((b"retry-after", str(RETRY_AFTER).encode()))
        await self._send(h11.Response(status_code=status, reason=HTTPStatus(status).phrase.encode(),
                                      headers=_server(headers)), h11.Data(data=body), h11.EndOfMessage())


def _server(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(b"server", SERVER), (b"date", formatdate(usegmt=True).encode()), *headers]
