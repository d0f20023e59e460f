"""sip-refuge installed from its wheel (not editable) into fresh virtualenvs, run from a folder far from the source.

The wheel is built once with ``pip wheel --no-deps`` from a copy of this checkout. Each install is a fresh venv, and every
command runs with its working folder in a temporary directory and nothing of the checkout on ``sys.path``, so
templates, pages and prompts can only come from the installed package. The base install, ``[post]``
and ``[post,sidecar]`` are each checked for what they hold and what they run: Asterisk's config rendered
and loaded, the sidecar's pages, and a post registering to a real Asterisk 22.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from email.parser import HeaderParser
from pathlib import Path

import pytest
import requests

from sip_refuge.config import Site
from sip_refuge.pbx.asterisk import Asterisk
from tests.support.checkout import copy_checkout
from tests.support.sites import POSTS, agent_site
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
POST = POSTS["pyvoip"]  # pure Python: the one backend every [post] install has
# What a post must not carry (issue 9): the control room's packages.
CONTROL_ROOM_ONLY = ("opencv-python-headless", "flask", "h11", "panoramisk", "standardwebhooks", "requests",
                     "prometheus_client")


class Venv:
    """A fresh virtualenv with the wheel installed; :meth:`run` runs its console script from ``cwd``."""

    def __init__(self, path: Path, cwd: Path) -> None:
        self.path, self.cwd = path, cwd
        self.bin = path / "bin"

    @classmethod
    def create(cls, where: Path, requirement: str) -> Venv:
        subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, timeout=120)
        cwd = where.parent / f"{where.name}-cwd"
        cwd.mkdir()
        venv = cls(where, cwd)
        venv.pip("install", "-q", requirement)
        return venv

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "SIP_REFUGE_TEMPLATES")}
        env["PATH"] = f"{self.bin}:{env.get('PATH', '')}"
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def pip(self, *args: str) -> str:
        done = subprocess.run([str(self.bin / "pip"), *args], cwd=self.cwd, env=self.env(), capture_output=True,
                              text=True, timeout=600, check=False)
        assert done.returncode == 0, f"pip {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def installed(self) -> set[str]:
        return {d["name"].lower() for d in json.loads(self.pip("list", "--format=json"))}

    def run(self, *args: str, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
        env = {**self.env(), "COLUMNS": "2000"}  # --help on one line per option
        return subprocess.run([str(self.bin / "sip-refuge"), *args], cwd=self.cwd, env=env,
                              capture_output=True, text=True, timeout=timeout, check=False)

    def start(self, log: Path, *args: str) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            return subprocess.Popen([str(self.bin / "sip-refuge"), *args], cwd=self.cwd, env=self.env(),
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def package_dir(self) -> Path:
        done = subprocess.run([str(self.bin / "python"), "-c", "import sip_refuge; print(sip_refuge.__file__)"],
                              cwd=self.cwd, env=self.env(), capture_output=True, text=True, timeout=60, check=True)
        return Path(done.stdout.strip()).parent


def stop(proc: subprocess.Popen[bytes], log: Path) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"{proc.args} ignored SIGTERM:\n{log.read_text(errors='replace')[-3000:]}") from None


# ----------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip wheel --no-deps`` of a copy of the checkout (no stale build/ or egg-info can slip in)."""
    source = copy_checkout(tmp_path_factory.mktemp("source"))
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", str(out),
                           str(source)], cwd=out, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    (built,) = out.glob("sip_refuge-*.whl")
    return built


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    return agent_site(tmp_path_factory.mktemp("wheel-site"))


@pytest.fixture(scope="module")
def pbx(site: Site) -> Iterator[Asterisk]:
    with Asterisk(site, command="pytest tests/integration/test_wheel_install.py", boot_timeout=60) as asterisk:
        yield asterisk


