"""The record of an unanswered alarm against a real Asterisk 22, through the real sidecar, and its close-out.

The site's overflow route dials a backup centre: a raw SIP peer (tests/support/sipua.py) behind its own PJSIP
endpoint, added to a copy of the templates the way a PBX admin writes ``[refuge-overflow-route]``. The desks
are real SIP peers that ring and never answer, so ``queue.max_wait`` passes; Asterisk 22 then reports the
timeout as ``QueueCallerAbandon`` + ``QueueCallerLeave``, exactly as when a caller hangs up. The sidecar
runs as ``sip-refuge sidecar SITE`` (a subprocess) with a real Standard Webhooks receiver as its CCTV target.
"""

from __future__ import annotations

import csv
import io
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from sip_refuge.config import Site, load_site
from sip_refuge.config.secrets import init_secrets
from sip_refuge.pbx.asterisk import Asterisk, free_port
from tests.integration.conftest import EXAMPLE, desks_ready
from tests.support.metrics import Scrape
from tests.support.receivers import WebhookReceiver
from tests.support.sidecar import Sidecar, wait_until
from tests.support.sipua import IncomingCall, OutgoingCall, SipPeer
from tests.support.sites import rtp_range

pytestmark = pytest.mark.integration

MAX_WAIT, RING = 6, 5
TEMPLATES = Path(__file__).resolve().parents[2] / "asterisk" / "templates"


def overflow_templates(folder: Path, centre_port: int) -> Path:
    """The sandbox templates with an overflow route that dials the backup centre at ``centre_port``."""
    templates = folder / "templates"
    shutil.copytree(TEMPLATES, templates)
    pjsip = templates / "pjsip.conf.j2"
    pjsip.write_text(pjsip.read_text(encoding="utf-8") + f"""
; The backup centre the overflow route dials (a raw SIP peer of the test).
[overflow-centre]
type=endpoint
context=refuge-refused
disallow=all
allow=ulaw,alaw
aors=overflow-centre
direct_media=no

[overflow-centre]
type=aor
contact=sip:overflow@127.0.0.1:{centre_port}
""", encoding="utf-8")
    extensions = templates / "extensions.conf.j2"
    text = extensions.read_text(encoding="utf-8")
    start, end = text.index("[refuge-overflow-route]"), text.index("#include extensions_refuge.conf")
    extensions.write_text(text[:start] + """[refuge-overflow-route]
exten => {{ q.overflow }},1,NoOp(sip-refuge overflow to the backup centre for post ${REFUGE_POST})
 same => n,Dial(PJSIP/overflow-centre,60)
 same => n,Hangup()

""" + text[end:], encoding="utf-8")
    return templates


def write_site(folder: Path, hook_port: int) -> Path:
    data = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    pbx = data["pbx"]
    pbx.update(host="127.0.0.1", bind="127.0.0.1", sip_port=free_port(), transport="udp", qualify_frequency=5)
    pbx["rtp_start"], pbx["rtp_end"] = rtp_range()
    pbx["ami"]["port"] = free_port()
    data["site"]["reference_prefix"] = "KIR"
    data["queue"].update(max_wait=MAX_WAIT, ring_timeout=RING)
    data["sidecar"].update(listen=f"127.0.0.1:{free_port()}", database=str(folder / "sidecar.sqlite3"))
    data["cctv"] = [{"type": "webhook", "name": "vms-hook", "url": f"http://127.0.0.1:{hook_port}/hook",
                     "secret_file": "secrets/webhook.secret"}]
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    init_secrets(load_site(path, check_secrets=False))
    return path


