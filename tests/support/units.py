"""Read a systemd unit file the way systemd does, as far as the tests need: keys, %i and ${VAR} in ExecStart.

``systemd-analyze verify`` checks the syntax (tests/unit/test_units.py); this reads the values, so the
emulated Pi can start the post's ``ExecStart`` as the user, in the folder and with the environment that
systemd would give it (there is no running systemd in a chroot).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

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
