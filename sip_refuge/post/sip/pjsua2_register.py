"""The pjsua2 backend's registrations: one per PBX of the pair, and a watch over each.

:class:`Registrations` is a part of :class:`~sip_refuge.post.sip.pjsua2.Backend` (owner thread only). pjsua
reports each registration's outcome but not the start of its own refreshes, and waits 32 s (timer F) for a
REGISTER nobody answers; the watch works out when each refresh is due, so an idle post learns that a PBX of
its pair died before the next press, and registers again where pjsua gave up (401/403/404).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sip_refuge.post import events as ev
from sip_refuge.post.sip import Account, Emit
from sip_refuge.post.sip.guard import Gate

log = logging.getLogger("sip_refuge.post.sip.pjsua2")  # one logger for the backend, whichever part speaks

# No answer to a refresh REGISTER within this of when it was due: the PBX is taken for gone (Registered again once
# it answers). pjsip itself waits 32 s (timer F); an idle post must learn a PBX of its pair died before the next
# press, not after it. (pjsua reports no start of its own refreshes, so the due time is worked out here.)
REGISTER_TIMEOUT = 4.0
MIN_REFRESH = 5  # pjsip's regc refreshes no sooner than this after a registration (DELAY_BEFORE_REFRESH)


class Registrations:
    """The registration side of a :class:`~sip_refuge.post.sip.pjsua2.Backend` (owner thread only)."""

    # Set up by the Backend.
    retry_interval: int
    _account: Account | None
    _before_expiry: int
    _emit: Emit
    _gate: Gate | None
    _post: str
    _registered: dict[str, bool]
    _reg_activity: dict[str, float]
    _reg_due: dict[str, float]

    def _watch_registration(self, host: str, acc: Any, now: float) -> None:
        due = self._reg_due.get(host)
        if due is not None and now - due > REGISTER_TIMEOUT:
            del self._reg_due[host]  # pjsua goes on retransmitting; its answer, if any, registers the post again
            if self._registered.get(host):
                self._registered[host] = False
                log.warning("%s: no answer from %s to a REGISTER in %.0f s: taken for gone", self._post, host,
                            now - due)
                self._emit(ev.Unregistered(f"no answer to a REGISTER within {REGISTER_TIMEOUT:g} s", host))
        # pjsua retries timeouts and 5xx by itself but not 401/403/404 (a secret fixed on the PBX later).
        if not self._registered.get(host) and now - self._reg_activity.get(host, now) > max(30.0, 3.0 * self.retry_interval):
            self._reg_activity[host] = now
            log.info("%s: still not registered with %s; registering again", self._post, host)
            try:
                acc.setRegistration(True)
            except Exception as exc:  # noqa: BLE001 - pjsua busy with its own attempt: fine, try later
                log.info("%s: re-register with %s: %s", self._post, host, exc)

    def _on_reg_state(self, code: int, reason: str, expiration: int, response: str = "", host: str = "") -> None:
        host = host or (self._account.pbx.host if self._account else "")
        self._reg_activity[host] = now = time.monotonic()
        self._reg_due.pop(host, None)
        if code // 100 == 2 and expiration > 0 and self._gate is not None:
            self._gate.learn_registration(header(response, "via"))
        if code // 100 == 2 and expiration > 0:
            if not self._registered.get(host):
                log.info("%s: registered to %s (expires in %d s)", self._post, host, expiration)
            self._registered[host] = True
            # pjsip's regc refreshes delayBeforeRefreshSec before the expiry granted (never within 5 s).
            self._reg_due[host] = now + max(MIN_REFRESH, expiration - self._before_expiry)
            self._emit(ev.Registered(host))
        elif code // 100 == 2:
            self._registered[host] = False
            log.info("%s: unregistered from %s", self._post, host)
            self._emit(ev.Unregistered("unregistered", host))
        else:
            was, self._registered[host] = self._registered.get(host, False), False
            log.warning("%s: registration to %s failed: %d %s", self._post, host, code, reason)
            if was:
                self._emit(ev.Unregistered(f"{code} {reason}", host))
            self._emit(ev.RegistrationFailed(reason, code or None, host))


def header(message: str, name: str) -> str:
    """The first ``name`` header (compact form too) of a SIP message's text, or ""."""
    compact = {"via": "v", "contact": "m"}.get(name)
    for line in message.split("\r\n\r\n", 1)[0].split("\r\n")[1:]:
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in (name, compact):
            return value.strip()
    return ""