@dataclass
class World:
    site: Site
    pbx: Asterisk
    sidecar: Sidecar
    receiver: WebhookReceiver
    centre: SipPeer
    posts: dict[str, SipPeer]
    desks: dict[str, SipPeer]
    token: str

    def events_of(self, incident: str) -> list[dict[str, Any]]:
        with self.receiver.cond:
            return [e for e in self.receiver.events if e["data"].get("incident") == incident]

    def wait_event(self, incident: str, kind: str, timeout: float = 20) -> dict[str, Any]:
        self.receiver.wait_for(lambda: any(e["type"] == kind for e in self.events_of(incident)), timeout, kind)
        return next(e for e in self.events_of(incident) if e["type"] == kind)

    def queued(self, post_id: str, known: set[str]) -> dict[str, Any]:
        """The call.queued of ``post_id``'s new incident (one not in ``known``)."""
        def new() -> dict[str, Any] | None:
            with self.receiver.cond:
                return next((e for e in self.receiver.events if e["type"] == "call.queued"
                             and e["data"]["post"]["id"] == post_id and e["data"]["incident"] not in known), None)
        return wait_until(new, 20, f"call.queued of {post_id}")

    def live(self, incident: str) -> dict[str, Any] | None:
        return next((c for c in self.sidecar.json("/api/v1/posts")["calls"] if c["incident"] == incident), None)

    def close(self, incident: str, body: dict[str, Any]) -> Any:
        return self.sidecar.session.post(f"{self.sidecar.url}/api/v1/incidents/{incident}/close", json=body,
                                         headers={"Authorization": f"Bearer {self.token}"}, timeout=10)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    folder = tmp_path_factory.mktemp("overflow")
    hook_port = free_port()
    site_file = write_site(folder, hook_port)
    site = load_site(site_file)
    assert site.sidecar is not None
    receiver = WebhookReceiver((folder / "secrets" / "webhook.secret").read_text().strip())
    receiver.port = hook_port
    receiver.start()
    centre = SipPeer("overflow", "", (site.pbx.host, site.pbx.sip_port))
    sidecar = Sidecar(site_file, f"http://{site.sidecar.host}:{site.sidecar.port}", extra_args=("--no-cameras",))
    posts: dict[str, SipPeer] = {}
    desks: dict[str, SipPeer] = {}
    try:
        with Asterisk(site, command="pytest tests/integration/test_overflow.py",
                      templates=overflow_templates(folder, centre.port), boot_timeout=60) as pbx:
            phones = [*site.posts, *site.desks]
            for phone in phones:
                peer = SipPeer(phone.id, phone.secret.read(), (site.pbx.host, site.pbx.sip_port))
                assert peer.register().code == 200, f"{phone.id} could not register"
                (posts if phone in site.posts else desks)[phone.id] = peer
            wait_until(lambda: desks_ready(pbx, site), 20, "desks ready in the queue")
            sidecar.start()
            sidecar.wait_ami()
            yield World(site, pbx, sidecar, receiver, centre, posts, desks, site.sidecar.token.read())
    finally:
        sidecar.close()
        for peer in [*posts.values(), *desks.values(), centre]:
            peer.close()
        receiver.stop()


@contextmanager
def desks_busy(world: World) -> Iterator[None]:
    """The two desks in a call with each other: the queue (ringinuse=no) rings neither."""
    first, second = world.site.desks[0], world.site.desks[1]
    before = len(world.desks[second.id].incoming)
    call = world.desks[first.id].call(second.extension)
    world.desks[second.id].wait_incoming(10, index=before).answer()
    assert call.wait_final(10).code == 200
    wait_until(lambda: world.pbx.cli(f"queue show {world.site.queue.name}").count("(In use)") == 2, 10,
               "both desks in use")
    try:
        yield
    finally:
        call.hangup()
        wait_until(lambda: desks_ready(world.pbx, world.site), 10, "desks free again")


