"""What crosses the loopback interface: a packet capture on ``lo`` with a Linux ``AF_PACKET`` socket.

No tcpdump or tshark: the kernel hands every frame on ``lo`` to the socket, and this module reads the IPv4
TCP and UDP ones. It needs root (or CAP_NET_RAW), as the tests have here and in CI; anywhere else it fails
and says so. Each packet on ``lo`` is seen twice, leaving and arriving: only the arriving copy is kept.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

T = TypeVar("T")
ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
PACKET_OUTGOING = 4  # linux/if_packet.h: the copy of a packet this host sent
SOL_PACKET, PACKET_STATISTICS = 263, 6
SO_RCVBUFFORCE = 33
BUFFER = 64 * 1024 * 1024  # other tests share lo: never drop ours while the test thread is busy


@dataclass(frozen=True)
class Packet:
    """One TCP segment or UDP datagram on loopback."""

    proto: str  # tcp | udp
    src: tuple[str, int]
    dst: tuple[str, int]
    payload: bytes
    at: float  # time.monotonic() when read
    seq: int = 0  # TCP sequence number

    def between(self, a: int, b: int) -> bool:
        """Whether the packet goes from port ``a`` to port ``b`` or back."""
        return {self.src[1], self.dst[1]} == {a, b}

    def ports(self) -> tuple[int, int]:
        return self.src[1], self.dst[1]


def parse(frame: bytes, at: float) -> Packet | None:
    """A packet from an Ethernet frame as ``lo`` gives it (zero MAC addresses), or None if not IPv4 TCP/UDP."""
    if len(frame) < 34 or struct.unpack("!H", frame[12:14])[0] != ETH_P_IP:
        return None
    ip = frame[14:]
    header = (ip[0] & 0x0F) * 4
    total = struct.unpack("!H", ip[2:4])[0]
    proto = ip[9]
    src, dst = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
    body = ip[header:total]
    if proto == socket.IPPROTO_UDP and len(body) >= 8:
        sport, dport = struct.unpack("!HH", body[:4])
        return Packet("udp", (src, sport), (dst, dport), body[8:], at)
    if proto == socket.IPPROTO_TCP and len(body) >= 20:
        sport, dport, seq = struct.unpack("!HHI", body[:8])
        offset = (body[12] >> 4) * 4
        return Packet("tcp", (src, sport), (dst, dport), body[offset:], at, seq)
    return None


class LoopbackCapture:
    """Captures, from :meth:`start` to :meth:`stop`, the packets on ``lo`` that ``keep`` accepts."""

    def __init__(self, keep: Callable[[Packet], bool]) -> None:
        self.keep = keep
        self.packets: list[Packet] = []
        self._cond = threading.Condition()
        self._wake_r, self._wake_w = socket.socketpair()
        try:
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        except PermissionError:
            raise RuntimeError("capturing on lo needs root or CAP_NET_RAW: run the tests as root, as CI does") from None
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, BUFFER)
        except PermissionError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
        self.sock.bind(("lo", 0))
        self.sock.setblocking(False)
        self._thread = threading.Thread(target=self._run, name="capture-lo", daemon=True)

    def start(self) -> LoopbackCapture:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._wake_w.send(b"x")
        self._thread.join(10)
        for sock in (self.sock, self._wake_r, self._wake_w):
            sock.close()

    def __enter__(self) -> LoopbackCapture:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def drops(self) -> int:
        """Packets the kernel dropped because this socket's buffer was full (since the last call)."""
        _, dropped = struct.unpack("II", self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
        return int(dropped)

    def snapshot(self) -> list[Packet]:
        with self._cond:
            return list(self.packets)

    def wait_for(self, probe: Callable[[list[Packet]], T | None], timeout: float, what: str) -> T:
        """Wait until ``probe(packets so far)`` gives something; a deadline, never a fixed sleep."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = probe(self.packets)
                if value is not None and value is not False:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"capture: no {what} within {timeout} s")
                self._cond.wait(left)

    def _run(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self.sock, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while True:
                for key, _ in sel.select():
                    if key.fileobj is self._wake_r:
                        self._drain()
                        return
                self._drain()

    def _drain(self) -> None:
        kept: list[Packet] = []
        while True:
            try:
                frame, address = self.sock.recvfrom(65536)
            except (BlockingIOError, OSError):
                break
            if address[2] == PACKET_OUTGOING:
                continue
            packet = parse(frame, time.monotonic())
            if packet is not None and self.keep(packet):
                kept.append(packet)
        if kept:
            with self._cond:
                self.packets.extend(kept)
                self._cond.notify_all()
