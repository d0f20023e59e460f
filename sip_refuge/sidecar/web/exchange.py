"""One connection of the sidecar's HTTP server (:mod:`.server`): its requests in turn, each read whole
within its deadlines, then answered through the app, or as a stream in the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING

import h11

from sip_refuge.sidecar.web import wsgi
from sip_refuge.sidecar.web.admission import Refusal
from sip_refuge.sidecar.web.stream import Stream

if TYPE_CHECKING:
    from sip_refuge.sidecar.web.server import HttpServer

log = logging.getLogger(__name__)

MAX_HEADER = 16 * 1024  # request line and headers; h11's own default
RETRY_AFTER = 5  # seconds, in every 503
READ_SIZE = 64 * 1024
LINGER_BYTES = 256 * 1024  # at most this much is read and dropped from a client being closed
SERVER = b"sip-refuge"


class Closed(Exception):
    """End this connection now (a deadline passed, already counted)."""


def json_error(status: int, detail: str) -> bytes:
    return json.dumps({"error": HTTPStatus(status).phrase, "detail": detail}).encode()


def raw(status: int, detail: str) -> bytes:
    """A whole answer written before (or instead of) reading a request: h11 only answers a parsed one."""
    body = json_error(status, detail)
    retry = f"Retry-After: {RETRY_AFTER}\r\n" if status == 503 else ""
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nServer: sip-refuge\r\n"
            f"Date: {formatdate(usegmt=True)}\r\n{retry}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode("latin-1") + body


class Exchange:
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
                await self.server.linger(self.reader, self.writer, raw(status, str(exc) or "bad request"))
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
                await self.server.linger(self.reader, self.writer, raw(408, detail))
            raise Closed from None
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
        await self.server.linger(self.reader, self.writer, raw(413, detail))

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
                               json_error(500, "the sidecar logged the details"))
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
            elif failure is not None and not isinstance(failure, Closed | ConnectionError):
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
            raise Closed from None

    async def _error(self, status: int, detail: str, *, retry: bool = False) -> None:
        body = json_error(status, detail)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if retry:
            headers.append((b"retry-after", str(RETRY_AFTER).encode()))
        await self._send(h11.Response(status_code=status, reason=HTTPStatus(status).phrase.encode(),
                                      headers=_server(headers)), h11.Data(data=body), h11.EndOfMessage())


def _server(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(b"server", SERVER), (b"date", formatdate(usegmt=True).encode()), *headers]
