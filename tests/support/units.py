"""Read a systemd unit file the way systemd does, as far as the tests need, and play systemd's part.

``systemd-analyze verify`` checks the syntax (tests/unit/test_units.py); :class:`Unit` reads the values
(keys, %i and ${VAR} in ExecStart), and :func:`start_unit` starts a unit's ``ExecStart`` in the emulated Pi
as the user, in the folder, with the environment, state folder and sd_notify socket systemd would give it
(there is no running systemd in a chroot).
"""

from __future__ import annotations

import os
import queue
import re
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.pi_root import PiRoot

_VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)")


@dataclass(frozen=True)
class Unit:
    sections: dict[str, list[tuple[str, str]]]

    @classmethod
    def parse(cls, text: str) -> Unit:
        sections: dict[str, list[tuple[str, str]]] = {}
        current: list[tuple[str, str]] | None = None
        pending = ""
        for raw in text.splitlines():
            line = pending + raw.strip()
            pending = ""
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            if not line or line[0] in "#;":
                continue
            if line.startswith("[") and line.endswith("]"):
                current = sections.setdefault(line[1:-1], [])
                continue
            key, sep, value = line.partition("=")
            if current is None or not sep:
                raise ValueError(f"not a unit file line: {raw!r}")
            current.append((key.strip(), value.strip()))
        return cls(sections)

    @classmethod
    def read(cls, path: Path) -> Unit:
        return cls.parse(path.read_text(encoding="utf-8"))

    def all(self, section: str, key: str) -> list[str]:
        return [v for k, v in self.sections.get(section, []) if k == key]

    def get(self, section: str, key: str) -> str | None:
        values = self.all(section, key)
        return values[-1] if values else None

    def service(self, key: str) -> str | None:
        return self.get("Service", key)

    def environment(self, env_files: dict[str, str]) -> dict[str, str]:
        """Environment= assignments, then each EnvironmentFile= (given as path -> text; '-' = optional)."""
        env: dict[str, str] = {}
        for value in self.all("Service", "Environment"):
            for word in shlex.split(value):
                name, _, val = word.partition("=")
                env[name] = val
        for value in self.all("Service", "EnvironmentFile"):
            path = value.removeprefix("-")
            if path not in env_files:
                if value.startswith("-"):
                    continue
                raise FileNotFoundError(f"EnvironmentFile {path} is missing")
            for line in env_files[path].splitlines():
                line = line.strip()
                if line and not line.startswith(("#", ";")):
                    name, _, val = line.partition("=")
                    env[name.strip()] = val.strip().strip("\"'")
        return env

    def exec_start(self, instance: str, env: dict[str, str]) -> list[str]:
        """ExecStart as argv: %i is the instance, ${VAR} one word, $VAR split on white space (systemd.service(5))."""
        line = self.service("ExecStart")
        if line is None:
            raise ValueError("no ExecStart")
        argv: list[str] = []
        for word in shlex.split(line.lstrip("-@:+!").replace("%i", instance)):
            whole = re.fullmatch(r"\$(\w+)", word)
            if whole:
                argv.extend(env.get(whole.group(1), "").split())
                continue
            argv.append(_VAR.sub(lambda m: env.get(m.group(1) or m.group(2), ""), word))
        return argv


class NotifySocket:
    """The sd_notify socket systemd gives a Type=notify unit: an abstract datagram socket (a chroot shares the
    network namespace, so an agent inside reaches it), collecting every message."""

    def __init__(self) -> None:
        self.name = f"sip-refuge-test-notify-{os.getpid()}-{time.monotonic_ns()}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name)
        self.messages: queue.Queue[str] = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            self.messages.put(data.decode(errors="replace"))

    def wait(self, message: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if message in self.messages.get(timeout=max(0.0, deadline - time.monotonic())).split("\n"):
                    return
            except queue.Empty:
                raise AssertionError(f"no {message} on the notify socket within {timeout} s") from None

    def close(self) -> None:
        self.sock.close()


def start_unit(root: PiRoot, unit: Unit, instance: str, extra: Sequence[str], *, log: Path,
               notify: NotifySocket, without: Sequence[str] = ()) -> subprocess.Popen[bytes]:
    """What systemd does on ``systemctl start`` of the unit (instance ``instance``), as far as the process can
    tell: StateDirectory made and owned, Environment and EnvironmentFile, ExecStart (+ ``extra``, less the
    options in ``without`` with their values) as User with Group and SupplementaryGroups in WorkingDirectory,
    NOTIFY_SOCKET and WATCHDOG_USEC."""
    user, group = unit.service("User") or "root", unit.service("Group") or "root"
    state = f"/var/lib/{unit.service('StateDirectory')}"
    root.run(["install", "-d", "-o", user, "-g", group, "-m", unit.service("StateDirectoryMode") or "0755", state])
    files = {}
    for entry in unit.all("Service", "EnvironmentFile"):
        path = root.host_path(entry.removeprefix("-"))
        if path.is_file():
            files[entry.removeprefix("-")] = path.read_text()
    env = unit.environment(files)
    argv = unit.exec_start(instance, env)
    for option in without:
        assert option in argv, f"{option} is not in the unit's ExecStart: {argv}"
        del argv[argv.index(option):argv.index(option) + 2]
    argv += extra
    watchdog = unit.service("WatchdogSec") or "30"
    env.update(NOTIFY_SOCKET="@" + notify.name, WATCHDOG_USEC=str(int(watchdog) * 1_000_000),
               STATE_DIRECTORY=state, PYTHONUNBUFFERED="1")
    groups = [group, *(unit.service("SupplementaryGroups") or "").split()]
    return root.popen(argv, log=log, user=user, groups=groups, cwd=unit.service("WorkingDirectory") or "/", env=env)
