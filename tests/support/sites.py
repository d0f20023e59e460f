"""Site files for tests and benches: the example site moved onto free loopback ports, with fresh secrets."""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from sip_refuge.config import Site, load_site
from sip_refuge.config.certs import init_tls
from sip_refuge.config.secrets import init_secrets
from sip_refuge.pbx.asterisk import free_port, on_free_ports

if TYPE_CHECKING:
    from tests.support.rtsp_camera import TestCamera

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config" / "site.example.yaml"
DEMO = REPO / "config" / "demo.yaml"
POSTS = {"pjsua2": "sutton-market", "pyvoip": "idlewells"}  # the example site's post on each backend

_used_rtp: set[int] = set()


def rtp_range() -> tuple[int, int]:
    """A 200-port RTP range no other sandbox of this run uses (Asterisk skips ports in use anyway)."""
    while True:
        start = random.randrange(20000, 40000, 200)
        if start not in _used_rtp:
            _used_rtp.add(start)
            return start, start + 198


def cameras_on(data: dict[str, Any], folder: Path, camera: TestCamera, user: str, password: str) -> None:
    """Every post's camera in the site ``data`` (to be written in ``folder``) on ``camera``, behind its login:
    ``user`` in the URL, ``password`` in ``secrets/camera.secret``."""
    secret = folder / "secrets" / "camera.secret"
    secret.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    secret.write_text(password + "\n", encoding="utf-8")
    secret.chmod(0o600)
    for post in data["posts"]:
        post["camera"] = {"rtsp_url": camera.url(post["id"], user=user), "password_file": "secrets/camera.secret"}


def example_copy(folder: Path, edit: Callable[[str], str] | None = None) -> Path:
    """A copy of the example site as ``folder/site.yaml`` (its text passed through ``edit`` first), with freshly
    generated secrets. Its ports are the example's: for tests that start no Asterisk and no sidecar."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "site.yaml"
    shutil.copy(EXAMPLE, path)
    if edit is not None:
        path.write_text(edit(path.read_text()))
    init_secrets(load_site(path, check_secrets=False))
    return path


def agent_site(folder: Path, *, sidecar_port: int | None = None, queue: dict[str, Any] | None = None) -> Site:
    """The example site for post agents: free ports, short queue timings, a control port per post, and the
    pjsua2 and pyVoIP backends on the posts named in :data:`POSTS`. Telemetry goes to ``sidecar_port``
    (by default a free port nothing listens on, so reports stay in each agent's outbox). ``queue`` overrides
    queue keys."""
    example = load_site(EXAMPLE, check_secrets=False)
    ports = on_free_ports(example).pbx
    data = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    pbx = data["pbx"]
    pbx.update(host=ports.host, bind=ports.bind, sip_port=ports.sip_port, transport="udp", qualify_frequency=5)
    pbx["rtp_start"], pbx["rtp_end"] = rtp_range()
    pbx["ami"]["port"] = ports.ami.port
    data["queue"].update({"ring_timeout": 5, "max_wait": 8, **(queue or {})})
    data["sidecar"]["listen"] = f"127.0.0.1:{sidecar_port or free_port()}"
    for post in data["posts"]:
        post["control_port"] = free_port()
        post["sip_backend"] = "pyvoip" if post["id"] == POSTS["pyvoip"] else "pjsua2"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    init_secrets(load_site(path, check_secrets=False))
    return load_site(path)


def sidecar_site(folder: Path, *, camera: Any = None, camera_user: str = "viewer", camera_password: str = "",
                 limits: dict[str, Any] | None = None, sidecar: dict[str, Any] | None = None) -> Site:
    """The example site for a sidecar alone (no Asterisk is started: AMI stays unconnected): a free port,
    posts reporting from 127.0.0.1 only (so 127.0.0.2 and up are strangers), no CCTV target, each post's
    camera on ``camera`` (a :class:`TestCamera`) behind a login, ``limits`` as ``sidecar.limits`` and
    ``sidecar`` as more keys of the sidecar section. The users file is there, without users."""
    data = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    data["pbx"]["networks"]["posts"] = ["127.0.0.1/32"]
    data["pbx"]["ami"]["port"] = free_port()
    data["sidecar"].update({"listen": f"127.0.0.1:{free_port()}", "camera_interval": "1h", "limits": limits or {},
                            **(sidecar or {})})
    data["cctv"] = []
    folder.mkdir(parents=True, exist_ok=True)
    if camera is not None:
        cameras_on(data, folder, camera, camera_user, camera_password)
    else:
        for post in data["posts"]:
            post.pop("camera", None)
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    init_secrets(load_site(path, check_secrets=False))
    return load_site(path)


def tls_site(folder: Path, *, desks: str = "udp") -> Site:
    """The demo site on free loopback ports with ``pbx.transport: tls``: every post on pjsua2 (pyVoIP cannot do
    TLS), desks on ``desks`` (``pbx.tls.desks``), and the site CA and the PBX's certificate (for 127.0.0.1)
    made as ``secrets init`` makes them, in ``folder/tls``."""
    demo = load_site(DEMO, check_secrets=False)
    ports = on_free_ports(demo).pbx
    data = yaml.safe_load(DEMO.read_text(encoding="utf-8"))
    pbx = data["pbx"]
    pbx.update(host=ports.host, bind=ports.bind, sip_port=ports.sip_port, transport="tls")
    pbx["tls"] = {"cert_file": "tls/pbx.crt", "key_file": "tls/pbx.key", "ca_file": "tls/ca.crt",
                  "port": free_port(), "desks": desks}
    pbx["rtp_start"], pbx["rtp_end"] = rtp_range()
    pbx["ami"]["port"] = ports.ami.port
    for post in data["posts"]:
        post["sip_backend"] = "pjsua2"
        post["control_port"] = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    bare = load_site(path, check_secrets=False)
    init_secrets(bare)
    init_tls(bare)
    return load_site(path)