@pytest.mark.parametrize("desks", ["not answering", "busy"])
def test_an_overflowed_call_stays_live_while_the_caller_is_connected_and_ends_with_the_caller(
        world: World, desks: str) -> None:
    """A call no desk answers within max_wait (desks ringing unanswered, or busy) is overflowed, not abandoned, live while the overflow route rings and talks, ended when the post hangs up."""
    post = world.site.posts[0]
    known = {i["id"] for i in world.sidecar.json("/api/v1/incidents?limit=10000")["incidents"]}
    with ExitStack() as stack:
        if desks == "busy":
            stack.enter_context(desks_busy(world))
        rung = {d: len(p.incoming) for d, p in world.desks.items()}
        overflowed(world, post.id, known, ring=desks == "not answering")
        if desks == "busy":  # nobody was rung: both desks were on their own call
            assert {d: len(p.incoming) for d, p in world.desks.items()} == rung


def overflowed(world: World, post_id: str, known: set[str], *, ring: bool) -> None:
    rung = {d: len(p.incoming) for d, p in world.desks.items()}
    centre_calls = len(world.centre.incoming)
    call: OutgoingCall = world.posts[post_id].call(world.site.queue.extension)
    queued = world.queued(post_id, known)
    incident, reference = queued["data"]["incident"], queued["data"]["reference"]
    assert reference.startswith("KIR-") and len(reference) == 8
    if ring:  # the desks ring and nobody answers
        for desk_id, peer in world.desks.items():
            peer.wait_incoming(10, index=rung[desk_id])
    live = wait_until(lambda: world.live(incident), 10, "the call live in /api/v1/posts")
    assert live["state"] == "queued" and live["reference"] == reference and live["answered_at"] is None
    assert live["queued_at"].endswith("Z") and live["wait_seconds"] >= 0

    # max_wait passes: the overflow route dials the backup centre, which rings. Still live, as overflowed.
    ringing: IncomingCall = world.centre.wait_incoming(MAX_WAIT + 15, index=centre_calls)
    unanswered = world.wait_event(incident, "call.unanswered")
    assert unanswered["data"]["reason"] == "overflowed" and unanswered["data"]["reference"] == reference
    live = wait_until(lambda: (c := world.live(incident)) and c["state"] == "overflowed" and c, 10,
                      "the call live as overflowed")
    assert live["overflowed_at"] >= live["queued_at"] and MAX_WAIT - 1 <= live["wait_seconds"] <= MAX_WAIT + 5
    card = world.sidecar.posts()[post_id]["call"]
    assert card is not None and card["state"] == "overflowed" and card["incident"] == incident
    assert world.sidecar.incident(incident)["state"] == "overflowed"  # type: ignore[index]

    # An operator cannot close it while the caller is still connected.
    refused = world.close(incident, {"reason": "assistance"})
    assert refused.status_code == 409 and "still connected" in refused.json()["detail"]

    # The backup centre answers: the post is connected (200 OK), the call still live.
    ringing.answer()
    assert call.wait_final(10).code == 200
    live = wait_until(lambda: (c := world.live(incident)) and c["overflow_answered_at"] and c, 10,
                      "the overflow route's answer")
    assert live["state"] == "overflowed"
    assert [e["type"] for e in world.events_of(incident)] == ["call.queued", "call.unanswered"]

    # The post hangs up: now it ends, still overflowed.
    call.hangup()
    ended = world.wait_event(incident, "call.ended")
    assert ended["data"]["outcome"] == "overflowed" and ended["data"]["reference"] == reference
    assert [e["type"] for e in world.events_of(incident)] == ["call.queued", "call.unanswered", "call.ended"]
    found = wait_until(lambda: (i := world.sidecar.incident(incident)) and i["state"] == "ended" and i, 10,
                       "the incident ended in the API")
    assert found["outcome"] == "overflowed" and found["reference"] == reference
    kinds = [t["kind"] for t in found["timeline"]]
    assert kinds[0] == "queued" and ("desk_rung" in kinds) == ring and kinds[-2:] == ["overflow_answered", "ended"]
    assert world.live(incident) is None and world.sidecar.posts()[post_id]["call"] is None
    assert world.receiver.malformed == [] and world.receiver.rejected == 0


