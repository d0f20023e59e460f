"""`sip-refuge pbx` keeps each site in its own work folder (issue 8, finding 15): two site files both called
site.yaml no longer overwrite each other's rendered config and secrets or share a control socket."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sip_refuge.config import Site
from sip_refuge.pbx.asterisk import cache_dir, find_asterisk, site_workdir
from tests.integration.conftest import REPO, write_site
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture()
def cache() -> Iterator[Path]:
    """A cache folder of our own (short: it holds the control sockets) that shares the built Asterisk root."""
    folder = Path(tempfile.mkdtemp(prefix="sr-cache-"))
    (folder / "asterisk-root").symlink_to(cache_dir() / "asterisk-root")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class PbxCommand:
    """One `sip-refuge pbx SITE` process, started the way a user does, stopped with SIGTERM."""

    def __init__(self, site: Path, cache: Path) -> None:
        self.out = open(site.parent / "pbx.out", "w+b")  # closed in stop()
        env = {**os.environ, "SIP_REFUGE_CACHE": str(cache)}
        self.process = subprocess.Popen([sys.executable, "-m", "sip_refuge.cli", "pbx", str(site)], cwd=REPO,
                                        env=env, stdout=self.out, stderr=subprocess.STDOUT)

    def text(self) -> str:
        self.out.seek(0)
        return self.out.read().decode("utf-8", "replace")

    def workdir(self) -> Path:
        """The work folder it announced, once Asterisk is up (it exits at once if Asterisk cannot start)."""
        found = wait_for(lambda: re.search(r"config and logs: (\S+)", self.text()) or self.process.poll() is not None,
                         90, "`config and logs:` line")
        assert isinstance(found, re.Match), self.text()
        return Path(found[1])

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        finally:
            self.out.close()


def cli(workdir: Path, command: str) -> str:
    """One command through the control socket of the Asterisk whose config is in ``workdir``."""
    argv = find_asterisk(build=False).argv("-C", str(workdir / "etc" / "asterisk.conf"), "-rx", command)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_two_sites_named_site_yaml_get_separate_work_folders(tmp_path: Path, cache: Path) -> None:
    """Two `sip-refuge pbx` runs of two site.yaml files keep their own config, secrets and control socket."""
    sites: list[Site] = [write_site(tmp_path / name) for name in ("north", "south")]
    assert sites[0].path.name == sites[1].path.name == "site.yaml"
    runs = [PbxCommand(site.path, cache) for site in sites]
    try:
        dirs = [run.workdir() for run in runs]
        assert dirs[0] != dirs[1]
        for site, folder in zip(sites, dirs, strict=True):
            assert folder == cache / "pbx" / site_workdir(site.path).name
            assert folder.name.startswith("site-")
            secrets_conf = (folder / "etc" / "pjsip_refuge_secrets.conf").read_text(encoding="utf-8")
            assert site.posts[0].secret.read() in secrets_conf  # each folder holds its own site's secrets ...
            other = sites[1] if site is sites[0] else sites[0]
            assert other.posts[0].secret.read() not in secrets_conf  # ... and not the other's
            # Each control socket reaches its own Asterisk: the one bound to this site's SIP port.
            transports = cli(folder, "pjsip show transports")
            assert f"127.0.0.1:{site.pbx.sip_port}" in transports, transports
            assert f"127.0.0.1:{other.pbx.sip_port}" not in transports
        assert all(run.process.poll() is None for run in runs)

        # The same site twice is refused: it would render over the running one's files.
        again = subprocess.run([sys.executable, "-m", "sip_refuge.cli", "pbx", str(sites[0].path)], cwd=REPO,
                               env={**os.environ, "SIP_REFUGE_CACHE": str(cache)}, capture_output=True, text=True,
                               timeout=60, check=False)
        assert again.returncode == 2, again.stdout + again.stderr
        assert "another `sip-refuge pbx` is running this site already" in again.stderr
        assert runs[0].process.poll() is None
    finally:
        statuses = [run.stop() for run in runs]
    assert statuses == [0, 0], [run.text() for run in runs]
