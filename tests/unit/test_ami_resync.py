"""The AMI follower right after Asterisk starts: a resync refused while modules load is retried quickly (and at
once on FullyBooted), live events during a resync are never undone by it, and alarm calls the sidecar never
saw join the queue (it was not logged in yet, or no desk could take the call) still get their incident.

Asterisk's answers are replayed from what Asterisk 22 sent on this machine (CoreShowChannel of a queued, an
answered and an overflowed alarm call; the error text of an action whose module is not loaded yet)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest
from panoramisk.message import Message

from sip_refuge.config import Site
from sip_refuge.sidecar.ami import AmiFollower, alarm_calls, flatten
from sip_refuge.sidecar.calls import CallTracker
from sip_refuge.sidecar.core import Hub

UNKNOWN = "Invalid/unknown command: {}. Use Action: ListCommands to show available commands."


def channel(name: str, uid: str, *, kind: str | None, app: str, data: str = "", bridge: str = "") -> Message:
    """A CoreShowChannel as Asterisk 22 sends it; panoramisk gives repeated ChanVariable lines as a list."""
    fields: dict[str, Any] = {"Event": "CoreShowChannel", "Channel": name, "Uniqueid": uid, "Application": app,
                              "ApplicationData": data, "BridgeId": bridge, "ChannelState": "6"}
    if kind is not None:
        fields["ChanVariable"] = [f"REFUGE_POST={name.split('/')[1].rsplit('-', 1)[0]}", f"REFUGE_KIND={kind}"]
    return Message(fields)


QUEUED = channel("PJSIP/sutton-market-00000000", "1796161462.0", kind="alarm", app="Queue",
                 data="refuge,r,,,30")
ANSWERED = channel("PJSIP/idlewells-00000003", "1796161462.3", kind="alarm", app="Queue", data="refuge,r,,,30",
                   bridge="aa4e3ce3-6644-4b4a-9d16-52891b7fe7aa")
ANSWERING_DESK = channel("PJSIP/desk-1-00000004", "1796161462.4", kind="alarm", app="AppQueue",
                         data="(Outgoing Line)", bridge="aa4e3ce3-6644-4b4a-9d16-52891b7fe7aa")
OVERFLOWED = channel("PJSIP/kirkby-bus-station-00000005", "1796161462.5", kind="overflow", app="Echo")
CALLBACK = channel("PJSIP/idlewells-00000006", "1796161462.6", kind="callback", app="AppDial")


class BootingAsterisk:
    """Answers actions like an Asterisk still loading its modules: CoreShowChannels is an unknown command for
    the first ``booting`` attempts. ``during`` runs while the channel list is read (live events meanwhile)."""

    def __init__(self, channels: list[Message], booting: int = 0,
                 during: Callable[[], None] | None = None) -> None:
        self.channels, self.booting, self.during = channels, booting, during
        self.actions: list[str] = []

    async def send_action(self, action: dict[str, str]) -> list[Message] | Message:
        name = action["Action"]
        self.actions.append(name)
        if name == "PJSIPShowContacts":  # the sidecar's AMI user has write=reporting only
            return Message({"Response": "Error", "Message": "Permission denied"})
        if name == "DeviceStateList":
            return [Message({"Response": "Success", "EventList": "start"}),
                    Message({"Event": "DeviceStateChange", "Device": "PJSIP/sutton-market", "State": "NOT_INUSE"}),
                    Message({"Event": "DeviceStateListComplete", "EventList": "Complete"})]
        if name == "CoreShowChannels":
            if self.booting:
                self.booting -= 1
                return Message({"Response": "Error", "Message": UNKNOWN.format(name)})
            if self.during is not None:
                self.during()
            return [Message({"Response": "Success", "EventList": "start"}), *self.channels,
                    Message({"Event": "CoreShowChannelsComplete", "EventList": "Complete"})]
        raise AssertionError(f"unexpected action {name}")


def follower(site: Site, hub: Hub, resynced: asyncio.Event | None = None) -> AmiFollower:
    def on_resync(snap: Any) -> None:
        hub.recorder.on_resync(snap)
        if resynced is not None:
            resynced.set()

    return AmiFollower(site.pbx.ami, site.queue.name, on_event=hub.recorder.on_ami_event, on_resync=on_resync,
                       on_link=hub.link.on_link, on_error=hub.link.on_error)


def run(coroutine: Any) -> None:
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(coroutine, timeout=20))
    finally:
        loop.close()


def test_channel_variables_become_fields() -> None:
    event = flatten(QUEUED)
    assert event["ChanVariable(REFUGE_KIND)"] == "alarm" and event["ChanVariable(REFUGE_POST)"] == "sutton-market"
    assert "ChanVariable" not in event
    single = flatten(Message({"Event": "Newstate", "ChanVariable": "REFUGE_KIND=overflow"}))
    assert single["ChanVariable(REFUGE_KIND)"] == "overflow"


def test_a_resync_refused_while_asterisk_boots_is_retried_quickly_then_at_fully_booted(
        site: Site, hub: Hub, caplog: pytest.LogCaptureFixture) -> None:
    resynced = asyncio.Event()
    ami = follower(site, hub, resynced)
    asterisk = BootingAsterisk([QUEUED], booting=3)

    async def scenario() -> None:
        ami.connected = True
        await ami._resync(asterisk)  # type: ignore[arg-type]
        while asterisk.actions.count("CoreShowChannels") < 3 or ami._resync_retry is None:
            await asyncio.sleep(0.01)  # the first two retries come after 0.25 s and 0.5 s
        assert not resynced.is_set() and asterisk.booting == 0
        assert ami._resync_retry is not None  # the next one would wait 1 s...
        ami._event(asterisk, Message({"Event": "FullyBooted", "Status": "Fully Booted", "Uptime": "1"}))
        await resynced.wait()  # ...but Asterisk said it is up: at once

    with caplog.at_level(logging.WARNING, logger="sip_refuge.sidecar.ami"):
        run(scenario())
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert [m.split("retrying in ")[1].split(" s")[0] for m in retries] == ["0.25", "0.5", "1"]
    assert "AMI resync failed (Invalid/unknown command: CoreShowChannels" in caplog.text
    assert "Traceback" not in caplog.text
    assert ami.last_error is None and hub.link.status().last_error is None
    [call] = hub.views.live_calls()
    assert call["post"] == "sutton-market" and call["state"] == "queued"


def test_a_call_that_joins_while_the_resync_reads_is_not_closed_by_it(site: Site, hub: Hub) -> None:
    ami = follower(site, hub)
    join = Message({"Event": "QueueCallerJoin", "Queue": "refuge", "Channel": "PJSIP/idlewells-0000000a",
                    "Uniqueid": "1796161470.10", "Position": "1"})
    # The channel list is read before the call exists; its join arrives before the resync is applied.
    asterisk = BootingAsterisk([], during=lambda: ami._event(asterisk, join))
    ami.connected = True
    run(ami._resync(asterisk))  # type: ignore[arg-type]
    assert [c["post"] for c in hub.views.live_calls()] == ["idlewells"]
    assert [t.kind for t in hub.store.incidents()[0].timeline] == ["queued"]


def test_a_call_that_hangs_up_while_the_resync_reads_is_not_opened_by_it(site: Site, hub: Hub) -> None:
    ami = follower(site, hub)
    hangup = Message({"Event": "Hangup", "Channel": QUEUED["Channel"], "Uniqueid": QUEUED["Uniqueid"]})
    asterisk = BootingAsterisk([QUEUED], during=lambda: ami._event(asterisk, hangup))
    ami.connected = True
    run(ami._resync(asterisk))  # type: ignore[arg-type]
    assert hub.views.live_calls() == [] and hub.store.incidents() == []


def test_the_resync_finds_alarm_calls_it_never_saw_join(site: Site, hub: Hub) -> None:
    """Calls placed before the sidecar logged in: waiting, already answered, already overflowed."""
    ami = follower(site, hub)
    ami.connected = True
    run(ami._resync(BootingAsterisk([QUEUED, ANSWERED, ANSWERING_DESK, OVERFLOWED, CALLBACK])))  # type: ignore[arg-type]
    incidents = {i.post_id: i for i in hub.store.incidents()}
    assert set(incidents) == {"sutton-market", "idlewells", "kirkby-bus-station"}  # no desk, no call-back
    assert incidents["sutton-market"].state == "queued"
    assert (incidents["idlewells"].state, incidents["idlewells"].answered_by) == ("answered", "desk-1")
    # Its caller is still connected, in the overflow route: live, not over.
    assert (incidents["kirkby-bus-station"].state, incidents["kirkby-bus-station"].outcome) == ("overflowed", None)
    live = {c["post"]: c["state"] for c in hub.views.live_calls()}
    assert live == {"idlewells": "answered", "sutton-market": "queued", "kirkby-bus-station": "overflowed"}


def test_alarm_channels_are_told_from_desks_and_call_backs() -> None:
    found = alarm_calls([flatten(c) for c in (QUEUED, ANSWERED, ANSWERING_DESK, OVERFLOWED, CALLBACK)], "refuge")
    assert [c["Channel"] for c in found] == [QUEUED["Channel"], ANSWERED["Channel"], ANSWERING_DESK["Channel"],
                                             OVERFLOWED["Channel"]]
    assert found[1]["Desk"] == ANSWERING_DESK["Channel"] and "Desk" not in found[0]


def test_a_live_alarm_that_never_joined_the_queue_gets_its_incident(site: Site) -> None:
    """No desk could take it (at boot their state is not known yet): Asterisk sends it to the overflow route
    without any queue event. The overflow's channel events show it; so does its hang-up."""
    tracker = CallTracker(site)
    answered_by_overflow = flatten(Message({"Event": "Newstate", "Channel": "PJSIP/idlewells-00000000",
                                            "Uniqueid": "1796161509.0", "ChannelStateDesc": "Up",
                                            "ChanVariable": ["REFUGE_POST=idlewells", "REFUGE_KIND=overflow"]}))
    queued, unanswered, reached = tracker.handle({**answered_by_overflow, "ChannelState": "6"}, 10.0)
    assert (queued.type, queued.post.id, queued.detail["late"]) == ("call.queued", "idlewells", True)
    assert unanswered.type == "call.unanswered" and unanswered.detail["outcome"] == "overflowed"
    assert reached.type == "call.overflow_answered"
    assert [c.post.id for c in tracker.live_calls()] == ["idlewells"]  # live while its caller is connected
    [ended] = tracker.handle({**answered_by_overflow, "Event": "Hangup"}, 40.0)
    assert ended.type == "call.ended" and ended.detail["outcome"] == "overflowed"
    # Seen only when it hangs up (the sidecar logged in late): still recorded, as abandoned.
    hangup = flatten(Message({"Event": "Hangup", "Channel": "PJSIP/sutton-market-00000001",
                              "Uniqueid": "1796161509.1", "ChanVariable": ["REFUGE_KIND=alarm"]}))
    assert [o.type for o in tracker.handle(hangup, 50.0)] == ["call.queued", "call.unanswered"]
    # A desk's channel carries the same variables: it is no alarm of its own.
    desk = flatten(Message({"Event": "Newstate", "Channel": "PJSIP/desk-1-00000002", "Uniqueid": "1796161509.2",
                            "ChanVariable": ["REFUGE_POST=idlewells", "REFUGE_KIND=alarm"]}))
    assert tracker.handle(desk, 60.0) == []
