"""``sip-refuge asterisk check`` against a real Asterisk: clean on the example site, loud on broken templates."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sip_refuge.pbx.render import TEMPLATES
from tests.integration.conftest import REPO

pytestmark = pytest.mark.integration


def run_check(site: Path, templates: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("SIP_REFUGE_TEMPLATES", None)
    if templates is not None:
        env["SIP_REFUGE_TEMPLATES"] = str(templates)
    return subprocess.run([sys.executable, "-m", "sip_refuge.cli", "asterisk", "check", str(site)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120, check=False)


def broken_copy(tmp_path: Path, name: str, anchor: str, insert: str) -> Path:
    """A copy of the shipped templates with ``insert`` added after the first line containing ``anchor``."""
    folder = tmp_path / "templates"
    shutil.copytree(TEMPLATES, folder)
    path = folder / name
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if anchor in line)
    lines.insert(at + 1, insert + "\n")
    path.write_text("".join(lines), encoding="utf-8")
    return folder


def test_check_passes_on_the_example_site() -> None:
    """`sip-refuge asterisk check config/site.example.yaml` loads cleanly into a real Asterisk and exits 0."""
    done = run_check(Path("config/site.example.yaml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok:" in done.stdout


def test_check_names_an_unknown_pjsip_option(tmp_path: Path) -> None:
    """A template with an option Asterisk does not know makes the check fail and name the option."""
    templates = broken_copy(tmp_path, "pjsip_refuge.conf.j2", "type=endpoint", "refuge_bogus_option=yes")
    done = run_check(Path("config/site.example.yaml"), templates)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "refuge_bogus_option" in done.stdout


def test_check_names_a_goto_into_a_missing_context(tmp_path: Path) -> None:
    """A template whose dialplan jumps into a context that does not exist makes the check fail and name it."""
    templates = broken_copy(tmp_path, "extensions_refuge.conf.j2", "[refuge-selftest]",
                            "exten => 7098,1,Goto(refuge-nowhere,s,1)")
    done = run_check(Path("config/site.example.yaml"), templates)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "missing context 'refuge-nowhere'" in done.stdout
