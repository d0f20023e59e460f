"""Import boundaries between the packages: reading a site never loads the sidecar or the post agent, and the
sidecar never loads the post agent. Each check runs in a fresh interpreter, so nothing another test imported
can hide a wrong import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sip_refuge.config import load_site
from tests.support.sites import example_copy

EVERY_KIND = """  - {type: milestone, name: xprotect, host: 10.0.0.9, template: '{type} {reference}'}
  - {type: nx, name: nx, url: 'https://10.0.0.8:7001', username: admin, password_file: secrets/nx.secret}
  - {type: vlc, name: wall, url: 'http://10.0.0.7:8080', password_file: secrets/nx.secret}
  - type: operator
"""


@pytest.fixture(scope="module")
def site_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example site with a target of every kind (and the deprecated one)."""
    path = example_copy(tmp_path_factory.mktemp("site"), lambda text: text.replace(
        "# The operator page (/operator?desk=ID)", EVERY_KIND + "# The operator page", 1))
    secret = path.parent / "secrets" / "nx.secret"
    secret.write_text("nx-admin-password-1\n")
    secret.chmod(0o600)
    assert {t.type for t in load_site(path).cctv} == {"webhook", "milestone", "nx", "vlc"}
    return path


def loaded_after(code: str) -> list[str]:
    """The sip_refuge modules a fresh interpreter has loaded after running ``code``."""
    probe = code + "\nimport sys, json; print(json.dumps(sorted(m for m in sys.modules if m.startswith('sip_refuge'))))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    modules: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return modules


def under(modules: list[str], package: str) -> list[str]:
    return [m for m in modules if m == package or m.startswith(package + ".")]


def test_reading_a_site_with_every_target_kind_loads_neither_the_sidecar_nor_the_post(site_file: Path) -> None:
    modules = loaded_after(f"from sip_refuge.config import load_site; load_site({str(site_file)!r})")
    assert "sip_refuge.config.cctv.nx" in modules  # the kinds' readers did run
    assert under(modules, "sip_refuge.sidecar") == [] and under(modules, "sip_refuge.post") == []


def test_the_whole_sidecar_loads_no_part_of_the_post_agent(site_file: Path) -> None:
    code = ("import sip_refuge.sidecar.runner, sip_refuge.sidecar.web.api, sip_refuge.sidecar.web.pages\n"
            "from sip_refuge.sidecar.targets import make_target\n"
            "from sip_refuge.config import load_site\n"
            f"site = load_site({str(site_file)!r})\n"
            "[make_target(t) for t in site.cctv]\n"
            "from sip_refuge.sidecar.store import Store\n"
            "from sip_refuge.sidecar.outbox import Outbox\n"
            "from sip_refuge.sidecar.core import Hub\n"
            "from sip_refuge.sidecar.web import create_app\n"
            "store = Store(':memory:')\n"
            "app = create_app(Hub(site, store, Outbox(store, []), base_url='http://x'), token='t' * 32)\n"
            "app.test_client().get('/')\n")
    modules = loaded_after(code)
    assert "sip_refuge.control" in modules  # the press route's client of the agent's control socket
    assert under(modules, "sip_refuge.post") == []