def test_closing_an_ended_incident_records_it_once_and_tells_the_cctv_targets(world: World) -> None:
    """An ended incident closes once with a reason and a note: stored, exported, counted, and sent as incident.closed."""
    incidents = world.sidecar.json("/api/v1/incidents")["incidents"]
    ended = next(i for i in incidents if i["state"] == "ended" and i["outcome"] == "overflowed")
    overflows = Scrape(world.sidecar.metrics()).value("refuge_calls_total", outcome="overflowed")
    incident = ended["id"]
    assert world.close(incident, {"reason": "nope"}).status_code == 422
    assert world.close(incident, {"reason": "police", "note": "x" * 5000}).status_code == 422
    assert world.close("no-such-incident", {"reason": "police"}).status_code == 404
    # Neither an operator's session nor the token: refused.
    unauthorised = requests.post(f"{world.sidecar.url}/api/v1/incidents/{incident}/close",
                                 json={"reason": "police"}, timeout=10)
    assert unauthorised.status_code == 401

    done = world.close(incident, {"reason": "police", "note": "Caller reported a fight; police sent."})
    assert done.status_code == 200, done.text
    body = done.json()
    assert (body["close_reason"], body["close_note"], body["closed_by"]) == \
        ("police", "Caller reported a fight; police sent.", "admin-token")
    again = world.close(incident, {"reason": "misuse"})
    assert again.status_code == 409 and "already closed" in again.json()["detail"]

    closed = world.wait_event(incident, "incident.closed")
    data = closed["data"]
    assert (data["reason"], data["reason_label"], data["outcome"]) == ("police", "Police dispatched", "overflowed")
    assert data["note"] == "Caller reported a fight; police sent." and data["reference"] == ended["reference"]
    assert len(world.receiver.closed(incident)) == 1 and world.receiver.malformed == []

    stored = world.sidecar.incident(incident)
    assert stored is not None and stored["close_reason"] == "police" and stored["closed_at"].endswith("Z")
    assert stored["timeline"][-1]["kind"] == "closed"
    rows = list(csv.DictReader(io.StringIO(world.sidecar.get("/api/v1/incidents?format=csv").text)))
    row = next(r for r in rows if r["id"] == incident)
    assert (row["reference"], row["close_reason"], row["close_note"]) == \
        (ended["reference"], "police", "Caller reported a fight; police sent.")
    scrape = Scrape(world.sidecar.metrics())
    assert scrape.value("refuge_incidents_closed_total", reason="police") == 1
    assert scrape.value("refuge_incidents_closed_total", reason="misuse") == 0
    assert overflows == 2 and scrape.value("refuge_calls_total", outcome="overflowed") == overflows


def test_a_post_that_hangs_up_while_queued_is_abandoned(world: World) -> None:
    """A caller who hangs up while the desks ring is abandoned (no overflow, no call.ended), though Asterisk reports it like a timeout."""
    post = world.site.posts[1]
    known = {i["id"] for i in world.sidecar.json("/api/v1/incidents")["incidents"]}
    rung = len(world.desks[world.site.desks[0].id].incoming)
    centre_calls = len(world.centre.incoming)
    call = world.posts[post.id].call(world.site.queue.extension)
    queued = world.queued(post.id, known)
    incident = queued["data"]["incident"]
    world.desks[world.site.desks[0].id].wait_incoming(10, index=rung)
    call.hangup()  # CANCEL while the desks ring
    unanswered = world.wait_event(incident, "call.unanswered")
    assert unanswered["data"]["reason"] == "abandoned"
    found = wait_until(lambda: (i := world.sidecar.incident(incident)) and i["state"] == "ended" and i, 10,
                       "the incident ended")
    assert found["outcome"] == "abandoned" and world.live(incident) is None
    wait_until(lambda: "0 active channels" in world.pbx.cli("core show channels count"), 10, "the call gone")
    assert [e["type"] for e in world.events_of(incident)] == ["call.queued", "call.unanswered"]
    assert len(world.centre.incoming) == centre_calls  # the overflow route never ran
    assert world.receiver.malformed == []
