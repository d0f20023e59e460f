"""Closing an incident: the rules alone, then through the API into the store, the export, /metrics and the
``incident.closed`` event a CCTV target gets."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from flask.testing import FlaskClient

from sip_refuge.config import Site, load_site
from sip_refuge.config.model import DEFAULT_CLOSE_REASONS, CloseReason
from sip_refuge.sidecar import closeout
from sip_refuge.sidecar.closeout import CloseRefused
from sip_refuge.sidecar.core import Hub
from sip_refuge.sidecar.records import Incident
from sip_refuge.sidecar.web import create_app
from tests.support.hubs import ScriptedTarget, memory_hub
from tests.support.metrics import Scrape
from tests.support.sites import example_copy

TOKEN = "t0ken-for-the-close-out-tests-0123456"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def incident(state: str = "ended", **fields: Any) -> Incident:
    base: dict[str, Any] = {"id": "inc-1", "post_id": "idlewells", "state": state, "created": "t",
                            "answered_by": None, "answered_at": None, "ended": None, "outcome": "ended",
                            "snapshot": None, "reference": "ASH-0001"}
    return Incident(**{**base, **fields})


# -- the rules -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, field", [
    ([], "body"),
    ({"reason": "teleported"}, "reason"),
    ({}, "reason"),
    ({"reason": 3}, "reason"),
    ({"reason": "police", "note": 5}, "note"),
    ({"reason": "police", "note": "x" * (closeout.NOTE_MAX + 1)}, "note"),
    ({"reason": "police", "note": "fine\x1b[2Jnot"}, "note"),
    ({"reason": "police", "outcome": "solved"}, "outcome"),
])
def test_a_bad_close_out_is_refused_naming_the_field(body: object, field: str) -> None:
    with pytest.raises(CloseRefused) as refused:
        closeout.parse(body, DEFAULT_CLOSE_REASONS)
    assert refused.value.status == 422 and str(refused.value).startswith(f"{field}:")


def test_a_good_close_out_keeps_line_breaks_and_drops_an_empty_note() -> None:
    close = closeout.parse({"reason": "police", "note": " Two men fighting.\r\nPolice sent. "}, DEFAULT_CLOSE_REASONS)
    assert close.reason == CloseReason("police", "Police dispatched") and close.note == "Two men fighting.\nPolice sent."
    assert closeout.parse({"reason": "test", "note": "  "}, DEFAULT_CLOSE_REASONS).note is None
    assert closeout.parse({"reason": "test", "note": None}, DEFAULT_CLOSE_REASONS).note is None


@pytest.mark.parametrize("found, live, closed, status, words", [
    (None, False, False, 404, "no incident"),
    (incident("overflowed", outcome=None), True, False, 409, "still connected"),
    (incident("answered", outcome=None), True, False, 409, "still connected"),
    (incident("answered", outcome=None), False, False, 409, "has not ended"),
    (incident(closed_at="2026-01-01T00:00:00.000Z", close_reason="test"), False, False, 409, "already closed"),
    (incident(), False, True, 409, "already closed"),
])
def test_an_incident_closes_once_and_only_when_its_call_is_over(found: Incident | None, live: bool, closed: bool,
                                                                status: int, words: str) -> None:
    with pytest.raises(CloseRefused) as refused:
        closeout.check(found, "inc-1", live=live, closed=closed)
    assert refused.value.status == status and words in str(refused.value)
    assert closeout.check(incident(), "inc-1", live=False) == incident()


# -- through the API ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    return load_site(example_copy(tmp_path_factory.mktemp("site"), lambda text: text.replace(
        "  camera_interval: 60s", "  camera_interval: 60s\n  close_reasons:\n"
        "    - {id: assistance, label: Assistance given}\n    - Police dispatched\n"
        "    - {id: hoax, label: Hoax call}", 1)))


@pytest.fixture()
def parts(site: Site) -> Iterator[tuple[Hub, FlaskClient, ScriptedTarget]]:
    target = ScriptedTarget("hook")
    with memory_hub(site, [target]) as hub:
        yield hub, create_app(hub, token=TOKEN).test_client(), target


def call(hub: Hub, uid: str, *, answer: bool = True, end: bool = True) -> str:
    hub.recorder.on_ami_event({"Event": "QueueCallerJoin", "Queue": "refuge", "Channel": "PJSIP/idlewells-00000001",
                               "Uniqueid": uid, "Position": "1"})
    if answer:
        hub.recorder.on_ami_event({"Event": "AgentConnect", "Uniqueid": uid, "Interface": "PJSIP/desk-1"})
    if end:
        hub.recorder.on_ami_event({"Event": "Hangup", "Uniqueid": uid, "Cause-txt": "Normal Clearing"})
    return next(i.id for i in hub.store.incidents() if i.timeline[0].detail.get("uniqueid") == uid)


def test_the_site_lists_its_own_reasons(parts: tuple[Hub, FlaskClient, ScriptedTarget]) -> None:
    _, client, _ = parts
    assert client.get("/api/v1/close-reasons", headers=AUTH).get_json()["reasons"] == [
        {"id": "assistance", "label": "Assistance given"}, {"id": "police-dispatched", "label": "Police dispatched"},
        {"id": "hoax", "label": "Hoax call"}]


def test_closing_stores_exports_counts_and_tells_the_targets(parts: tuple[Hub, FlaskClient, ScriptedTarget]) -> None:
    hub, client, target = parts
    inc = call(hub, "1.1")
    url = f"/api/v1/incidents/{inc}/close"
    assert client.post(url, json={"reason": "hoax"}).status_code == 401  # a write needs an operator's session (with CSRF) or the token
    assert client.post(url, data="reason=hoax", headers=AUTH).status_code == 400
    assert client.post(url, json={"reason": "police"}, headers=AUTH).status_code == 422  # not this site's id
    done = client.post(url, json={"reason": "hoax", "note": "Children pressing it."}, headers=AUTH)
    assert done.status_code == 200
    body = done.get_json()
    assert (body["close_reason"], body["close_note"], body["closed_by"]) == ("hoax", "Children pressing it.",
                                                                           "admin-token")
    again = client.post(url, json={"reason": "assistance"}, headers=AUTH)
    assert again.status_code == 409 and "already closed" in again.get_json()["detail"]

    stored = client.get(f"/api/v1/incidents/{inc}", headers=AUTH).get_json()
    assert stored["close_reason"] == "hoax" and stored["closed_at"] == body["closed_at"]
    assert stored["timeline"][-1]["kind"] == "closed" and stored["timeline"][-1]["detail"]["reason"] == "hoax"
    [row] = list(csv.DictReader(io.StringIO(client.get("/api/v1/incidents?format=csv", headers=AUTH).data.decode())))
    assert (row["reference"], row["close_reason"], row["close_note"], row["closed_by"]) == \
        ("ASH-0001", "hoax", "Children pressing it.", "admin-token")
    scrape = Scrape(client.get("/metrics", headers=AUTH).data.decode())
    assert scrape.types["refuge_incidents_closed"] == "counter"
    assert [scrape.value("refuge_incidents_closed_total", reason=r) for r in ("assistance", "hoax")] == [0, 1]

    hub.outbox.step(time.time())
    closed = [e for e in target.accepted if e.type == "incident.closed"]
    assert len(closed) == 1
    data = closed[0].body["data"]
    assert (data["incident"], data["reference"], data["reason"], data["reason_label"]) == \
        (inc, "ASH-0001", "hoax", "Hoax call")
    assert (data["note"], data["outcome"], data["closed_by"], data["desk"]["id"]) == \
        ("Children pressing it.", "ended", "admin-token", "desk-1")
    assert data["post"]["id"] == "idlewells"


def test_a_call_still_live_cannot_be_closed(parts: tuple[Hub, FlaskClient, ScriptedTarget]) -> None:
    hub, client, _ = parts
    inc = call(hub, "2.1", end=False)
    refused = client.post(f"/api/v1/incidents/{inc}/close", json={"reason": "assistance"}, headers=AUTH)
    assert refused.status_code == 409 and "still connected" in refused.get_json()["detail"]
    assert client.get(f"/api/v1/incidents/{inc}", headers=AUTH).get_json()["closed_at"] is None
    hub.recorder.on_ami_event({"Event": "Hangup", "Uniqueid": "2.1"})
    assert client.post(f"/api/v1/incidents/{inc}/close", json={"reason": "assistance"},
                       headers=AUTH).status_code == 200
    assert client.post("/api/v1/incidents/nope/close", json={"reason": "assistance"},
                       headers=AUTH).status_code == 404


def test_an_abandoned_call_closes_with_its_outcome(parts: tuple[Hub, FlaskClient, ScriptedTarget]) -> None:
    hub, client, _ = parts
    inc = call(hub, "3.1", answer=False)
    assert client.get(f"/api/v1/incidents/{inc}", headers=AUTH).get_json()["outcome"] == "abandoned"
    assert client.post(f"/api/v1/incidents/{inc}/close", json={"reason": "hoax"}, headers=AUTH).status_code == 200
    [event] = [e for _, e in hub.store.events_since(0) if e.type == "incident.closed"]
    assert event.body["data"]["outcome"] == "abandoned" and event.body["data"]["desk"] is None
    exported = json.loads(hub.views.export_json())
    assert exported[0]["close_reason"] == "hoax" and exported[0]["reference"] == "ASH-0001"
