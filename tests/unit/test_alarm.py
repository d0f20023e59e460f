"""The pages' alarm: which calls sound it, and an operator's acknowledgement, alone and through the API into the
store, the audit log, the export and the pages' event stream (never to CCTV targets)."""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient

from sip_refuge.config import Site
from sip_refuge.sidecar import alarm
from sip_refuge.sidecar.alarm import AcknowledgeRefused
from sip_refuge.sidecar.board import LiveCall
from sip_refuge.sidecar.core import Hub
from sip_refuge.sidecar.records import Incident
from sip_refuge.sidecar.web import create_app
from tests.support.hubs import ScriptedTarget, memory_hub

TOKEN = "t0ken-for-the-alarm-tests-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def live(**fields: Any) -> LiveCall:
    return LiveCall(**{"incident": "inc-1", "reference": "ASH-0001", "post_id": "idlewells", "state": "queued",
                       "queued_at": "2026-01-01T00:00:00.000Z", **fields})


def over(**fields: Any) -> Incident:
    base: dict[str, Any] = {"id": "inc-1", "post_id": "idlewells", "state": "ended", "created": "t",
                            "answered_by": None, "answered_at": None, "ended": "t", "outcome": "abandoned",
                            "snapshot": None, "reference": "ASH-0001"}
    return Incident(**{**base, **fields})


# -- the rules -------------------------------------------------------------------------------------------------

def test_a_call_sounds_until_a_desk_answers_or_someone_acknowledges() -> None:
    assert alarm.sounding(live())
    assert alarm.sounding(live(state="overflowed"))  # the overflow route is not the control room
    assert not alarm.sounding(live(state="answered", desk="desk-1"))
    assert not alarm.sounding(live(acknowledged_at="2026-01-01T00:00:05.000Z", acknowledged_by="alice"))


@pytest.mark.parametrize(("body", "field"), [
    ([], "body"), ("desk-1", "body"), ({"desk": "desk-9"}, "desk"), ({"desk": 1}, "desk"), ({"who": "me"}, "who"),
])
def test_a_bad_body_is_refused_naming_the_field(site: Site, body: object, field: str) -> None:
    with pytest.raises(AcknowledgeRefused) as refused:
        alarm.parse(body, site.desks)
    assert refused.value.status == 422 and str(refused.value).startswith(f"{field}:")
    assert alarm.parse(None, site.desks) is None and alarm.parse({}, site.desks) is None
    assert alarm.parse({"desk": "desk-2"}, site.desks) == "desk-2"


@pytest.mark.parametrize(("call", "words"), [
    (live(state="answered", desk="desk-1"), "answered by desk-1"),
    (live(acknowledged_at="2026-01-01T00:00:05.000Z", acknowledged_by="bob"), "already acknowledged (bob"),
])
def test_a_live_call_without_an_alarm_cannot_be_acknowledged(call: LiveCall, words: str) -> None:
    with pytest.raises(AcknowledgeRefused) as refused:
        alarm.check_live(call)
    assert refused.value.status == 409 and words in str(refused.value)


@pytest.mark.parametrize(("incident", "status", "words"), [
    (None, 404, "no incident"),
    (over(acknowledged_at="t", acknowledged_by="bob"), 409, "already acknowledged"),
    (over(answered_by="desk-1", outcome="ended"), 409, "answered by desk-1"),
    (over(closed_at="t", close_reason="test"), 409, "is closed"),
    (over(state="queued", outcome=None, ended=None), 409, "not a call the sidecar follows now"),
])
def test_only_a_missed_call_can_be_acknowledged_once_over(incident: Incident | None, status: int, words: str) -> None:
    with pytest.raises(AcknowledgeRefused) as refused:
        alarm.check_over(incident, "inc-1")
    assert refused.value.status == status and words in str(refused.value)
    assert alarm.check_over(over(), "inc-1") == over()
    assert alarm.check_over(over(outcome="overflowed"), "inc-1") == over(outcome="overflowed")


# -- through the API ---------------------------------------------------------------------------------------------

@pytest.fixture()
def parts(site: Site) -> Iterator[tuple[Hub, FlaskClient, ScriptedTarget]]:
    target = ScriptedTarget("hook")
    with memory_hub(site, [target]) as hub:
        yield hub, create_app(hub, token=TOKEN).test_client(), target


def queue(hub: Hub, uid: str, post: str = "idlewells") -> str:
    hub.recorder.on_ami_event({"Event": "QueueCallerJoin", "Queue": "refuge", "Channel": f"PJSIP/{post}-00000001",
                               "Uniqueid": uid, "Position": "1"})
    return next(i.id for i in hub.store.incidents() if i.timeline[0].detail.get("uniqueid") == uid)


def overview(client: FlaskClient) -> dict[str, Any]:
    body: dict[str, Any] = client.get("/api/v1/posts", headers=AUTH).get_json()
    return body


