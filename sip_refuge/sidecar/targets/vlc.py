"""VLC's HTTP interface as the simplest CCTV client: ``in_play`` the calling post's RTSP URL.

VLC opens the stream itself, so it gets the URL with the camera password. Only ``call.queued`` plays
something: the camera should be on screen while the desk phones ring; later events of the call need no
action from a player, and are accepted as delivered.
VLC's HTTP interface uses Basic auth with an empty user name and the ``--http-password``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import requests

from sip_refuge.config.cctv import vlc as schema
from sip_refuge.config.model import CctvTarget
from sip_refuge.sidecar.events import CALL_QUEUED, Event
from sip_refuge.sidecar.targets import DEFAULT_TIMEOUT, TargetError, read_secret

KIND = schema.KIND
Options = schema.VlcOptions
read = schema.read
PLAYS_ON = frozenset({CALL_QUEUED})


class VlcTarget:
    reveal_credentials = True

    def __init__(self, name: str, url: str, password: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.name = name
        self.url = url.rstrip("/")
        self._where = urlsplit(url).netloc
        self._auth = ("", password)
        self._timeout = timeout
        self._session = requests.Session()

    def deliver(self, event: Event) -> None:
        data: Mapping[str, Any] = event.body.get("data", {})
        rtsp_url = (data.get("camera") or {}).get("rtsp_url")
        if event.type not in PLAYS_ON or not rtsp_url:
            return
        # Messages name only host:port: the request URL holds the camera password (URL-encoded, which
        # mask_url would not recognise).
        try:
            resp = self._session.get(self.url + "/requests/status.xml",
                                     params={"command": "in_play", "input": str(rtsp_url)},
                                     auth=self._auth, timeout=self._timeout, allow_redirects=False)
        except requests.Timeout:
            raise TargetError(f"{self.name}: {self._where} did not answer within {self._timeout:g} s") from None
        except requests.RequestException as exc:
            raise TargetError(f"{self.name}: cannot reach {self._where} ({type(exc).__name__})") from None
        with resp:
            if resp.status_code != 200:
                raise TargetError(f"{self.name}: {self._where} answered HTTP {resp.status_code}")

    def close(self) -> None:
        self._session.close()


def from_config(config: CctvTarget, *, timeout: float = DEFAULT_TIMEOUT) -> VlcTarget:
    options = config.options
    assert isinstance(options, Options)
    return VlcTarget(config.name, options.url, read_secret(config), timeout=timeout)
