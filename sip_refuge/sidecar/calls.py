"""Turn Asterisk's AMI events into refuge incidents and post reachability, without any I/O.

The AMI connection (panoramisk) only feeds events in; this tracker decides what they mean, so the
whole mapping is unit-tested with explicit times. Every refuge call is keyed by the caller channel's
``Uniqueid``: queue events carry it as ``Uniqueid`` and ``Hangup`` carries it for the caller channel.

A call that leaves the queue unanswered is one of two things, and Asterisk 22 reports both the same way
(``QueueCallerAbandon`` then ``QueueCallerLeave``: app_queue records a timeout as abandoned too):
- the caller hung up while waiting: Asterisk reported the hang-up request (``HangupRequest`` or
  ``SoftHangupRequest`` of the caller's channel) *before* the abandon. The call is ``abandoned`` and over.
- ``queue.max_wait`` passed, or no desk can answer: no hang-up came first, and the dialplan sends the caller,
  still connected, to the overflow route. The call is ``overflowed``, and stays live (on the pages, in
  ``/api/v1/posts``) until the caller's channel hangs up; then ``call.ended`` closes it.
The event orders are in tests/unit/test_calls.py, as a real Asterisk 22 sent them.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field

from sip_refuge.config.model import PRIMARY, Desk, Post, Site

log = logging.getLogger(__name__)

REACHABLE = ("Reachable", "Created", "Updated", "NonQualified")  # ContactStatus values of a usable contact
ALARM_KINDS = ("alarm", "overflow")  # REFUGE_KIND of a post's alarm call (the dialplan sets it)
HANGING_UP = ("HangupRequest", "SoftHangupRequest")  # the caller (or Asterisk) asked the channel to hang up
UP = "6"  # ChannelState of an answered channel
_ENDPOINT = re.compile(r"^PJSIP/(?P<name>[a-z0-9][a-z0-9-]*?)(?:-[0-9a-f]{8})?$")

# Occurrences the recorder keeps in the incident's timeline (and the live view) but sends to no CCTV target.
CALL_RUNG = "call.rung"  # the queue rang a desk
CALL_REQUEUED = "call.requeued"  # an overflowed call is back in the queue (a site without an overflow route)
CALL_OVERFLOWED = "call.overflowed"  # that call overflowed again (call.unanswered is sent once per call)
CALL_OVERFLOW_ANSWERED = "call.overflow_answered"  # the overflow route answered the caller
# The post's alarm came back through the other PBX of the pair while the one that carried it was down: the same
# incident goes on with a new leg (queued again, until a desk answers it there).
CALL_MOVED = "call.moved"
INTERNAL = frozenset({CALL_RUNG, CALL_REQUEUED, CALL_OVERFLOWED, CALL_OVERFLOW_ANSWERED, CALL_MOVED})


def endpoint_of(channel: str) -> str | None:
    """``PJSIP/sutton-market-0000002a`` -> ``sutton-market`` (also bare interfaces like ``PJSIP/desk-1``)."""
    match = _ENDPOINT.match(channel or "")
    return match.group("name") if match else None


@dataclass(frozen=True)
class Occurrence:
    """Something the sidecar must store, and (unless INTERNAL) tell the CCTV targets (spec section 6)."""

    # call.queued | call.answered | call.ended | call.unanswered | post.offline | post.online, or INTERNAL
    type: str
    post: Post
    incident: str | None = None
    desk: Desk | None = None
    detail: dict[str, object] = field(default_factory=dict)


@dataclass
class Call:
    incident: str
    post: Post
    uniqueid: str
    queued_at: float
    rung: list[str] = field(default_factory=list)
    answered_by: Desk | None = None
    answered_at: float | None = None
    answering: bool = False  # a desk picked up (DialEnd ANSWER): QueueCallerLeave then AgentConnect follow
    hanging_up: bool = False  # the caller's channel was asked to hang up: leaving the queue now is abandoning
    overflowed_at: float | None = None  # left the queue unanswered and went on to the overflow route
    overflows: int = 0
    overflow_answered: bool = False
    outcome: str | None = None  # once over: ended (a desk answered) | overflowed | abandoned
    pbx: str = PRIMARY  # the PBX of the pair carrying this leg of the call

    @property
    def state(self) -> str:
        """queued | answered | overflowed while live; the outcome once over."""
        if self.outcome is not None:
            return self.outcome
        if self.answered_by is not None:
            return "answered"
        return "overflowed" if self.overflowed_at is not None else "queued"


@dataclass
class Reach:
    reachable: bool | None = None  # None until Asterisk told us
    # Contact URI -> reachable. A re-registering post (new port) first gets its new contact, and only then is
    # its old, dead contact removed: the post is reachable while any of its contacts is.
    contacts: dict[str, bool] = field(default_factory=dict)
    unreachable_since: float | None = None
    reported_offline: bool = False


class CallTracker:
    def __init__(self, site: Site, *, offline_grace: float | None = None) -> None:
        self.site = site
        self.posts = {p.id: p for p in site.posts}
        self.desks = {d.id: d for d in site.desks}
        self.grace = offline_grace if offline_grace is not None else (site.sidecar.offline_grace if site.sidecar else 30)
        self.calls: dict[str, Call] = {}
        self.reach: dict[str, Reach] = {p: Reach() for p in self.posts}
        self.down: set[str] = set()  # PBXs of the pair whose AMI link is down: their calls are in doubt
        self.pair = len(site.pbx.roles) > 1

    # -- queries ---------------------------------------------------------------------------------
    def live_calls(self) -> list[Call]:
        """Calls whose caller is still connected: queued, answered, or overflowed (to the overflow route)."""
        return [c for c in self.calls.values() if c.outcome is None]

    def is_online(self, post_id: str) -> bool | None:
        return self.reach[post_id].reachable

    # -- AMI events ------------------------------------------------------------------------------
    def handle(self, event: Mapping[str, str], now: float) -> list[Occurrence]:
        name = event.get("Event", "")
        if "Queue" in event and event["Queue"] != self.site.queue.name:
            return []  # another queue (a backup queue as the overflow route, say): its agents are not our desks
        out = self.discover(event, now) if name not in ("QueueCallerJoin", *HANGING_UP) else []
        handler = getattr(self, f"_on_{name}", None)
        if handler is not None:
            out += handler(event, now)
        return self._with_pbx(out, event.get("Pbx") or PRIMARY)

    def discover(self, e: Mapping[str, str], now: float) -> list[Occurrence]:
        """Open the incident of a post's alarm call this tracker has not seen join the queue: the sidecar was
        not logged in to AMI then (Asterisk was booting), or it never joined (no desk could take it at that
        moment, so it went straight to the overflow route). ``e`` is any event or CoreShowChannel entry of
        the caller's channel; with ``Desk`` (a resync found it bridged to that desk) the call is answered."""
        uid = e.get("Uniqueid", "")
        post = self.posts.get(endpoint_of(e.get("Channel", "")) or "")
        kind = e.get("ChanVariable(REFUGE_KIND)")
        in_queue = e.get("Application") == "Queue" and e.get("ApplicationData", "").split(",")[0] == self.site.queue.name
        if post is None or not uid or uid in self.calls or not (in_queue or kind in ALARM_KINDS):
            return []
        out = self._on_QueueCallerJoin({**e, "Queue": self.site.queue.name}, now)
        out[0].detail["late"] = True  # found after it began: the "queued" time is when it was found
        call = self.calls[uid]
        desk = self.desks.get(endpoint_of(e.get("Desk", "")) or "")
        if desk is not None:
            call.answered_by, call.answered_at = desk, now
            log.info("post %s: found answered by %s", post.id, desk.id)
            out.append(Occurrence("call.answered", post, call.incident, desk, {"resync": True}))
        elif kind == "overflow" and not in_queue:
            out += self._overflow(call, now)
        return out

    def _on_QueueCallerJoin(self, e: Mapping[str, str], now: float) -> list[Occurrence]:
        post = self.posts.get(endpoint_of(e.get("Channel", "")) or "")
        uid = e.get("Uniqueid", "")
        if post is None or not uid:
            return []
        known = self.calls.get(uid)
        moved = self._moved(post, uid, e.get("Pbx") or PRIMARY, now) if known is None else None
        if moved is not None:
            return [moved]
        if known is not None:
            if known.outcome is None and known.overflowed_at is not None:
                # No overflow route: the dialplan put the alarm back in the queue. Desks may answer it yet.
                known.overflowed_at, known.answering, known.hanging_up = None, False, False
                log.info("post %s: overflowed call back in the queue (incident %s)", post.id, known.incident)
                return [Occurrence(CALL_REQUEUED, post, known.incident)]
            return []
        call = Call(str(uuid.uuid4()), post, uid, now, pbx=e.get("Pbx") or PRIMARY)
        self.calls[uid] = call
        log.info("post %s: call queued (incident %s)", post.id, call.incident)
        # The caller channel's Uniqueid is kept with the incident: a restarted sidecar finds the call by it.
        return [Occurrence("call.queued", post, call.incident, detail={"position": e.get("Position"), "uniqueid": uid})]

    def _moved(self, post: Post, uid: str, pbx: str, now: float) -> Occurrence | None:
        """The post's alarm joined the queue of ``pbx`` while its live call is on another PBX, one that is down:
        the post re-sent it (EN 81-28), so it is the same incident, now on ``pbx``."""
        old = next((c for c in self.calls.values() if c.post is post and c.outcome is None and c.pbx != pbx
                    and c.pbx in self.down), None)
        if old is None:
            return None
        del self.calls[old.uniqueid]
        self.calls[uid] = Call(old.incident, post, uid, old.queued_at, pbx=pbx)
        log.info("post %s: the alarm is back through the %s PBX, the %s being down (incident %s)", post.id, pbx,
                 old.pbx, old.incident)
        return Occurrence(CALL_MOVED, post, old.incident, detail={"from": old.pbx, "leg_uniqueid": uid,
                                                                  "was_answered_by": old.answered_by.id
                                                                  if old.answered_by else None})

    def pbx_link(self, pbx: str, up: bool) -> None:
        """The AMI link to ``pbx`` went up or down."""
        (self.down.discard if up else self.down.add)(pbx)

    def _on_AgentCalled(self, e: Mapping[str, str], now: float) -> list[Occurrence]:
        call = self.calls.get(e.get("Uniqueid", ""))
        desk = endpoint_of(e.get("Interface", "") or e.get("DestChannel", ""))
        if call is None or desk is None or call.outcome is not None:
            return []
        if desk not in call.rung:
            call.rung.append(desk)
        return [Occurrence(CALL_RUNG, call.post, call.incident, self.desks.get(desk), {"desk": desk})]

    def _on_DialEnd(self, e: Mapping[str, str], now: float) -> list[Occurrence]:
        # Asterisk reports an answer as DialEnd ANSWER, QueueCallerLeave, AgentConnect, in that order: the
        # leave in between is the caller going to the desk, not a timeout.
        call = self.calls.get(e.get("Uniqueid", ""))
        if call is not None and e.get("DialStatus") == "ANSWER" and call.overflowed_at is None:
            call.answering = True
        return []

    def _on_AgentConnect(self, e: Mapping[str, str], now: float) -> list[Occurrence]:
        call = self.calls.get(e.get("Uniqueid", ""))
        desk = self.desks.get(endpoint_of(e.get("Interface", "") or e.get("DestChannel", "")) or "")
        if call is None or call.answered_by is not None or call.outcome is not None:
            return []
        call.answered_by, call.answered_at = desk, now
        log.info("post %s: answered by %s", call.post.id, desk.id if desk else e.get("Interface"))
        return [Occurrence("call.answered", call.post, call.incident, desk,
                           {"wait_seconds": round(now - call.queued_at, 3), "member": e.get("MemberName")})]

    def _on_AgentComplete(self, e: Mapping[str, str], now: float) -> list[Occurrence]:
        call = self.calls.get(e.get("Uniqueid", ""))
        return self._end(call, now, "ended", {"reason": e.get("Reason")}) if call else []

    def _on_HangupRequest(self, e: Mapping[str, str], now: float) -> list[Occurrence]:
        call = self.calls.get(e.get("Uniqueid", ""))
        if call is not None:
            call.hanging_up = True
        return []

    _on_SoftHangupRequest = _on_HangupRequest

    def _on_QueueCallerAbandon(self, e: Mapping[str, str], now: float) -> list[Occurrence]:
        return self._left_queue(e.get("Uniqueid", ""), now)

    def _on_QueueCallerLeave(self, e: Mapping[str, str], now: float) -> list[Occurrence]:
        return self._left_queue(e.get("Uniqueid", ""), now)

    def _left_queue(self, uid: str, now: float) -> list[Occurrence]:
        call = self.calls.get(uid)
        if call is None or call.answering or call.answered_by is not None or call.outcome is not None \
                or call.overflowed_at is not None:
            return []  # answered (or answering), over, or already judged by the abandon before this leave
        if call.hanging_up:
            return self._end(call, now, "abandoned", {})
        return self._overflow(call, now)

    def _overflow(self, call: Call, now: float) -> list[Occurrence]:
        call.overflowed_at = now
        call.overflows += 1
        detail: dict[str, object] = {"outcome": "overflowed", "duration_seconds": round(now - call.queued_at, 3)}
        log.info("post %s: call overflowed, the caller goes on to the overflow route (incident %s)", call.post.id,
                 call.incident)
        kind = "call.unanswered" if call.overflows == 1 else CALL_OVERFLOWED
        return [Occurrence(kind, call.post, call.incident, None, detail)]

    def _on_Newstate(self, e: Mapping[str, str], now: float) -> list[Occurrence]:
        call = self.calls.get(e.get("Uniqueid", ""))
        if call is None or call.outcome is not None or call.overflowed_at is None or call.overflow_answered \
                or e.get("ChannelState") != UP:
            return []
        call.overflow_answered = True  # the caller's channel was answered in the overflow route
        return [Occurrence(CALL_OVERFLOW_ANSWERED, call.post, call.incident)]

    def _on_Hangup(self, e: Mapping[str, str], now: float) -> list[Occurrence]:
        call = self.calls.get(e.get("Uniqueid", ""))
        if call is None:
            return []
        out = self._end(call, now, "ended" if call.answered_by else "overflowed" if call.overflowed_at is not None
                        else "abandoned", {"cause": e.get("Cause-txt")})
        del self.calls[call.uniqueid]  # the caller channel is gone: nothing more will refer to it
        return out

    def _end(self, call: Call, now: float, outcome: str, detail: dict[str, object]) -> list[Occurrence]:
        """The call is over: ``ended`` (a desk answered), ``overflowed`` (its caller hung up in the overflow
        route) or ``abandoned`` (its caller hung up before anyone answered)."""
        if call.outcome is not None:
            return []
        call.outcome = outcome
        detail = {k: v for k, v in detail.items() if v is not None}
        detail["outcome"] = outcome
        detail["duration_seconds"] = round(now - call.queued_at, 3)
        kind = "call.unanswered" if outcome == "abandoned" else "call.ended"
        log.info("post %s: call %s (incident %s)", call.post.id, outcome, call.incident)
        return [Occurrence(kind, call.post, call.incident, call.answered_by, detail)]

    # -- reachability ----------------------------------------------------------------------------
    def _on_ContactStatus(self, e: Mapping[str, str], now: float) -> list[Occurrence]:
        post_id = e.get("EndpointName") or e.get("AOR") or ""
        if post_id not in self.posts:
            return []
        status, uri = e.get("ContactStatus", ""), e.get("URI", "")
        contacts = self.reach[post_id].contacts
        # A resync's summary (no address known) gives way to news of a real contact of that PBX.
        contacts.pop(summary_key(e.get("Pbx") or PRIMARY), None)
        if status in REACHABLE:
            contacts[uri] = True
        elif status == "Unreachable":
            contacts[uri] = False
        elif status == "Removed":
            contacts.pop(uri, None)
        else:
            return []
        return self.set_reachable(post_id, any(contacts.values()), now)

    def set_reachable(self, post_id: str, reachable: bool, now: float) -> list[Occurrence]:
        """Record reachability (from ContactStatus, or a resync after reconnecting to AMI)."""
        reach = self.reach[post_id]
        out: list[Occurrence] = []
        if reachable:
            if reach.reported_offline:
                out.append(Occurrence("post.online", self.posts[post_id]))
            reach.reachable, reach.unreachable_since, reach.reported_offline = True, None, False
        elif reach.unreachable_since is None:
            reach.reachable, reach.unreachable_since = False, now
        return out

    def tick(self, now: float) -> list[Occurrence]:
        """Raise ``post.offline`` once a post has been unreachable for the grace period."""
        out = []
        for post_id, reach in self.reach.items():
            if reach.unreachable_since is not None and not reach.reported_offline \
                    and now - reach.unreachable_since >= self.grace:
                reach.reported_offline = True
                log.warning("post %s: offline (unreachable for %.0f s)", post_id, now - reach.unreachable_since)
                out.append(Occurrence("post.offline", self.posts[post_id],
                                      detail={"since_seconds": round(now - reach.unreachable_since, 1)}))
        return out

    def next_deadline(self) -> float | None:
        pending = [r.unreachable_since + self.grace for r in self.reach.values()
                   if r.unreachable_since is not None and not r.reported_offline]
        return min(pending) if pending else None

    # -- after (re)connecting to AMI ---------------------------------------------------------------
    def adopt(self, incident: str, post_id: str, uniqueid: str, now: float, answered_by: str | None, *,
              overflowed: bool = False, pbx: str = PRIMARY) -> Call | None:
        """Follow again a call a previous sidecar process opened (from the store); ``resync`` then judges it."""
        if post_id not in self.posts or any(c.incident == incident for c in self.calls.values()):
            return None
        call = Call(incident, self.posts[post_id], uniqueid or f"unknown:{incident}", now,
                    answered_by=self.desks.get(answered_by or ""), pbx=pbx)
        call.answered_at = now if call.answered_by else None
        if overflowed and call.answered_by is None:
            call.overflowed_at, call.overflows = now, 1
        self.calls[call.uniqueid] = call
        return call

    def resync(self, now: float, contacts: Mapping[str, str] | None, channels: set[str] | None,
               queue_entries: Sequence[Mapping[str, str]], *, restarted: bool = False,
               contact_uris: Mapping[str, Mapping[str, str]] | None = None,
               alarm_channels: Sequence[Mapping[str, str]] = (), fresh: Set[str] = frozenset(),
               gone: Set[str] = frozenset(), pbx: str = PRIMARY) -> list[Occurrence]:
        """Correct everything an AMI outage may have left wrong.

        Calls whose caller channel is gone are closed; callers waiting in the queue that we never saw
        join become incidents; every post's reachability is taken from the contact list. ``contacts`` or
        ``channels`` is None when Asterisk would not list them (AMI permissions); then only a ``restarted``
        Asterisk, which has no channel from before, closes calls. ``contact_uris`` (endpoint -> URI -> status)
        lets later ContactStatus events of single contacts be weighed against the others. ``alarm_channels``
        are the live alarm calls (see ``discover``). The lists were read while events went on: a call that
        events named meanwhile (``fresh``) is not closed, and one that hung up meanwhile (``gone``) not opened.
        On a pair, ``pbx`` is the PBX the lists come from: only its calls and contacts are judged.
        """
        out: list[Occurrence] = []
        for call in list(self.calls.values()):
            if call.uniqueid in fresh or call.pbx != pbx:
                continue
            if (call.uniqueid not in channels) if channels is not None else restarted:
                out += self._end(call, now, "ended" if call.answered_by else "overflowed"
                                 if call.overflowed_at is not None else "abandoned", {"resync": True})
                del self.calls[call.uniqueid]
        for entry in queue_entries:
            if entry.get("Uniqueid") not in gone:
                out += self._on_QueueCallerJoin({**entry, "Event": "QueueCallerJoin", "Queue": self.site.queue.name,
                                                 "Pbx": pbx}, now)
        for channel in alarm_channels:
            if channel.get("Uniqueid") not in gone:
                out += self.discover({**channel, "Pbx": pbx}, now)
        if contacts is not None:
            for post_id in self.posts:
                uris = (contact_uris or {}).get(post_id, {summary_key(pbx): contacts.get(post_id, "Removed")})
                # The other PBX's contacts stand: a post is reachable while either PBX of a pair reaches it.
                kept = {uri: ok for uri, ok in self.reach[post_id].contacts.items() if _pbx_of_key(uri) != pbx}
                self.reach[post_id].contacts = kept | {uri: status in REACHABLE for uri, status in uris.items()}
                out += self.set_reachable(post_id, any(self.reach[post_id].contacts.values()), now)
        return self._with_pbx(out, pbx)

    def _with_pbx(self, occurrences: list[Occurrence], pbx: str) -> list[Occurrence]:
        """On a pair, each call occurrence says which PBX carried it (``pbx`` of events and timeline steps)."""
        if self.pair:
            for occ in occurrences:
                if occ.incident is not None:
                    occ.detail.setdefault("pbx", pbx)
        return occurrences


def summary_key(pbx: str) -> str:
    """The contact key of a resync that knew a post's status but no contact of it, on ``pbx``."""
    return "" if pbx == PRIMARY else f"{pbx}/"


def _pbx_of_key(key: str) -> str:
    head, sep, _ = key.partition("/")
    return head if sep and head.isalpha() else PRIMARY

