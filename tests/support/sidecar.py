"""Run the real ``sip-refuge sidecar SITE`` as a subprocess for integration tests and benchmarks.

The sidecar's stdout and stderr go to one log file that survives restarts (a SIGKILL and a fresh start
append to it), so a test can search everything the sidecar ever printed. Waits poll with a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import requests

from sip_refuge.config import load_site

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).with_name("sip-refuge")


def wait_until(probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll ``probe`` until it returns something truthy; fail after ``timeout`` seconds naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = probe()
        except requests.RequestException as exc:  # the sidecar is (re)starting: not an answer yet
            last = None
            error: Exception | None = exc
        else:
            error = None
        if last:
            return last  # type: ignore[no-any-return]
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s (last: {error or last!r})")
        time.sleep(interval)


class Sidecar:
    """``sip-refuge sidecar SITE`` on the port the site's ``sidecar.listen`` names. Use as a context manager."""

    def __init__(self, site_file: Path, url: str, *, log_file: Path | None = None, verbose: bool = False,
                 extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        self.site_file, self.url = site_file, url.rstrip("/")
        self.log_file = log_file or site_file.with_name("sidecar.log")
        self.verbose, self.extra_args = verbose, extra_args
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        # The tests read as the admin's automation does: with the site's bearer token (sidecar.token_file).
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {self.token()}"
        self.starts = 0

    def token(self) -> str:
        site = load_site(self.site_file, check_secrets=False)
        assert site.sidecar is not None
        return site.sidecar.token.read()

    # -- life cycle ---------------------------------------------------------------------------------
    def start(self, *, timeout: float = 30.0) -> Sidecar:
        """Start and wait until /healthz answers (AMI may still be connecting; see :meth:`wait_ami`)."""
        if self.running:
            raise RuntimeError("the sidecar is already running")
        argv = [str(CLI), *(["-v"] if self.verbose else []), "sidecar", str(self.site_file), *self.extra_args]
        with open(self.log_file, "ab") as out:
            out.write(f"==== start {self.starts + 1}: {' '.join(argv)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         cwd=REPO, env=self.env, start_new_session=True)
        self.starts += 1
        try:
            wait_until(self._answers, timeout, "answer from /healthz")
        except BaseException:
            self.kill()
            raise
        return self

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"the sidecar exited with status {self.proc.returncode}:\n{self.log_tail()}")
        return self.session.get(self.url + "/healthz", timeout=2).status_code in (200, 503)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (a clean stop) and wait; SIGKILL if it does not go. Returns the exit status."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, as when the machine loses power or the OOM killer strikes."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            proc.wait()

    def restart(self, *, timeout: float = 30.0) -> Sidecar:
        self.stop()
        return self.start(timeout=timeout)

    def close(self) -> None:
        self.stop()
        self.session.close()

    def __enter__(self) -> Sidecar:
        return self.start() if not self.running else self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- looking at it -------------------------------------------------------------------------------
    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.session.get(self.url + path, timeout=kwargs.pop("timeout", 15), **kwargs)

    def json(self, path: str) -> Any:
        resp = self.get(path)
        resp.raise_for_status()
        return resp.json()

    def health(self) -> dict[str, Any]:
        result: dict[str, Any] = self.get("/healthz").json()
        return result

    def wait_ami(self, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until /healthz says the sidecar is logged in to AMI."""
        return wait_until(lambda: (h := self.health())["ami"]["connected"] and h, timeout, "AMI connection")

    def posts(self) -> dict[str, dict[str, Any]]:
        return {p["id"]: p for p in self.json("/api/v1/posts")["posts"]}

    def incident(self, incident: str) -> dict[str, Any] | None:
        resp = self.get(f"/api/v1/incidents/{incident}")
        return resp.json() if resp.status_code == 200 else None  # type: ignore[no-any-return]

    def metrics(self) -> str:
        resp = self.get("/metrics")
        resp.raise_for_status()
        return resp.text

    def log(self) -> str:
        try:
            return self.log_file.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def events(self, *, timeout: float = 5.0) -> Iterator[tuple[str, dict[str, Any]]]:
        """Read /api/v1/events (server-sent events) as (type, body) pairs; stops when the stream does."""
        with self.session.get(self.url + "/api/v1/events", stream=True, timeout=timeout) as resp:
            kind = ""
            for line in resp.iter_lines(decode_unicode=True):
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    yield kind, json.loads(line[6:])
