"""sd_notify for the post's systemd unit (Type=notify, WatchdogSec): READY once, WATCHDOG from the loop.

If the runner's loop ever stops turning, the pings stop and systemd restarts the agent.
"""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    def __init__(self) -> None:
        path = os.environ.get("NOTIFY_SOCKET")
        self.address = ("\0" + path[1:]) if path and path.startswith("@") else path
        usec = os.environ.get("WATCHDOG_USEC")
        self.interval = int(usec) / 2e6 if usec and usec.isascii() and usec.isdigit() else None
        self._last = 0.0

    def send(self, message: str) -> None:
        if not self.address:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto(message.encode(), self.address)
            except OSError:
                pass  # systemd went away (shutdown): nothing to tell

    def ready(self) -> None:
        self.send("READY=1")

    def alive(self) -> None:
        """Called every loop turn; pings at half the watchdog interval."""
        if self.interval is None:
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self.send("WATCHDOG=1")
