"""Follow Asterisk over AMI (panoramisk) in one thread that owns an asyncio loop.

The follower knows nothing about incidents: it hands every AMI event, and after each (re)login a
snapshot of live state (resync), to callbacks that the sidecar's runner provides. panoramisk
reconnects by itself; we log in read-only with the site's AMI user on loopback.

Right after Asterisk starts, the sidecar may log in before every module is loaded ("Invalid/unknown
command: QueueStatus"). A failed resync is retried quickly (RESYNC_FIRST, doubling up to RESYNC_RETRY) and
at once when Asterisk says FullyBooted; live events keep flowing to the hub meanwhile. A resync reads its
lists while events go on: the snapshot names the calls events showed during the reading (``fresh``: never
closed by it) and the channels that hung up meanwhile (``gone``: never opened by it).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from panoramisk import Manager

from sip_refuge.config.model import Ami
from sip_refuge.errors import SidecarError

log = logging.getLogger(__name__)

# Only the events the sidecar uses; Asterisk still sends the rest of the read classes, we drop them early.
# Newstate and DialBegin show an alarm call that never joined the queue (no desk could take it at that
# moment: it went straight to the overflow route), so it still gets its incident. HangupRequest and
# SoftHangupRequest tell a caller who hangs up while queued from one whose wait ran out (both leave the queue
# with QueueCallerAbandon in Asterisk 22).
FOLLOWED = ("QueueCallerJoin", "QueueCallerLeave", "QueueCallerAbandon", "AgentCalled", "AgentConnect",
            "AgentComplete", "AgentRingNoAnswer", "DialBegin", "DialEnd", "Newstate", "HangupRequest",
            "SoftHangupRequest", "Hangup", "ContactStatus", "FullyBooted", "Shutdown")


@dataclass
class Snapshot:
    """Live state read after (re)login, so nothing from an outage stays wrong."""

    # None: unknown, because the AMI user may not run the action (it needs write=system,reporting).
    contacts: dict[str, str] | None = field(default_factory=dict)  # endpoint -> Reachable/Unreachable/...
    contact_uris: dict[str, dict[str, str]] = field(default_factory=dict)  # endpoint -> contact URI -> status
    channels: set[str] | None = field(default_factory=set)  # Uniqueid of every live channel
    queue_entries: list[dict[str, str]] = field(default_factory=list)  # QueueEntry events of our queue
    # Live alarm calls of posts (CoreShowChannel, flattened), each with "Desk" when bridged to a desk.
    alarm_channels: list[dict[str, str]] = field(default_factory=list)
    # Asterisk restarted since the last login (from FullyBooted's Uptime): every channel we knew is gone.
    restarted: bool = False
    fresh: set[str] = field(default_factory=set)  # Uniqueids live events named while the lists were read
    gone: set[str] = field(default_factory=set)  # Uniqueids that hung up while the lists were read


RESYNC_FIRST = 0.25  # seconds before retrying a failed resync; doubles each time, up to RESYNC_RETRY
RESYNC_RETRY = 5.0


class AmiRefused(SidecarError):
    """Asterisk answered an action with ``Response: Error``: the AMI user lacks the permission, or
    (``unknown``) the module that provides the action is not loaded (yet)."""

    @property
    def unknown(self) -> bool:
        return "unknown command" in str(self).lower()


def flatten(message: Mapping[str, Any]) -> dict[str, str]:
    """An AMI message as text fields. Repeated ``ChanVariable: NAME=value`` lines become
    ``ChanVariable(NAME)`` keys (also ``DestChanVariable``), which is how Asterisk's docs name them."""
    out: dict[str, str] = {}
    for key, value in message.items():
        key = str(key)
        if key in ("ChanVariable", "DestChanVariable"):
            for item in value if isinstance(value, list) else [value]:
                name, _, var = str(item).partition("=")
                out[f"{key}({name})"] = var
        else:
            out[key] = str(value)
    return out


