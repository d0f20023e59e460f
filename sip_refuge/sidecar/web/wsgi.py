"""The Flask app (any WSGI app) behind the sidecar's asyncio server: the environ of a request, and the call.

The server reads each request completely (headers within a deadline, a body of at most ``MAX_BODY``) before
it takes a request thread, so the app never waits for a slow client. The answer is collected in the thread
too and the loop writes it out, so a slow reader holds no thread either. Only a :class:`Stream` body comes
back unread: the loop runs it.
"""

from __future__ import annotations

import asyncio
import io
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import unquote_to_bytes, urlsplit

import h11

from sip_refuge.sidecar.web.stream import Stream

log = logging.getLogger(__name__)

T = TypeVar("T")
WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
# Framing is h11's business (the server sets Content-Length itself, but for HEAD).
_HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding"}


@dataclass
class Reply:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes | Stream


def split_target(target: bytes) -> tuple[bytes, bytes]:
    """(path, query) of a request target, also of the absolute form ``http://host/path?query``."""
    if not target.startswith(b"/"):
        parts = urlsplit(target)
        return parts.path or b"/", parts.query
    path, _, query = target.partition(b"?")
    return path, query


def environ(request: h11.Request, body: bytes, *, client: tuple[str, int], server: tuple[str, int]) -> dict[str, Any]:
    """PEP 3333's environ for a fully read request (``body`` is all of it, de-chunked)."""
    path, query = split_target(request.target)
    env: dict[str, Any] = {
        "REQUEST_METHOD": request.method.decode("ascii"),
        "SCRIPT_NAME": "",
        "PATH_INFO": unquote_to_bytes(path).decode("latin-1"),
        "QUERY_STRING": query.decode("latin-1"),
        "SERVER_NAME": server[0],
        "SERVER_PORT": str(server[1]),
        "SERVER_PROTOCOL": "HTTP/" + request.http_version.decode("ascii"),
        "REMOTE_ADDR": client[0],
        "REMOTE_PORT": str(client[1]),
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.input_terminated": True,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    for raw_name, raw_value in request.headers:
        if b"_" in raw_name:
            continue  # "X_Token" would pose as "X-Token" once both are HTTP_X_TOKEN: drop it, as waitress does
        name, value = raw_name.decode("latin-1").upper().replace("-", "_"), raw_value.decode("latin-1")
        if name in ("CONTENT_LENGTH", "TRANSFER_ENCODING"):
            continue  # the body is already read whole: CONTENT_LENGTH above is its length
        key = name if name == "CONTENT_TYPE" else "HTTP_" + name
        env[key] = f"{env[key]}{'; ' if name == 'COOKIE' else ','}{value}" if key in env else value
    return env


def call(app: WsgiApp, env: dict[str, Any]) -> Reply:
    """Run the app (in a request thread) and collect its answer; a :class:`Stream` body is returned unread."""
    started: list[Any] = []
    written: list[bytes] = []

    def start_response(status: str, headers: list[tuple[str, str]],
                       exc_info: ExcInfo | None = None) -> Callable[[bytes], None]:
        if exc_info is not None and started:
            raise exc_info[1].with_traceback(exc_info[2])
        started[:] = [status, headers]
        return written.append  # WSGI's legacy write()

    result = app(env, start_response)
    if isinstance(result, Stream):
        body: bytes | Stream = result
    else:
        try:
            body = b"".join([*written, *result])
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
    if not started:
        raise RuntimeError("the WSGI app returned without calling start_response")
    status, headers = started
    code, _, reason = status.partition(" ")
    return Reply(int(code), reason.encode("latin-1"),
                 [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers
                  if k.lower().encode("latin-1") not in _HOP_BY_HOP], body)


class Workers:
    """A fixed set of request threads that run calls for the event loop (:meth:`run` awaits one).

    Not a ThreadPoolExecutor: its shutdown cannot give up on a thread stuck in the app, and a stopping
    sidecar must not hang on one.
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for number in range(1, self.count + 1):
            thread = threading.Thread(target=self._work, name=f"http-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put(_Job(fn, args, future, loop))
        return await future

    def stop(self, timeout: float) -> None:
        """Let the threads finish their call and end; give up on any still busy after ``timeout``."""
        for _ in self._threads:
            self._jobs.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in self._threads if t.is_alive()]
        if stuck:
            log.warning("request threads still busy in the app at stop: %s", ", ".join(stuck))
        self._threads.clear()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                outcome: tuple[bool, Any] = (True, job.fn(*job.args))
            except BaseException as exc:  # noqa: BLE001 - thread boundary: the awaiting request gets it
                outcome = (False, exc)
            try:
                job.loop.call_soon_threadsafe(_settle, job.future, outcome)
            except RuntimeError:  # the loop is gone (stopped under a slow request): nobody waits for it
                pass


@dataclass
class _Job:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


def _settle(future: asyncio.Future[Any], outcome: tuple[bool, Any]) -> None:
    if future.cancelled():
        return  # the connection went away (or the server stops) while the app worked
    ok, value = outcome
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)
