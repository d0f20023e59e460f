"""`sip-refuge demo` as a newcomer meets it: started, pressed, watched in a browser, stopped with Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from sip_refuge.config import Site, load_site
from sip_refuge.demo.run import LOGIN_LINE, READY_LINE, busy, ports_of
from tests.support.browser import Browser, log_in

REPO = Path(__file__).resolve().parents[2]
DOCS_IMG = REPO / "docs" / "img"
START_TIMEOUT = 240.0  # a first run builds the Asterisk root folder
WAIT_MS = 30_000


class RunningDemo:
    def __init__(self, site_path: Path, log_dir: Path) -> None:
        self.site_path = site_path
        self.lines: list[str] = []
        self.ready = threading.Event()
        # Its own session, like a terminal's foreground job: SIGINT goes to the demo alone, as Ctrl-C would.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sip_refuge.cli", "demo", "--site", str(site_path), "--log-dir", str(log_dir)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=REPO)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if READY_LINE in line:
                self.ready.set()

    def output(self) -> str:
        return "\n".join(self.lines)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise
        finally:
            self.reader.join(10)  # the reader sees EOF once the demo has exited
            assert self.proc.stdout is not None
            self.proc.stdout.close()


@pytest.fixture()
def demo_site(tmp_path: Path) -> Path:
    """A copy of config/demo.yaml, so its secrets, database and logs stay in this test's folder."""
    (tmp_path / "config").mkdir()
    site = tmp_path / "config" / "demo.yaml"
    shutil.copy(REPO / "config" / "demo.yaml", site)
    return site


def get_json(url: str, token: str) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=5) as reply:
        return json.loads(reply.read())


def wait_for(what: str, probe: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = probe()
        except OSError:
            found = None
        if found:
            return found
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and int(pid) != os.getpid():
            found.append(f"{pid}: {cmdline}")
    return found


@pytest.fixture()
def demo(demo_site: Path, tmp_path: Path) -> Iterator[RunningDemo]:
    running = RunningDemo(demo_site, tmp_path / "logs")
    try:
        if not running.ready.wait(START_TIMEOUT):
            raise AssertionError(f"the demo did not get ready:\n{running.output()}")
        yield running
    finally:
        if running.proc.poll() is None:
            running.stop()


@pytest.mark.integration
def test_demo_runs_a_call_end_to_end_and_stops_cleanly(demo: RunningDemo, demo_site: Path, tmp_path: Path) -> None:
    """The demo gets ready, a press reaches an answering desk, both pages show it, and Ctrl-C leaves nothing."""
    site: Site = load_site(demo_site)
    assert site.sidecar is not None
    base = f"http://127.0.0.1:{site.sidecar.port}"
    post = site.posts[0]
    assert f"{base}/operator?desk=desk-1" in demo.output()
    # The pages need a login: the demo prints its operator's password, new each run.
    found = re.search(rf"{LOGIN_LINE} +name (\S+), password (\S+) ", demo.output())
    assert found is not None, demo.output()
    token = site.sidecar.token.read()

    with Browser(tmp_path / "chromium") as browser:
        operator = browser.page()
        log_in(operator, f"{base}/operator?desk=desk-1", found.group(1), found.group(2))
        dashboard = browser.page()
        dashboard.goto(f"{base}/")

        pressed = subprocess.run([sys.executable, "-m", "sip_refuge.cli", "press", str(demo_site), "--post", post.id],
                                 capture_output=True, text=True, check=False, cwd=REPO)
        assert pressed.returncode == 0, pressed.stderr

        def answered() -> dict[str, Any] | None:
            incidents = get_json(f"{base}/api/v1/incidents", token)["incidents"]
            return next((i for i in incidents if i["post_id"] == post.id and i["answered_by"] == "desk-1"), None)

        incident = wait_for("the incident to be answered", answered, 60)
        kinds = [t["kind"] for t in incident["timeline"]]
        assert kinds[:1] == ["queued"] and "answered" in kinds

        # The operator page popped the post's camera (a real frame from the test camera) and names the desk.
        expect(operator.locator("body")).to_contain_text(post.name, timeout=WAIT_MS)
        operator.wait_for_function("() => [...document.images].some(i => i.src.includes('live.mjpeg')"
                                   " && i.complete && i.naturalWidth > 0)", timeout=WAIT_MS)
        expect(operator.locator("body")).to_contain_text("answered", ignore_case=True, timeout=WAIT_MS)
        # The dashboard shows the call live and the post's camera thumbnail.
        expect(dashboard.locator("#calls")).to_contain_text(post.name, timeout=WAIT_MS)
        dashboard.wait_for_function(
            "id => { const i = document.querySelector(`#post-${id} .thumb img`); return i && i.naturalWidth > 0; }",
            arg=post.id, timeout=WAIT_MS)
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        operator.screenshot(path=DOCS_IMG / "demo-operator.png")
        dashboard.screenshot(path=DOCS_IMG / "demo-dashboard.png")
        assert browser.errors == []

    status = subprocess.run([sys.executable, "-m", "sip_refuge.cli", "status", str(demo_site), "--post", post.id],
                            capture_output=True, text=True, check=False, cwd=REPO)
    assert status.returncode == 0 and json.loads(status.stdout)["state"] in ("connected", "idle")
    assert re.search(r"\[cctv\] call\.queued: " + re.escape(post.name), demo.output()), demo.output()

    assert demo.stop() == 0, demo.output()
    assert "nothing left running" in demo.output()
    left = [f"{what} {kind}/{port}" for kind, port, what in ports_of(site) if busy(kind, port)]
    assert left == [], left
    assert processes_mentioning(str(tmp_path)) == []
