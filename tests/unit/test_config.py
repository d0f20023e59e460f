"""The site file: loading, validation with located messages, secrets."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sip_refuge.config import load_site
from sip_refuge.config.secrets import Masker, mask_url
from sip_refuge.config.users import read_users
from sip_refuge.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config" / "site.example.yaml"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sip_refuge.cli", *args], capture_output=True, text=True,
                          check=False)


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_site(path)
    return [str(p) for p in info.value.problems]


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def line_of(path: Path, needle: str) -> int:
    """The last line holding ``needle`` (an edit may duplicate an earlier line on purpose)."""
    numbers = [n for n, line in enumerate(path.read_text().splitlines(), 1) if needle in line]
    assert numbers, needle
    return numbers[-1]


def test_example_site_loads_into_typed_objects(site_copy: Path) -> None:
    site = load_site(site_copy)
    assert site.name == "Ashfield Refuge Points"
    assert [p.id for p in site.posts] == ["sutton-market", "idlewells", "kirkby-bus-station"]
    assert site.queue.extension == "7000" and site.queue.max_wait == 30
    assert site.self_test.interval == 24 * 3600
    assert site.posts[0].auto_answer_window == 600
    assert site.posts[0].gpio.tamper == 25 and site.posts[1].gpio.tamper is None
    assert site.posts[1].sip_backend == "pyvoip"
    assert site.pbx.networks.posts == ("127.0.0.0/8", "10.20.5.0/24")
    assert site.desks[1].workstation == "ws-2"
    assert site.sidecar is not None and site.sidecar.port == 8080
    assert site.posts[0].camera is not None and site.posts[0].camera.username == "viewer"
    with pytest.raises(AttributeError):
        site.name = "x"  # type: ignore[misc]  # frozen


def test_five_mistakes_give_five_located_lines_and_exit_2(site_copy: Path) -> None:
    edit(site_copy, 'extension: "9002"', 'extension: "9001"')          # duplicate extension
    edit(site_copy, "lat: 53.1246", "lat: 153.1246")                   # latitude out of range
    edit(site_copy, "interval: 24h", "interval: 24 hours")             # bad duration
    edit(site_copy, "button: 17, yellow: 22, green: 23, red: 24, tamper: 25",
         "button: 41, yellow: 22, green: 23, red: 24, tamper: 25")     # no such GPIO pin
    edit(site_copy, "sip_backend: pyvoip", "sip_backend: pjsip")       # unknown backend
    result = run_cli("config", "check", str(site_copy))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 5, result.stderr
    assert "Traceback" not in result.stderr
    expected = [
        (line_of(site_copy, "lat: 153.1246"), "posts[0].location.lat"),
        (line_of(site_copy, "button: 41"), "posts[0].gpio.button"),
        (line_of(site_copy, "interval: 24 hours"), "self_test.interval"),
    ]
    for line, path in expected:
        assert any(entry.startswith(f"{site_copy}:{line}: {path}: ") for entry in lines), (line, path, lines)
    dup = [entry for entry in lines if "already used by post sutton-market" in entry]
    assert dup and dup[0].startswith(f"{site_copy}:{line_of(site_copy, 'Idlewells Shopping') + 1}: posts[1].extension")
    assert any(": posts[1].sip_backend: 'pjsip' must be one of: pjsua2, pyvoip" in entry for entry in lines)


def test_clean_site_exits_0(site_copy: Path) -> None:
    result = run_cli("config", "check", str(site_copy))
    assert result.returncode == 0, result.stderr
    assert "3 posts, 2 desks" in result.stdout


@pytest.mark.parametrize(("old", "new", "path", "message"), [
    ('id: desk-2', 'id: Desk 2', "desks[1].id", "lowercase"),
    ('id: desk-2', 'id: desk-1', "desks[1].id", "used twice"),
    ('extension: "2002"', 'extension: 2002', "desks[1].extension", "quotes"),
    ('extension: "2002"', 'extension: "20a2"', "desks[1].extension", "digits"),
    ('extension: "9003"', 'extension: "7001"', "posts[2].extension", "already used by queue.overflow"),
    ('secret_file: secrets/desk-2.secret', 'secret: hunter2hunter2hunter2', "desks[1].secret", "never go in the site file"),
    ('transport: udp', 'transport: sctp', "pbx.transport", "must be one of"),
    ('url: https://vms.example/hooks/refuge', 'url: ftp://vms.example/x', "cctv[0].url", "http:// or https://"),
    ('rtsp_url: "rtsp://10.20.5.12:554/stream1"', 'rtsp_url: "rtsp://admin:admin@10.20.5.12/s"',
     "posts[1].camera.rtsp_url", "holds a password"),
    ('max_wait: 30', 'max_wiat: 30', "queue.max_wiat", "did you mean 'max_wait'"),
    ('posts: [127.0.0.0/8, 10.20.5.0/24]', 'posts: [127.0.0.0/8, 10.20.5.0/33]', "pbx.networks.posts[1]", "not a network"),
    ('interval: 24h', 'interval: 4d', "self_test.interval", "out of range"),
])
def test_each_rule_names_the_place(site_copy: Path, old: str, new: str, path: str, message: str) -> None:
    edit(site_copy, old, new)
    found = problems_of(site_copy)
    line = line_of(site_copy, new.split(":")[0] if path.endswith("max_wiat") else new)
    assert any(p.startswith(f"{site_copy}:{line}: {path}: ") and message in p for p in found), found


def test_duplicate_yaml_key_is_reported(site_copy: Path) -> None:
    edit(site_copy, "  max_wait: 30", "  max_wait: 30\n  max_wait: 60")
    found = problems_of(site_copy)
    assert any(": queue.max_wait: duplicate key" in p for p in found), found


def test_yaml_syntax_error_is_located(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("site:\n  name: [unclosed\npbx: {}\n")
    result = run_cli("config", "check", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"{path}:3: (yaml): ")


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    result = run_cli("config", "check", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "cannot read" in result.stderr and "Traceback" not in result.stderr


def test_weak_short_and_world_readable_secrets_are_refused(site_copy: Path) -> None:
    secrets = site_copy.parent / "secrets"
    (secrets / "desk-1.secret").write_text("changeme\n")
    (secrets / "desk-2.secret").write_text("aaaaaaaaaaaaaaaaaaaaaaaa\n")
    os.chmod(secrets / "ami.secret", 0o644)
    found = problems_of(site_copy)
    assert any("desks[0].secret_file" in p and "too short" in p for p in found), found
    assert any("desks[1].secret_file" in p and "well-known or trivial" in p for p in found), found
    assert any("pbx.ami.secret_file" in p and "chmod 600" in p for p in found), found


def test_secret_from_environment(site_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    edit(site_copy, "secret_file: secrets/desk-2.secret", "secret_env: DESK2_SECRET")
    assert any("DESK2_SECRET" in p and "not set" in p for p in problems_of(site_copy))
    monkeypatch.setenv("DESK2_SECRET", "Zq8vN2xK4pL9mR7tW1yB")
    assert load_site(site_copy).desks[1].secret.read() == "Zq8vN2xK4pL9mR7tW1yB"


def test_secrets_init_creates_strong_private_files_once(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    shutil.copy(EXAMPLE, path)
    result = run_cli("secrets", "init", str(path))
    assert result.returncode == 0, result.stderr
    users = tmp_path / "secrets" / "sidecar.users"
    assert stat.S_IMODE(users.stat().st_mode) == 0o600 and read_users(users) == {}  # operators: `users add`
    files = sorted(f for f in (tmp_path / "secrets").iterdir() if f != users)
    assert len(files) == 9
    for file in files:
        assert stat.S_IMODE(file.stat().st_mode) == 0o600
        assert len(file.read_text().strip()) >= 32
    assert (tmp_path / "secrets" / "webhook.secret").read_text().startswith("whsec_")
    before = {f: f.read_text() for f in files}
    assert run_cli("secrets", "init", str(path)).returncode == 0
    users.write_text(users.read_text() + "# kept\n")
    assert run_cli("secrets", "init", str(path)).returncode == 0
    assert {f: f.read_text() for f in files} == before  # never overwrites
    assert users.read_text().endswith("# kept\n")


def test_masking_hides_secrets_and_url_passwords(site_copy: Path) -> None:
    site = load_site(site_copy)
    token = site.posts[0].secret.read()
    mask = Masker.for_site(site)
    assert token not in mask(f"registering with password {token}")
    assert mask_url("open rtsp://viewer:s3cr3t@10.0.0.1:554/x now") == "open rtsp://viewer:***@10.0.0.1:554/x now"
    assert mask_url("rtsp://10.0.0.1/x") == "rtsp://10.0.0.1/x"


def test_masker_also_hides_percent_encoded_secrets() -> None:
    mask = Masker(["cam-S3cret!pw/with@odd"])
    assert "S3cret" not in mask("rtsp://viewer:cam-S3cret%21pw%2Fwith%40odd@10.0.0.1/s")
    assert "S3cret" not in mask("raw cam-S3cret!pw/with@odd here")


def test_stand_in_secrets_replace_only_missing_ones(tmp_path: Path) -> None:
    from sip_refuge.config.secrets import stand_in_secrets

    path = tmp_path / "site.yaml"
    shutil.copy(EXAMPLE, path)
    site = load_site(path, check_secrets=False)
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "desk-1.secret").write_text("Zq8vN2xK4pL9mR7tW1yBq\n")
    spare = tmp_path / "spare"
    spare.mkdir()
    fixed, names = stand_in_secrets(site, spare)
    assert "desks.desk-1" not in names and "posts.sutton-market" in names and len(names) == 8
    assert fixed.desks[0].secret.read() == "Zq8vN2xK4pL9mR7tW1yBq"
    assert len(fixed.posts[0].secret.read()) >= 32 and fixed.cctv[0].secret is not None
    assert fixed.cctv[0].secret.read().startswith("whsec_")