class AmiFollower:
    def __init__(self, ami: Ami, queue: str, *, on_event: Callable[[Mapping[str, str]], None],
                 on_resync: Callable[[Snapshot], None], on_link: Callable[[bool], None],
                 on_error: Callable[[str | None], None] | None = None,
                 reconnect: float = 1.0, resync_retry: float = RESYNC_RETRY, name: str = "ami") -> None:
        """``name``: of its thread (``ami``; ``ami-secondary`` for the secondary PBX of a pair)."""
        self.ami, self.queue = ami, queue
        self.on_event, self.on_resync, self.on_link, self.on_error = on_event, on_resync, on_link, on_error
        self.reconnect = reconnect
        self.resync_retry = resync_retry
        self.name = name
        self.connected = False
        self.last_error: str | None = None  # why the last login or resync failed; None once one succeeds
        self.resynced_at: float | None = None  # time.time() of the last resync applied
        self._login_refusals: set[str] = set()  # reasons already logged since the last good login
        self._resync_failures = 0  # failed resyncs in a row on this link
        self._resync_retry: asyncio.TimerHandle | None = None
        self._reading: Snapshot | None = None  # the resync whose lists are being read
        self._loop: asyncio.AbstractEventLoop | None = None
        self._manager: Manager | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._booted_at: float | None = None  # wall-clock time Asterisk started, as of the last FullyBooted
        self._restarted = False
        self._refused: set[str] = set()  # actions already reported as refused (warn once)

    # -- lifecycle (called from the runner's thread) ------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        self._started.wait(5)

    def stop(self) -> None:
        loop = self._loop
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(self._shutdown)
        if self._thread is not None:
            self._thread.join(10)

    # -- the AMI thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        manager = Manager(loop=loop, host=self.ami.host, port=self.ami.port, username=self.ami.username,
                          secret=self.ami.secret.read(), ping_delay=5, ping_interval=5,
                          reconnect_timeout=max(1, int(self.reconnect)), log=log,
                          on_connect=self._connected, on_login=self._logged_in, on_disconnect=self._lost)
        for name in FOLLOWED:
            manager.register_event(name, self._event)
        self._manager = manager
        manager.connect()
        self._started.set()
        try:
            loop.run_forever()
        finally:
            manager.close()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _shutdown(self) -> None:
        if self._manager is not None:
            # No reconnect after an intended stop: panoramisk schedules one from connection_lost.
            self._manager.connection_lost = lambda exc: None
            self._manager.close()
        assert self._loop is not None
        self._loop.stop()

    def _event(self, manager: Manager, message: Any) -> None:
        event = flatten(message)
        name, uid = event.get("Event"), event.get("Uniqueid")
        if name == "FullyBooted":
            self._note_boot(message)
            if self._resync_retry is not None:  # every module is loaded now: retry the failed resync at once
                self._cancel_resync_retry()
                asyncio.ensure_future(self._resync(manager))
        if self._reading is not None and uid:
            (self._reading.gone if name == "Hangup" else self._reading.fresh).add(uid)
        try:
            self.on_event(event)
        except Exception:  # noqa: BLE001 - thread boundary: one bad event must not stop following calls
            log.exception("AMI event %s could not be handled", name)

    def _connected(self, manager: Manager) -> None:
        """TCP is up and panoramisk has sent Login: watch its answer, which panoramisk drops when it fails."""
        future = getattr(manager, "authenticated_future", None)
        if future is not None:
            future.add_done_callback(self._login_answered)

    def _login_answered(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled():
            return
        try:
            response = future.result()
        except Exception as exc:  # noqa: BLE001 - whatever ended the Login action is the reason
            reason = str(exc) or type(exc).__name__
        else:
            if getattr(response, "success", False):
                return
            reason = str(response.get("Message") or "no reason given") if hasattr(response, "get") \
                else str(response)
        self._login_refused(reason)

    def _login_refused(self, reason: str) -> None:
        """Asterisk refused the login (it then drops the connection and panoramisk retries)."""
        message = f"AMI login as {self.ami.username} refused: {reason}"
        if reason not in self._login_refusals:
            self._login_refusals.add(reason)
            log.error("%s", message)
        self._set_error(message)

    def _set_error(self, message: str | None) -> None:
        if message == self.last_error:
            return
        self.last_error = message
        if self.on_error is not None:
            try:
                self.on_error(message)
            except Exception:  # noqa: BLE001 - thread boundary
                log.exception("AMI error could not be reported")

    def _logged_in(self, manager: Manager) -> None:
        log.info("AMI connected to %s:%s as %s", self.ami.host, self.ami.port, self.ami.username)
        self.connected = True
        self._login_refusals.clear()
        self._resync_failures = 0
        self.on_link(True)
        self._cancel_resync_retry()
        asyncio.ensure_future(self._resync(manager))

    def _lost(self, manager: Manager, exc: Exception | None) -> None:
        if self.connected:
            log.warning("AMI connection lost (%s); reconnecting", exc or "closed")
        self.connected = False
        self._cancel_resync_retry()  # the next login resyncs anyway
        self.on_link(False)

    def _cancel_resync_retry(self) -> None:
        if self._resync_retry is not None:
            self._resync_retry.cancel()
            self._resync_retry = None

    def _resync_failed(self, manager: Manager, snap: Snapshot, what: str, trace: bool = True) -> None:
        """Retry a failed resync soon, then less often, while the link stays up (a new login resyncs anyway)."""
        self._restarted = self._restarted or snap.restarted  # the retry must still close every old call
        self._resync_failures += 1
        delay = min(self.resync_retry, RESYNC_FIRST * 2 ** (self._resync_failures - 1))
        if self._resync_failures == 1:
            log.warning("AMI resync %s; retrying in %g s, then up to every %g s (live events are followed "
                        "meanwhile)", what, delay, self.resync_retry, exc_info=trace)
        else:
            log.warning("AMI resync %s again (%d in a row); retrying in %g s", what, self._resync_failures, delay,
                        exc_info=trace)
        self._set_error(f"AMI resync {what}")
        if not self.connected:
            return
        loop = asyncio.get_running_loop()
        self._cancel_resync_retry()
        self._resync_retry = loop.call_later(delay, self._retry_resync, manager)

    def _retry_resync(self, manager: Manager) -> None:
        self._resync_retry = None
        if self.connected:
            asyncio.ensure_future(self._resync(manager))

    def _note_boot(self, message: Any) -> None:
        """Asterisk sends FullyBooted right after each login; its Uptime tells whether Asterisk restarted."""
        try:
            booted_at = time.time() - float(message.get("Uptime"))
        except (TypeError, ValueError):
            return
        # Uptime has whole seconds: a boot time that moved by more than a few seconds is a new Asterisk.
        if self._booted_at is not None and booted_at - self._booted_at > 5:
            self._restarted = True
        self._booted_at = booted_at

    async def _resync(self, manager: Manager) -> None:
        snap = Snapshot(restarted=self._restarted)
        self._restarted = False
        self._reading = snap
        try:
            contacts = await self._optional(manager, {"Action": "PJSIPShowContacts"}, "ContactList")
            if contacts is None:
                snap.contacts = await self._device_states(manager)
            for m in contacts or ():
                endpoint, status = str(m.get("Endpoint") or m.get("Aor")), str(m.get("Status"))
                snap.contact_uris.setdefault(endpoint, {})[str(m.get("Uri"))] = status
                if snap.contacts is not None and snap.contacts.get(endpoint) != "Reachable":
                    snap.contacts[endpoint] = status  # a post with any reachable contact is reachable
            channels = await self._optional(manager, {"Action": "CoreShowChannels"}, "CoreShowChannel")
            if channels is None:
                # Without the channel list, the queue's own list is the only way to find waiting callers.
                for msg in await self._list(manager, {"Action": "QueueStatus", "Queue": self.queue}):
                    if msg.get("Event") == "QueueEntry":
                        snap.queue_entries.append(flatten(msg))
            else:
                listed = [flatten(m) for m in channels]
                snap.channels = {c.get("Uniqueid", "") for c in listed}
                snap.alarm_channels = alarm_calls(listed, self.queue)
        except Exception as exc:  # noqa: BLE001 - thread boundary: a failed resync is retried (_resync_failed)
            self._stop_reading(snap)
            refused = isinstance(exc, AmiRefused)  # Asterisk's own answer says it all: no traceback
            self._resync_failed(manager, snap, f"failed ({exc})" if refused else "failed", trace=not refused)
            return
        self._stop_reading(snap)
        log.info("AMI resync: %s contacts, %s channels, %d alarm calls%s",
                 "?" if snap.contacts is None else len(snap.contacts),
                 "?" if snap.channels is None else len(snap.channels),
                 len(snap.alarm_channels) + len(snap.queue_entries), " (Asterisk restarted)" if snap.restarted else "")
        try:
            self.on_resync(snap)
        except Exception:  # noqa: BLE001 - thread boundary
            self._resync_failed(manager, snap, "could not be applied")
            return
        self._resync_failures = 0
        self.resynced_at = time.time()
        self._set_error(None)

    def _stop_reading(self, snap: Snapshot) -> None:
        if self._reading is snap:  # a resync of a newer login may have started meanwhile
            self._reading = None

    async def _device_states(self, manager: Manager) -> dict[str, str] | None:
        """Reachability from device states, for a user that may only run reporting actions.

        PJSIPShowContacts needs write=system (which also allows reloads); DeviceStateList needs only
        write=reporting. A PJSIP device is UNAVAILABLE exactly when none of its contacts is reachable.
        """
        states = await self._optional(manager, {"Action": "DeviceStateList"}, "DeviceStateChange")
        if states is None:
            return None
        out: dict[str, str] = {}
        for m in states:
            device, state = str(m.get("Device", "")), str(m.get("State", "")).upper()
            if device.startswith("PJSIP/") and state not in ("UNKNOWN", "INVALID"):
                out[device.removeprefix("PJSIP/")] = "Unreachable" if state == "UNAVAILABLE" else "Reachable"
        return out

    async def _optional(self, manager: Manager, action: dict[str, str], event: str) -> list[Any] | None:
        """The ``event`` messages of a list action, or None when this AMI user may not run it."""
        try:
            return [m for m in await self._list(manager, action) if m.get("Event") == event]
        except AmiRefused as exc:
            if exc.unknown:
                raise  # its module is not loaded yet (Asterisk is booting): the resync is retried
            if action["Action"] not in self._refused:
                self._refused.add(action["Action"])
                log.info("AMI user %s may not run %s (%s); using what write=reporting allows",
                         self.ami.username, action["Action"], exc)
            return None

    @staticmethod
    async def _list(manager: Manager, action: dict[str, str]) -> list[Any]:
        # No as_list=True: panoramisk then waits for a list that an error response never starts (a timeout).
        result = await asyncio.wait_for(manager.send_action(action), timeout=10)
        messages = list(result) if isinstance(result, list) else [result]
        if messages and str(messages[0].get("Response", "")).lower() == "error":
            raise AmiRefused(str(messages[0].get("Message") or "error"))
        return messages


def alarm_calls(channels: list[dict[str, str]], queue: str) -> list[dict[str, str]]:
    """The channels (CoreShowChannel, flattened) of refuge alarm calls: in our queue, or marked by the dialplan
    (``REFUGE_KIND`` alarm or overflow). A desk in the same bridge is added as ``Desk``: that call is answered.
    Desk channels inherit the variables too; the tracker keeps only posts' channels."""
    bridged: dict[str, list[str]] = {}
    for c in channels:
        if c.get("BridgeId"):
            bridged.setdefault(c["BridgeId"], []).append(c.get("Channel", ""))
    out = []
    for c in channels:
        in_queue = c.get("Application") == "Queue" and c.get("ApplicationData", "").split(",")[0] == queue
        if not in_queue and c.get("ChanVariable(REFUGE_KIND)") not in ("alarm", "overflow"):
            continue
        others = [ch for ch in bridged.get(c.get("BridgeId", ""), []) if ch != c.get("Channel")]
        out.append({**c, **({"Desk": others[0]} if others else {})})
    return out
