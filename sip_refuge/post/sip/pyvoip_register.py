"""The pyVoIP agent's registrations: one dialog per registrar (each PBX of a pair), each refreshed on its own
timer, well within what the registrar granted, and retried with a backoff while it fails.
"""

from __future__ import annotations

import re

from sip_refuge.post.sip.pyvoip_dialog import Registration
from sip_refuge.post.sip.pyvoip_msg import Message, digest
from sip_refuge.post.sip.pyvoip_sip import REGISTER_TIMEOUT, SipAgent


class Registering(SipAgent):
    """Keeps this phone registered with every registrar it was given."""

    @property
    def registered(self) -> bool:
        """Registered with at least one registrar."""
        return any(r.registered for r in self._registrations.values())

    @property
    def granted(self) -> int:
        """The expiry the first registrar granted (0 while not registered there)."""
        return next(iter(self._registrations.values())).granted

    def _register(self, reg: Registration, challenge: Message | None = None, expires: int | None = None) -> None:
        reg.cseq += 1
        expires = self.expires if expires is None else expires
        uri = f"sip:{reg.server[0]}:{reg.server[1]}"
        extra = [f"Contact: {self.contact}", f"Expires: {expires}", "Allow: INVITE, ACK, BYE, CANCEL, OPTIONS, UPDATE, INFO"]
        if challenge is not None:
            header = "authorization" if challenge.code == 401 else "proxy-authorization"
            value = challenge.header("www-authenticate" if challenge.code == 401 else "proxy-authenticate")
            extra.append(f"{header.title()}: "
                         + digest(value, method="REGISTER", uri=uri, user=self.user, password=self._password))
        self._request("REGISTER", uri, call=None, dest=reg.server, timeout=REGISTER_TIMEOUT,
                      on_final=lambda r: self._on_register(reg, r, challenge is not None, expires),
                      extra=tuple(extra), cseq=reg.cseq, call_id=reg.call_id,
                      from_=f"<{reg.aor}>;tag={reg.tag}", to=f"<{reg.aor}>")

    def _on_register(self, reg: Registration, resp: Message | None, authed: bool, expires: int) -> None:
        host = reg.server[0]
        if resp is not None and resp.code in (401, 407) and not authed:
            self._register(reg, resp, expires)
            return
        if expires == 0:  # our un-REGISTER on stop: done whatever the answer (once every registrar answered)
            reg.registered = False
            self._done = self._done or (self._stopping and not self.registered)
            return
        if resp is not None and 200 <= resp.code < 300:
            self.gate.learn_registration(resp.header("via"))
            reg.granted = _granted_expiry(resp, self.host, self.port, expires)
            reg.registered, reg.failures = True, 0
            # Refresh well before the registrar's expiry, and at least every refresh_interval so that a PBX
            # that restarted (and lost its contacts) has us back within that time.
            self._schedule_register(reg, max(1.0, min(reg.granted * 0.5, self.refresh_interval)))
            self.listener.on_registered(reg.granted, host)
            return
        status = None if resp is None else resp.code
        reason = "no answer from the PBX" if resp is None else f"{resp.code} {resp.reason}"
        self.listener.on_registration_failed(reason, status, host)
        if reg.registered:
            reg.registered = False
            self.listener.on_unregistered(reason, host)
        reg.failures += 1
        self._schedule_register(reg, min(2.0 ** (reg.failures - 1), 8.0))  # 1, 2, 4, 8, 8 ... s

    def _schedule_register(self, reg: Registration, delay: float) -> None:
        reg.timer += 1
        token = reg.timer
        self.call_later(delay, lambda: None if token != reg.timer or self._stopping else self._register(reg))


def _granted_expiry(resp: Message, host: str, port: int, asked: int) -> int:
    """The expiry the registrar granted our contact: its ``expires`` parameter, else the Expires header."""
    for value in resp.all("contact"):
        for contact in value.split(","):
            if f"{host}:{port}" in contact:
                match = re.search(r";\s*expires=(\d+)", contact)
                if match:
                    return int(match.group(1))
    header = resp.header("expires")
    return int(header) if header.isascii() and header.isdigit() else asked