@pytest.fixture(scope="module")
def full(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    return Venv.create(tmp_path_factory.mktemp("full") / "venv", f"{wheel}[post,sidecar]")


# ----------------------------------------------------------------------------------------------- tests

def test_the_wheel_holds_every_template_page_and_prompt(wheel: Path) -> None:
    """The wheel holds every Asterisk template, web template, static file and prompt of the checkout."""
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"sip_refuge/pbx/templates/{p.name}" for p in (REPO / "asterisk" / "templates").glob("*.j2")}
    web = REPO / "sip_refuge" / "sidecar" / "web"
    expected |= {f"sip_refuge/sidecar/web/{p.relative_to(web)}" for p in (web / "templates").iterdir()}
    expected |= {f"sip_refuge/sidecar/web/{p.relative_to(web)}" for p in (web / "static").iterdir()}
    expected |= {f"sip_refuge/prompts/{p.name}" for p in (REPO / "sip_refuge" / "prompts").glob("*.wav")}
    assert len(expected) > 30
    assert expected - names == set()


def test_extras_are_split_by_part(wheel: Path) -> None:
    """The base requirements are PyYAML, Jinja2 and cryptography (a TLS site's certificates) only; [post] and
    [sidecar] are extras."""
    metadata = HeaderParser().parsestr(zipfile.ZipFile(wheel).read("sip_refuge-0.1.0.dist-info/METADATA").decode())
    requires = metadata.get_all("Requires-Dist") or []
    base = {r.split(">")[0].split("=")[0].split(";")[0].strip().lower() for r in requires if "extra ==" not in r}
    assert base == {"pyyaml", "jinja2", "cryptography"}
    assert {"post", "sidecar"} <= set(metadata.get_all("Provides-Extra") or [])


def test_the_base_install_checks_renders_and_names_the_extra_each_part_needs(
        wheel: Path, site: Site, tmp_path: Path) -> None:
    """The base install checks and renders a site, and post, sidecar and config check --post name their extra."""
    base = Venv.create(tmp_path / "venv", str(wheel))
    assert base.installed() & {"gpiozero", "pyvoip", "numpy", *CONTROL_ROOM_ONLY} == set()
    done = base.run("config", "check", str(site.path))
    assert done.returncode == 0, done.stderr
    done = base.run("asterisk", "render", str(site.path), "--out", str(tmp_path / "rendered"))
    assert done.returncode == 0, done.stderr
    assert "[refuge-alarm]" in (tmp_path / "rendered" / "extensions_refuge.conf").read_text()
    for command, extra in ((("post", str(site.path), "--post", POST, "--gpio", "mock"), "post"),
                           (("sidecar", str(site.path)), "sidecar")):
        done = base.run(*command)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert f"pip install 'sip-refuge[{extra}]'" in done.stderr, done.stderr
    done = base.run("config", "check", str(site.path), "--post", POST)
    assert done.returncode == 2
    assert "is not installed: pip install 'sip-refuge[post]'" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert "the pyvoip SIP backend cannot be loaded" in done.stderr


def test_a_post_install_has_nothing_of_the_control_room_and_registers(
        wheel: Path, site: Site, pbx: Asterisk, tmp_path: Path) -> None:
    """[post] installs no control-room package, passes config check --post, and its post registers to Asterisk."""
    post = Venv.create(tmp_path / "venv", f"{wheel}[post]")
    assert {"gpiozero", "pyvoip"} <= post.installed()
    assert post.installed() & set(CONTROL_ROOM_ONLY) == set()
    done = post.run("config", "check", str(site.path), "--post", POST)
    assert done.returncode == 0, done.stderr
    log = tmp_path / "post.log"
    agent = post.start(log, "post", str(site.path), "--post", POST, "--gpio", "mock", "--state-dir", str(tmp_path))
    try:
        def registered() -> bool:
            assert agent.poll() is None, log.read_text(errors="replace")
            status = post.run("status", str(site.path), "--post", POST)
            return status.returncode == 0 and json.loads(status.stdout)["registered"] is True

        wait_for(registered, 60, f"post {POST} registered (sip-refuge status)")
        assert f"Contact:  {POST}/" in pbx.cli(f"pjsip show contacts like {POST}")
        assert list(post.cwd.iterdir()) == []  # nothing written into the working folder
    finally:
        stop(agent, log)
    # The prompts it would play come from the installed package.
    assert (post.package_dir() / "prompts" / "connecting.wav").is_file()


