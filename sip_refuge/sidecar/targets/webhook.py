"""Standard Webhooks target: POST the event, signed with the ``standardwebhooks`` library.

The ``webhook-id`` is the event id, so a receiver that de-duplicates by it sees each event once however often
we retry. The timestamp and signature are made fresh per attempt, because receivers reject stale timestamps
(the library's tolerance is five minutes) and a target may be down for longer than that.

``body_template`` (Jinja2, sandboxed) lets a VMS that accepts a templated HTTP call get its own body; the
signature then covers the rendered body, as the receiver sees it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import requests
from jinja2 import TemplateError
from standardwebhooks import Webhook

from sip_refuge.config.model import CctvTarget
from sip_refuge.errors import SidecarError
from sip_refuge.sidecar.events import Event
from sip_refuge.sidecar.targets import DEFAULT_TIMEOUT, Publish, TargetError, read_secret
from sip_refuge.sidecar.targets.body_template import compile_template

USER_AGENT = "sip-refuge-sidecar"


def template_context(event: Event) -> dict[str, Any]:
    """What a body template can use: the whole ``event`` plus short names for the common fields."""
    data = event.body.get("data", {})
    return {
        "event": event.body, "id": event.id, "type": event.type, "timestamp": event.timestamp, "data": data,
        "incident": event.incident, "post": data.get("post"), "desk": data.get("desk"),
        "rtsp_url": (data.get("camera") or {}).get("rtsp_url"), "snapshot_url": data.get("snapshot_url"),
    }


class WebhookTarget:
    reveal_credentials = True

    def __init__(self, name: str, url: str, secret: str, *, headers: dict[str, str] | None = None,
                 body_template: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.name = name
        self.url = url
        self._where = urlsplit(url).netloc.rpartition("@")[2]  # host:port only; the URL may carry a token
        try:
            self._signer = Webhook(secret)
        except Exception as exc:  # noqa: BLE001 - the library raises several kinds for a malformed key
            raise SidecarError(f"cctv target {name}: the webhook secret is not a valid whsec_ key "
                               f"({type(exc).__name__})") from None
        self._headers = dict(headers or {})
        self._template = compile_template(body_template) if body_template else None
        self._timeout = timeout
        self._session = requests.Session()

    def render(self, event: Event) -> str:
        if self._template is None:
            return event.to_json()
        try:
            return self._template.render(template_context(event))
        except TemplateError as exc:
            raise TargetError(f"{self.name}: body_template failed: {exc}") from None

    def deliver(self, event: Event) -> None:
        body = self.render(event)
        now = datetime.now(UTC)
        headers = {"content-type": "application/json", "user-agent": USER_AGENT, **self._headers,
                   "webhook-id": event.id, "webhook-timestamp": str(int(now.timestamp())),
                   "webhook-signature": self._signer.sign(event.id, now, body)}
        try:
            resp = self._session.post(self.url, data=body.encode("utf-8"), headers=headers,
                                      timeout=self._timeout, allow_redirects=False)
        except requests.Timeout:
            raise TargetError(f"{self.name}: {self._where} did not answer within {self._timeout:g} s") from None
        except requests.RequestException as exc:
            raise TargetError(f"{self.name}: cannot reach {self._where} ({type(exc).__name__})") from None
        with resp:
            if not 200 <= resp.status_code < 300:
                raise TargetError(f"{self.name}: {self._where} answered HTTP {resp.status_code}")

    def close(self) -> None:
        self._session.close()


def from_config(config: CctvTarget, *, timeout: float = DEFAULT_TIMEOUT,
                publish: Publish | None = None) -> WebhookTarget:
    options = config.options
    raw = options.get("headers")
    headers = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
    template = options.get("body_template")
    return WebhookTarget(config.name, str(options["url"]), read_secret(config), headers=headers,
                         body_template=str(template) if template else None, timeout=timeout)
