"""``sip-refuge config check SITE --post ID``: what one post needs on its own machine, and nothing else.

The site file is checked as on the control room, except that only the post's own secret is read
(``load_site(..., post=ID)``): the other secret files are, by design, not on a post. Then the post's machine:
its SIP backend can be imported and can speak the site's transport, gpiozero is installed (and lgpio, its pin
factory, on an ARM board), the PBX's host names resolve, and the telemetry URL is one a post can reach.
Nothing here touches a pin or the network beyond a name lookup, so the check is safe beside a running agent.
"""

from __future__ import annotations

import importlib
import importlib.util
import ipaddress
import platform
import socket
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from sip_refuge.config.loader import load_site
from sip_refuge.config.model import Post, Site
from sip_refuge.config.source import load_yaml
from sip_refuge.errors import ConfigError, Problem
from sip_refuge.post.sip import BACKENDS

INSTALL_POST = "pip install 'sip-refuge[post]'"
ARM = ("aarch64", "armv7l", "armv6l")


def check_post(path: str | Path, post_id: str) -> tuple[Site, Post, list[str]]:
    """The site and the post when everything the post needs is there, with notes worth reading;
    else :class:`ConfigError` with one ``FILE:LINE: key: problem`` per finding."""
    site = load_site(path, post=post_id)
    post = site.post(post_id)
    src = load_yaml(Path(path))
    at = f"posts[{next(i for i, p in enumerate(site.posts) if p.id == post_id)}]"
    problems: list[Problem] = []
    notes: list[str] = []

    def fail(key: str, message: str) -> None:
        problems.append(src.problem(key, message))

    _backend(site, post, lambda message: fail(f"{at}.sip_backend", message))
    if importlib.util.find_spec("gpiozero") is None:
        fail(f"{at}.gpio", f"gpiozero is not installed: {INSTALL_POST}")
    # find_spec, not import: importing lgpio makes a FIFO in the current folder (see the post's systemd unit).
    if platform.machine() in ARM and importlib.util.find_spec("lgpio") is None:
        fail(f"{at}.gpio", f"lgpio (gpiozero's pin factory on a Raspberry Pi) is not installed: {INSTALL_POST}")
    for key, host in (("pbx.host", site.pbx.host), ("pbx.secondary_host", site.pbx.secondary_host)):
        if host is not None and not _resolves(host):
            fail(key, f"{host!r} does not resolve on this post (DNS or /etc/hosts)")
    if site.sidecar is not None:
        url = site.sidecar.public_url or f"http://{site.sidecar.host}:{site.sidecar.port}"
        if site.sidecar.public_url is None and _local_only(site.sidecar.host):
            notes.append(f"sidecar.public_url is not set: telemetry goes to {url}, which a post reaches only on "
                         "the sidecar's own machine")
        elif urlsplit(url).scheme == "http" and not _local_only(urlsplit(url).hostname or ""):
            notes.append(f"telemetry goes to {url} in clear: prefer an https:// sidecar.public_url across a network")
    if problems:
        raise ConfigError(sorted(problems, key=lambda p: p.line))
    return site, post, notes


def _backend(site: Site, post: Post, fail: Callable[[str], None]) -> None:
    try:
        importlib.import_module(BACKENDS[post.sip_backend])
    except ImportError as exc:
        fail(f"the {post.sip_backend} SIP backend cannot be loaded ({exc}); "
             + (INSTALL_POST if post.sip_backend == "pyvoip" else "install pjsua2 (README.md) or use pyvoip"))
        return
    if post.sip_backend == "pyvoip" and site.pbx.transport != "udp":
        fail(f"the pyvoip backend speaks SIP over UDP only, but pbx.transport is {site.pbx.transport!r}; "
             "use sip_backend: pjsua2 for this post")


def _resolves(host: str) -> bool:
    try:
        return bool(socket.getaddrinfo(host.strip("[]"), None))
    except (OSError, UnicodeError):
        return False


def _local_only(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def summary(site: Site, post: Post) -> str:
    """One line saying what was checked, for the admin at the post."""
    gpio = post.gpio
    pins = f"button {gpio.button}, LEDs {gpio.yellow}/{gpio.green}/{gpio.red}" + \
        (f", tamper {gpio.tamper}" if gpio.tamper is not None else "")
    return (f"ok: post {post.id} ({post.name}), extension {post.extension}, {post.sip_backend} over "
            f"{site.pbx.transport} to {site.pbx.host}:{site.pbx.sip_port}, GPIO {pins}; its own secret only")