def test_the_sidecar_without_opencv_says_so_and_runs_with_no_cameras(
        wheel: Path, site: Site, pbx: Asterisk, tmp_path: Path) -> None:
    """Without opencv the sidecar says to install it or use --no-cameras, and with --no-cameras it serves."""
    requires = HeaderParser().parsestr(
        zipfile.ZipFile(wheel).read("sip_refuge-0.1.0.dist-info/METADATA").decode()).get_all("Requires-Dist") or []
    web_parts = [r.split(";")[0].strip() for r in requires if 'extra == "sidecar"' in r and "opencv" not in r]
    venv = Venv.create(tmp_path / "venv", str(wheel))
    venv.pip("install", "-q", *web_parts)
    assert "opencv-python-headless" not in venv.installed() and "flask" in venv.installed()
    done = venv.run("sidecar", str(site.path), timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "needs opencv-python-headless" in done.stderr and "--no-cameras" in done.stderr
    assert site.sidecar is not None
    url = f"http://{site.sidecar.host}:{site.sidecar.port}"
    log = tmp_path / "sidecar.log"
    proc = venv.start(log, "sidecar", str(site.path), "--no-cameras")
    try:
        wait_for(lambda: _get(url + "/healthz", proc, log), 60, "the sidecar's /healthz")
    finally:
        stop(proc, log)


def test_render_and_check_from_the_installed_templates(full: Venv, site: Site, tmp_path: Path) -> None:
    """asterisk render and check work from the installed templates; --templates still overrides them."""
    shipped = full.package_dir() / "pbx" / "templates"
    assert shipped.is_dir() and not shipped.is_symlink()
    assert f"the shipped templates in {shipped}" in full.run("asterisk", "render", "--help").stdout
    done = full.run("asterisk", "render", str(site.path), "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["pjsip_refuge_transport.conf", "pjsip_refuge.conf", "pjsip_refuge_secrets.conf", "acl_refuge.conf",
         "queues_refuge.conf", "extensions_refuge.conf", "manager_refuge.conf"])
    done = full.run("asterisk", "check", str(site.path), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    # --templates and $SIP_REFUGE_TEMPLATES still win over the shipped ones.
    own = tmp_path / "own"
    own.mkdir()
    for template in shipped.iterdir():
        (own / template.name).write_text(template.read_text())
    queues = own / "queues_refuge.conf.j2"
    queues.write_text(queues.read_text() + "\n; our own queue notes\n")
    done = full.run("asterisk", "render", str(site.path), "--out", str(tmp_path / "own-out"), "--templates", str(own))
    assert done.returncode == 0, done.stderr
    assert "; our own queue notes" in (tmp_path / "own-out" / "queues_refuge.conf").read_text()


def test_the_sidecar_serves_its_pages_from_the_installed_package(
        full: Venv, site: Site, pbx: Asterisk, tmp_path: Path) -> None:
    """The installed sidecar (cameras on) serves the dashboard, the operator page and its static files."""
    assert site.sidecar is not None
    url = f"http://{site.sidecar.host}:{site.sidecar.port}"
    log = tmp_path / "sidecar.log"
    proc = full.start(log, "sidecar", str(site.path))  # with camera checks: opencv is installed
    try:
        wait_for(lambda: _get(url + "/healthz", proc, log), 60, "the sidecar's /healthz")
        # The pages need a login or the token; the token is enough to see that they are served.
        token = {"Authorization": f"Bearer {site.sidecar.token.read()}"}
        dashboard = requests.get(url + "/", timeout=10, headers=token, allow_redirects=False)
        assert dashboard.status_code == 200 and site.name in dashboard.text
        operator = requests.get(url + "/operator", params={"desk": "desk-1"}, timeout=10, headers=token,
                                allow_redirects=False)
        assert operator.status_code == 200 and "Operator Desk 1" in operator.text
        static = full.package_dir() / "sidecar" / "web" / "static"
        for name in ("refuge.css", "dashboard.js", "operator.js"):
            served = requests.get(f"{url}/static/{name}", timeout=10)
            assert served.status_code == 200 and served.content == (static / name).read_bytes()
            assert served.content == (REPO / "sip_refuge" / "sidecar" / "web" / "static" / name).read_bytes()
    finally:
        stop(proc, log)
    assert "Traceback" not in log.read_text(errors="replace")


def _get(url: str, proc: subprocess.Popen[bytes], log: Path) -> bool:
    assert proc.poll() is None, f"the sidecar exited {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}"
    try:
        return requests.get(url, timeout=2).status_code in (200, 503)
    except requests.RequestException:
        return False
