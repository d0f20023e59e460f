"""The shipped systemd units: systemd's own checker finds nothing, and they run the post and the sidecar where
they can write (the emulated Pi in tests/integration/test_pi_post.py starts the post's ExecStart for real)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.units import Unit

REPO = Path(__file__).resolve().parents[2]
POST_UNIT = REPO / "config" / "sip-refuge-post@.service"
SIDECAR_UNIT = REPO / "config" / "sip-refuge-sidecar.service"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")


def verify(tmp_path: Path, units: dict[str, str]) -> str:
    """``systemd-analyze verify`` of ``units`` (name -> text) in a root folder holding them, the host's own
    system units (sysinit.target & co.) and an executable at every ExecStart path; its whole output."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: apt-get install -y systemd (make deps)"
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    for name, text in units.items():
        (root / "etc/systemd/system" / name).write_text(text, encoding="utf-8")
        program = root / Unit.parse(text).exec_start("x", {})[0].lstrip("/")
        program.parent.mkdir(parents=True, exist_ok=True)
        program.write_text("#!/bin/sh\n")
        program.chmod(0o755)
    done = subprocess.run([analyze, "verify", "--man=no", f"--root={root}", *units], capture_output=True, text=True,
                          timeout=60, check=False)
    return f"exit {done.returncode}\n{done.stdout}{done.stderr}".strip()


def test_systemd_finds_nothing_to_say_about_either_unit(tmp_path: Path) -> None:
    units = {"sip-refuge-post@sutton-market.service": POST_UNIT.read_text(encoding="utf-8"),
             "sip-refuge-sidecar.service": SIDECAR_UNIT.read_text(encoding="utf-8")}
    assert verify(tmp_path, units) == "exit 0"


@pytest.mark.parametrize("mistake", ["WorkingDirectry=/var/lib/sip-refuge", "Restart=sometimes"])
def test_the_check_reports_a_wrong_key_or_value(tmp_path: Path, mistake: str) -> None:
    text = SIDECAR_UNIT.read_text(encoding="utf-8").replace("[Service]\n", f"[Service]\n{mistake}\n")
    said = verify(tmp_path, {"sip-refuge-sidecar.service": text})
    assert mistake.partition("=")[0] in said or mistake.partition("=")[2] in said, said


def test_the_post_runs_in_its_state_folder_with_audio_and_its_own_id() -> None:
    unit = Unit.read(POST_UNIT)
    state = f"/var/lib/{unit.service('StateDirectory')}"
    assert unit.service("WorkingDirectory") == state  # lgpio's .lgd-nfy* FIFOs go where the service may write
    assert unit.service("ProtectSystem") == "strict"
    env = unit.environment({"/etc/sip-refuge/post.env": "SIP_REFUGE_AUDIO=plughw:CARD=Device,DEV=0\n"})
    argv = unit.exec_start("sutton-market", env)
    assert argv[:3] == ["/opt/sip-refuge/venv/bin/sip-refuge", "post", "/etc/sip-refuge/site.yaml"]
    assert argv[argv.index("--post") + 1] == "sutton-market"
    assert argv[argv.index("--audio") + 1] == "plughw:CARD=Device,DEV=0"
    assert argv[argv.index("--state-dir") + 1] == state
    assert unit.exec_start("x", unit.environment({}))[argv.index("--audio") + 1] == "default"
    assert unit.service("Type") == "notify" and unit.service("WatchdogSec")
    assert set((unit.service("SupplementaryGroups") or "").split()) == {"gpio", "audio"}


def test_the_sidecar_runs_in_its_own_state_folder() -> None:
    unit = Unit.read(SIDECAR_UNIT)
    state = f"/var/lib/{unit.service('StateDirectory')}"
    assert unit.service("WorkingDirectory") == state
    assert unit.exec_start("", {}) == ["/opt/sip-refuge/venv/bin/sip-refuge", "sidecar", "/etc/sip-refuge/site.yaml"]
    assert f"database: {state}/" in SIDECAR_UNIT.read_text(encoding="utf-8")  # where the admin is told to put it
