"""Raw HTTP clients for the capacity and attack tests and the capacity bench: sockets from any loopback address.

Linux answers on all of 127.0.0.0/8, so a client bound to 127.0.0.2 reaches a server on 127.0.0.1 as a
different host would: the server sees 127.0.0.2 as its address. :class:`Streams` holds hundreds of event
streams and live views open, read by one selector thread that counts what each receives.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.waiting import wait_for


def connect(port: int, source: str, *, host: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    """A TCP connection to ``host:port`` from the loopback address ``source``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect((host, port))
    return sock


def head(method: str, path: str, *, host: str = "sidecar", headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def read_answer(sock: socket.socket, *, timeout: float = 15.0) -> Answer | None:
    """One response with a Content-Length (or ended by close); None if the server closed without one."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    top, _, rest = data.partition(b"\r\n\r\n")
    status_line, *lines = top.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    length = int(headers.get("content-length", "-1"))
    while length < 0 or len(rest) < length:
        try:
            chunk = sock.recv(65536)
        except (ConnectionError, TimeoutError):
            break
        if not chunk:
            break
        rest += chunk
    return Answer(int(status_line.split()[1]), headers, rest[:length] if length >= 0 else rest)


def closed_by_server(sock: socket.socket, *, timeout: float) -> bytes | None:
    """What the server sent before closing (b"" for nothing), or None if it kept the connection open."""
    sock.settimeout(timeout)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return received


def process_status(pid: int) -> dict[str, int]:
    """Threads and memory of a process (VmRSS, VmHWM in KiB) from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"threads": int(fields["Threads"]), "rss_kib": int(fields["VmRSS"].split()[0]),
            "hwm_kib": int(fields["VmHWM"].split()[0])}


MJPEG_PART = b"--frame\r\n"


@dataclass
class _Open:
    sock: socket.socket
    path: str
    status: int = 0
    head: bytes = b""  # until the status line and headers are in
    tail: bytes = b""  # the unfinished end of the last read: a marker may straddle two reads
    bytes_total: int = 0
    parts: int = 0  # MJPEG parts
    ended: bool = False
    seen: list[str] = field(default_factory=list)  # SSE event types, in order
    comments: int = 0  # SSE comment lines (keep-alives)

    def count(self, chunk: bytes) -> None:
        self.bytes_total += len(chunk)
        if not self.status:
            self.head += chunk
            if b"\r\n\r\n" not in self.head:
                return
            top, _, chunk = self.head.partition(b"\r\n\r\n")
            self.status = int(top.split(b" ", 2)[1])
        data = self.tail + chunk
        if self.path.endswith(".mjpeg"):
            self.parts += data.count(MJPEG_PART)
            self.tail = data[-(len(MJPEG_PART) - 1):]
        else:
            *lines, self.tail = data.split(b"\n")
            self.seen += [line[7:].decode() for line in lines if line.startswith(b"event: ")]
            self.comments += sum(1 for line in lines if line.startswith(b":"))


class Streams:
    """Event streams and live views held open from given source addresses and read by one thread."""

    def __init__(self, port: int, headers: dict[str, str] | None = None) -> None:
        """``headers`` go with every request (the bearer token: streams and live views need a login or it)."""
        self.port, self.headers = port, headers
        self.selector = selectors.DefaultSelector()
        self.streams: list[_Open] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="streams-reader", daemon=True)
        self._thread.start()

    def open(self, path: str, count: int, sources: list[str]) -> list[_Open]:
        """``count`` GETs of ``path``, spread over ``sources`` in turn."""
        opened = []
        for i in range(count):
            sock = connect(self.port, sources[i % len(sources)])
            sock.sendall(head("GET", path, headers=self.headers))
            sock.setblocking(False)
            stream = _Open(sock, path)
            with self._lock:
                self.streams.append(stream)
                self.selector.register(sock, selectors.EVENT_READ, stream)
            opened.append(stream)
        return opened

    def _read(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                ready = self.selector.select(timeout=0.1) if self.selector.get_map() else []
            if not ready:
                time.sleep(0.01)
                continue
            for key, _ in ready:
                stream: _Open = key.data
                try:
                    chunk = stream.sock.recv(262144)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    chunk = b""
                with self._lock:
                    if not chunk:
                        stream.ended = True
                        self.selector.unregister(stream.sock)
                        continue
                    stream.count(chunk)

    def snapshot(self) -> list[_Open]:
        with self._lock:
            return [_Open(s.sock, s.path, s.status, b"", b"", s.bytes_total, s.parts, s.ended, list(s.seen),
                          s.comments) for s in self.streams]

    def wait(self, what: str, test: Callable[[_Open], bool], timeout: float) -> list[_Open]:
        """Wait until ``test(stream)`` holds for every stream (``what`` names it in the failure)."""

        failing: list[_Open] = []

        def every() -> list[_Open] | None:
            streams = self.snapshot()
            failing[:] = [s for s in streams if not test(s)]
            return streams if not failing else None

        try:
            return wait_for(every, timeout, what, 0.1)
        except AssertionError:
            shown = [(s.path, s.status, s.bytes_total, s.parts, len(s.seen), s.ended) for s in failing[:5]]
            raise AssertionError(f"no {what} within {timeout} s: {len(failing)} streams not there, such as "
                                 f"(path, status, bytes, parts, events, ended) {shown}") from None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with self._lock:
            for stream in self.streams:
                if not stream.ended:
                    self.selector.unregister(stream.sock)
                stream.sock.close()
            self.streams.clear()
        self.selector.close()

    def __enter__(self) -> Streams:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
