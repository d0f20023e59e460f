"""``config check SITE --post ID``: on a post that holds only its own secret it passes, and it still finds what
that post needs; ``secrets init`` says what each file it makes is for."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sip_refuge.config import load_site
from sip_refuge.config.secrets import init_secrets

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config" / "site.example.yaml"
POST = "idlewells"  # the example's pyVoIP post: its backend is in every install that has [post]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sip_refuge.cli", *args], capture_output=True, text=True,
                          check=False, timeout=60)


def line_of(path: Path, needle: str) -> int:
    """The first line holding ``needle``; a needle starting with ``^`` must start the line."""
    lines = enumerate(path.read_text().splitlines(), 1)
    if needle.startswith("^"):
        return next(n for n, line in lines if line.startswith(needle[1:]))
    return next(n for n, line in lines if needle in line)


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


@pytest.fixture()
def on_post(tmp_path: Path) -> Path:
    """The site file as a post has it: every secret made in the control room, only the post's own copied over."""
    control_room, post = tmp_path / "control-room", tmp_path / "post"
    control_room.mkdir()
    shutil.copy(EXAMPLE, control_room / "site.yaml")
    init_secrets(load_site(control_room / "site.yaml", check_secrets=False))
    (post / "secrets").mkdir(parents=True, mode=0o700)
    shutil.copy(control_room / "site.yaml", post / "site.yaml")
    shutil.copy2(control_room / "secrets" / f"{POST}.secret", post / "secrets" / f"{POST}.secret")
    return post / "site.yaml"


def test_a_post_with_only_its_own_secret_passes_where_the_full_check_fails(on_post: Path) -> None:
    done = run_cli("config", "check", str(on_post), "--post", POST)
    assert done.returncode == 0, done.stderr
    assert f"ok: post {POST} (Idlewells Shopping Centre), extension 9002, pyvoip over udp to 127.0.0.1:5060" in done.stdout
    assert "its own secret only" in done.stdout
    # The sidecar listens on loopback and the site gives no public_url: worth saying on a post.
    assert "note: sidecar.public_url is not set" in done.stdout
    full = run_cli("config", "check", str(on_post))
    assert full.returncode == 2 and "secrets/ami.secret" in full.stderr and "secrets init" in full.stderr


def test_its_own_secret_is_checked_as_strictly_as_in_the_full_check(on_post: Path) -> None:
    secret = on_post.parent / "secrets" / f"{POST}.secret"
    secret.chmod(0o644)
    done = run_cli("config", "check", str(on_post), "--post", POST)
    line = line_of(on_post, f"secrets/{POST}.secret")
    assert done.returncode == 2
    assert f"{on_post}:{line}: posts[1].secret_file: " in done.stderr and "chmod 600" in done.stderr
    secret.unlink()
    done = run_cli("config", "check", str(on_post), "--post", POST)
    assert done.returncode == 2 and f"{on_post}:{line}: posts[1].secret_file: " in done.stderr
    assert "copy this post's secret from the control room" in done.stderr
    assert "run: sip-refuge secrets init" not in done.stderr  # never on a post


def test_another_post_on_the_same_file_is_told_its_secret_is_missing(on_post: Path) -> None:
    done = run_cli("config", "check", str(on_post), "--post", "kirkby-bus-station")
    assert done.returncode == 2
    assert "posts[2].secret_file" in done.stderr and "idlewells" not in done.stderr


def test_an_unknown_post_is_named(on_post: Path) -> None:
    done = run_cli("config", "check", str(on_post), "--post", "nowhere")
    assert done.returncode == 2
    assert f"{on_post}:{line_of(on_post, '^posts:')}: posts: no post with id 'nowhere'" in done.stderr


def test_mistakes_elsewhere_in_the_file_are_still_reported(on_post: Path) -> None:
    edit(on_post, "ring_timeout: 15", "ring_timeout: 1")
    done = run_cli("config", "check", str(on_post), "--post", POST)
    assert done.returncode == 2 and "queue.ring_timeout" in done.stderr


def test_a_pyvoip_post_cannot_speak_tcp(on_post: Path) -> None:
    edit(on_post, "transport: udp", "transport: tcp")
    done = run_cli("config", "check", str(on_post), "--post", POST)
    assert done.returncode == 2
    line = line_of(on_post, "sip_backend: pyvoip")
    assert f"{on_post}:{line}: posts[1].sip_backend: the pyvoip backend speaks SIP over UDP only" in done.stderr


def test_a_pbx_name_the_post_cannot_resolve_is_an_error(on_post: Path) -> None:
    edit(on_post, "host: 127.0.0.1 ", "host: pbx.refuge.invalid ")  # .invalid never resolves (RFC 2606)
    done = run_cli("config", "check", str(on_post), "--post", POST)
    assert done.returncode == 2
    assert f"{on_post}:{line_of(on_post, 'pbx.refuge.invalid')}: pbx.host: 'pbx.refuge.invalid' does not resolve" \
        in done.stderr


def test_secrets_init_says_what_each_file_is_for(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    shutil.copy(EXAMPLE, path)
    done = run_cli("secrets", "init", str(path))
    assert done.returncode == 0, done.stderr
    said = {line.split(":", 1)[0].removeprefix("created "): line.split(":", 1)[1] for line in done.stdout.splitlines()}
    assert len(said) == 10
    camera = said[str(tmp_path / "secrets" / "sutton-market-camera.secret")]
    assert "password of post sutton-market's camera (user viewer in its rtsp_url)" in camera
    assert "set the same password on the camera" in camera and "never goes to the post" in camera
    assert "copy it, and no other secret, to that post" in said[str(tmp_path / "secrets" / "idlewells.secret")]
    assert "desk phone desk-1" in said[str(tmp_path / "secrets" / "desk-1.secret")]
    assert "AMI" in said[str(tmp_path / "secrets" / "ami.secret")]
    assert "Standard Webhooks signing key" in said[str(tmp_path / "secrets" / "webhook.secret")]
    assert "API" in said[str(tmp_path / "secrets" / "sidecar.token")]
    assert "sip-refuge users add" in said[str(tmp_path / "secrets" / "sidecar.users")]