def test_acknowledging_a_ringing_call_silences_it_records_it_and_tells_only_the_pages(
        parts: tuple[Hub, FlaskClient, ScriptedTarget]) -> None:
    hub, client, target = parts
    page = hub.fanout.subscribe()
    inc = queue(hub, "1.1")
    [call] = overview(client)["calls"]
    assert (call["incident"], call["alarm"], call["acknowledged_by"]) == (inc, True, None)
    assert client.post(f"/api/v1/incidents/{inc}/acknowledge").status_code == 401  # a session (with CSRF) or the token
    assert client.post(f"/api/v1/incidents/{inc}/acknowledge", data="desk=1", headers=AUTH).status_code == 400
    assert client.post(f"/api/v1/incidents/{inc}/acknowledge", json={"desk": "desk-9"}, headers=AUTH).status_code == 422

    done = client.post(f"/api/v1/incidents/{inc}/acknowledge", json={"desk": "desk-2"}, headers=AUTH)
    assert done.status_code == 200, done.get_json()
    body = done.get_json()
    assert (body["incident"], body["reference"], body["acknowledged_by"], body["desk"]) == \
        (inc, "ASH-0001", "admin-token", "desk-2")
    [call] = overview(client)["calls"]
    assert (call["alarm"], call["acknowledged_by"], call["acknowledged_at"]) == (False, "admin-token", body["acknowledged_at"])
    assert overview(client)["posts"][1]["call"]["alarm"] is False
    again = client.post(f"/api/v1/incidents/{inc}/acknowledge", headers=AUTH)
    assert again.status_code == 409 and "already acknowledged" in again.get_json()["detail"]

    stored = client.get(f"/api/v1/incidents/{inc}", headers=AUTH).get_json()
    assert (stored["acknowledged_by"], stored["acknowledged_at"]) == ("admin-token", body["acknowledged_at"])
    assert [t for t in stored["timeline"] if t["kind"] == "acknowledged"] == [
        {"at": body["acknowledged_at"], "kind": "acknowledged", "detail": {"by": "admin-token", "desk": "desk-2"}}]
    entries = [(e["action"], e["outcome"], e["target"]) for e in hub.store.audit(10)]
    assert entries[:3] == [("incident.acknowledge", "409", inc), ("incident.acknowledge", "ok", inc),
                           ("incident.acknowledge", "422", inc)]

    seen = []
    while not page.empty():
        event = page.get_nowait()
        assert event is not None
        seen.append(event)
    acked = [e for e in seen if e.type == "incident.acknowledged"]
    assert len(acked) == 1 and acked[0].body["data"]["acknowledged_by"] == "admin-token"
    assert acked[0].body["data"]["post"] == {"id": "idlewells", "name": "Idlewells Shopping Centre"}
    hub.outbox.step(time.time())
    assert [e.type for e in target.accepted] == ["call.queued"]  # nothing for the CCTV system
    assert hub.store.events_since(0)[-1][1].type == "call.queued"  # nor stored for it

    # Once the desks answer, there is nothing left to acknowledge.
    other = queue(hub, "2.1", post="sutton-market")
    hub.recorder.on_ami_event({"Event": "AgentConnect", "Uniqueid": "2.1", "Interface": "PJSIP/desk-1"})
    refused = client.post(f"/api/v1/incidents/{other}/acknowledge", headers=AUTH)
    assert refused.status_code == 409 and "answered by desk-1" in refused.get_json()["detail"]
    assert client.post("/api/v1/incidents/nope/acknowledge", headers=AUTH).status_code == 404


def test_a_missed_call_keeps_the_alarm_until_acknowledged_or_closed(parts: tuple[Hub, FlaskClient, ScriptedTarget]) -> None:
    hub, client, _ = parts
    first, second = queue(hub, "3.1"), queue(hub, "3.2", post="kirkby-bus-station")
    for uid in ("3.1", "3.2"):
        hub.recorder.on_ami_event({"Event": "HangupRequest", "Uniqueid": uid})
        hub.recorder.on_ami_event({"Event": "QueueCallerAbandon", "Uniqueid": uid})
    answered = queue(hub, "3.3", post="sutton-market")
    hub.recorder.on_ami_event({"Event": "AgentConnect", "Uniqueid": "3.3", "Interface": "PJSIP/desk-1"})
    hub.recorder.on_ami_event({"Event": "Hangup", "Uniqueid": "3.3"})
    view = overview(client)
    assert view["calls"] == []
    assert [(m["incident"], m["post"], m["outcome"], m["alarm"]) for m in view["missed"]] == \
        [(second, "kirkby-bus-station", "abandoned", True), (first, "idlewells", "abandoned", True)]
    assert answered not in {m["incident"] for m in view["missed"]}  # a desk answered it

    assert client.post(f"/api/v1/incidents/{first}/acknowledge", headers=AUTH).status_code == 200
    assert client.post(f"/api/v1/incidents/{second}/close", json={"reason": "no-one-there"},
                       headers=AUTH).status_code == 200
    assert overview(client)["missed"] == []
    refused = client.post(f"/api/v1/incidents/{second}/acknowledge", headers=AUTH)
    assert refused.status_code == 409 and "is closed" in refused.get_json()["detail"]
    [row] = [r for r in csv.DictReader(io.StringIO(client.get("/api/v1/incidents?format=csv", headers=AUTH).data.decode()))
             if r["id"] == first]
    assert row["acknowledged_by"] == "admin-token" and row["acknowledged_at"].endswith("Z")


def test_a_missed_call_rings_for_one_shift_only(parts: tuple[Hub, FlaskClient, ScriptedTarget]) -> None:
    """After an upgrade or a long outage the pages do not sound for last week's unanswered calls."""
    hub, client, _ = parts
    now = datetime.now(UTC)
    for number, age in enumerate((alarm.MISSED_FOR + 60, alarm.MISSED_FOR - 60), start=1):
        hub.store.open_incident(f"old-{number}", "idlewells", now - timedelta(seconds=age),
                                reference=(f"ASH-090{number}", 900 + number))
        hub.store.update_incident(f"old-{number}", state="ended", outcome="abandoned")
    assert [m["incident"] for m in overview(client)["missed"]] == ["old-2"]
    assert client.post("/api/v1/incidents/old-1/acknowledge", headers=AUTH).status_code == 200  # still allowed
