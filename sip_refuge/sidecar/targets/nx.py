"""Nx Witness / DW Spectrum (and other Nx Meta VMSs): a Generic Event referencing the post's camera.

Two APIs, chosen by ``api``:
- ``legacy``: ``GET /api/createEvent?source&caption&description&metadata={"cameraRefs":[id]}`` with HTTP
  digest auth. Errors come back as HTTP 200 with ``{"error": "<non-zero>"}``, so the body is checked too.
- ``v4`` (6.1 and later): ``POST /rest/v4/events/generic`` with a bearer token from
  ``POST /rest/v4/login/sessions``; a 401 means the session expired, so we log in again once.
An installer's rule (Generic Event -> "Show on Alarm Layout") puts the referenced camera on screen. The
camera is added to Nx once, by id in ``cameras`` (post id -> Nx camera id), so no RTSP password is sent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.auth import HTTPDigestAuth

from sip_refuge.config.cctv import nx as schema
from sip_refuge.config.cctv.nx import APIS
from sip_refuge.config.model import CctvTarget
from sip_refuge.errors import SidecarError
from sip_refuge.sidecar.events import Event
from sip_refuge.sidecar.targets import DEFAULT_TIMEOUT, TargetError, read_secret

KIND = schema.KIND
Options = schema.NxOptions
read = schema.read
SOURCE = "sip-refuge"


def describe(event: Event) -> tuple[str, str]:
    """(caption, description) an operator reads in the Nx notification panel and event log."""
    data: Mapping[str, Any] = event.body.get("data", {})
    post = data.get("post") or {}
    desk = data.get("desk") or {}
    pbx = data.get("pbx")
    about = f"{pbx.get('role')} PBX {pbx.get('host')}" if isinstance(pbx, Mapping) else ""  # pbx.down / pbx.up
    caption = f"{event.type} {post.get('name') or event.post_id or about}"
    parts = [f"post {event.post_id}" if event.post_id else about,
             str((post.get("location") or {}).get("address") or "")]
    if event.incident:
        reference = data.get("reference")
        parts.append(f"incident {reference} ({event.incident})" if reference else f"incident {event.incident}")
    if desk:
        parts.append(f"desk {desk.get('id')} workstation {desk.get('workstation') or '-'}")
    if data.get("reason"):
        parts.append(f"reason {data['reason']}")
    parts.append(event.timestamp)
    return caption, "; ".join(p for p in parts if p)


class NxTarget:
    reveal_credentials = False

    def __init__(self, name: str, url: str, username: str, password: str, *, cameras: Mapping[str, str],
                 api: str = "legacy", verify: bool | str = True, timeout: float = DEFAULT_TIMEOUT) -> None:
        if api not in APIS:
            raise SidecarError(f"cctv target {name}: api must be one of {', '.join(APIS)}, not {api!r}")
        self.name = name
        self.url = url.rstrip("/")
        self.api = api
        self.cameras = dict(cameras)
        self._where = urlsplit(url).netloc
        self._username = username
        self._password = password
        self._timeout = timeout
        self._token: str | None = None
        self._session = requests.Session()
        self._session.verify = verify  # Nx ships a self-signed certificate; a site may pin its CA file

    def deliver(self, event: Event) -> None:
        camera = self.cameras.get(event.post_id or "")
        caption, description = describe(event)
        if self.api == "legacy":
            self._legacy(caption, description, camera)
        else:
            self._v4(caption, description, camera)

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        try:
            return self._session.request(method, self.url + path, timeout=self._timeout, allow_redirects=False,
                                         **kwargs)
        except requests.Timeout:
            raise TargetError(f"{self.name}: {self._where} did not answer within {self._timeout:g} s") from None
        except requests.RequestException as exc:
            raise TargetError(f"{self.name}: cannot reach {self._where} ({type(exc).__name__})") from None

    def _legacy(self, caption: str, description: str, camera: str | None) -> None:
        params = {"source": SOURCE, "caption": caption, "description": description}
        if camera:
            params["metadata"] = json.dumps({"cameraRefs": [camera]})
        resp = self._request("GET", "/api/createEvent", params=params,
                             auth=HTTPDigestAuth(self._username, self._password))
        with resp:
            if resp.status_code != 200:
                raise TargetError(f"{self.name}: {self._where} answered HTTP {resp.status_code}")
            try:
                reply = resp.json()
            except ValueError:
                raise TargetError(f"{self.name}: {self._where} answered 200 without JSON") from None
        if isinstance(reply, dict) and str(reply.get("error", "0")) != "0":
            raise TargetError(f"{self.name}: createEvent failed: {reply.get('errorString') or reply['error']}")

    def _login(self) -> str:
        body = {"username": self._username, "password": self._password, "setCookie": False}
        resp = self._request("POST", "/rest/v4/login/sessions", json=body)
        with resp:
            if resp.status_code != 200:
                raise TargetError(f"{self.name}: login to {self._where} answered HTTP {resp.status_code}")
            try:
                token = resp.json()["token"]
            except (ValueError, KeyError, TypeError):
                raise TargetError(f"{self.name}: login to {self._where} gave no token") from None
        self._token = str(token)
        return self._token

    def _v4(self, caption: str, description: str, camera: str | None) -> None:
        body: dict[str, Any] = {"state": "instant", "source": SOURCE, "caption": caption,
                                "description": description}
        if camera:
            body["deviceIds"] = [camera]
        for fresh in (False, True):
            token = self._login() if fresh or self._token is None else self._token
            resp = self._request("POST", "/rest/v4/events/generic", json=body,
                                 headers={"Authorization": f"Bearer {token}"})
            with resp:
                status = resp.status_code
            if status == 401 and not fresh:
                self._token = None
                continue  # the session expired: log in once more
            if not 200 <= status < 300:
                raise TargetError(f"{self.name}: {self._where} answered HTTP {status}")
            return

    def close(self) -> None:
        self._session.close()


def from_config(config: CctvTarget, *, timeout: float = DEFAULT_TIMEOUT) -> NxTarget:
    options = config.options
    assert isinstance(options, Options)
    return NxTarget(config.name, options.url, options.username, read_secret(config), cameras=options.cameras,
                    api=options.api, verify=options.verify, timeout=timeout)
