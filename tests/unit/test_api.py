"""The sidecar's JSON API and health routes through Flask's test client (no network needed)."""

from __future__ import annotations

import json
import math
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from flask.testing import FlaskClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from werkzeug.serving import make_server

from sip_refuge.config import Site
from sip_refuge.post.telemetry import TelemetryOutbox
from sip_refuge.sidecar.core import Hub
from sip_refuge.sidecar.outbox import Outbox
from sip_refuge.sidecar.records import PostStatus
from sip_refuge.sidecar.web import create_app
from sip_refuge.telemetry import Telemetry
from tests.support.telemetry import AT, report

TOKEN = "t0ken-for-the-api-tests-0123456789"


def with_token(client: FlaskClient) -> FlaskClient:
    """Reads need a login or the site token (the admin's automation); these tests read with the token."""
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {TOKEN}"
    return client


@pytest.fixture()
def client(hub: Hub) -> FlaskClient:
    return with_token(create_app(hub, token=TOKEN).test_client())


@pytest.fixture()
def anonymous(hub: Hub) -> FlaskClient:
    return create_app(hub, token=TOKEN).test_client()


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_posts_list_every_post_of_the_site(client: FlaskClient) -> None:
    body = client.get("/api/v1/posts").get_json()
    assert [p["id"] for p in body["posts"]] == ["sutton-market", "idlewells", "kirkby-bus-station"]
    assert body["posts"][0]["location"]["address"].startswith("Market Place")
    assert client.get("/api/v1/posts/idlewells").get_json()["name"] == "Idlewells Shopping Centre"


def test_a_call_becomes_an_incident_with_its_timeline(client: FlaskClient, hub: Hub) -> None:
    hub.recorder.on_ami_event({"Event": "QueueCallerJoin", "Queue": "refuge", "Channel": "PJSIP/idlewells-00000001",
                      "Uniqueid": "9.1", "Position": "1"})
    hub.recorder.on_ami_event({"Event": "AgentCalled", "Uniqueid": "9.1", "Interface": "PJSIP/desk-1"})
    hub.recorder.on_ami_event({"Event": "AgentConnect", "Uniqueid": "9.1", "Interface": "PJSIP/desk-1"})
    assert client.get("/api/v1/posts/idlewells").get_json()["call"]["state"] == "answered"
    hub.recorder.on_ami_event({"Event": "AgentComplete", "Uniqueid": "9.1", "Reason": "agent"})
    [incident] = client.get("/api/v1/incidents").get_json()["incidents"]
    assert incident["post_id"] == "idlewells" and incident["answered_by"] == "desk-1"
    assert incident["outcome"] == "ended"
    assert [t["kind"] for t in incident["timeline"]] == ["queued", "desk_rung", "answered", "ended"]
    csv = client.get("/api/v1/incidents?format=csv")
    assert csv.status_code == 200 and csv.data.decode().splitlines()[1].startswith(incident["id"])
    types = [e.type for _, e in hub.store.events_since(0)]
    assert types == ["call.queued", "call.answered", "call.ended"]


def test_telemetry_needs_the_token(client: FlaskClient, anonymous: FlaskClient) -> None:
    url = "/api/v1/posts/idlewells/telemetry"
    assert anonymous.post(url, json=report("idlewells")).status_code == 401
    assert client.post(url, json=report("idlewells"), headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post(url, json=report("idlewells"), headers=AUTH).status_code == 202
    assert client.get("/api/v1/posts/idlewells").get_json()["state"] == "idle"


def test_bad_telemetry_gets_clear_4xx(client: FlaskClient) -> None:
    url = "/api/v1/posts/idlewells/telemetry"
    as_json = {**AUTH, "Content-Type": "application/json"}
    cases = [
        (client.post(url, data="{not json", headers=as_json), 400, "body: not JSON"),
        (client.post(url, data=json.dumps(report("idlewells")), headers=AUTH), 400, "body: must be JSON"),
        (client.post(url, json=[1, 2], headers=AUTH), 400, "body: must be a JSON object"),
        (client.post(url, json=report("idlewells", kind="bogus"), headers=AUTH), 422, "kind: 'bogus' is not one of"),
        (client.post(url, json=report("idlewells", post="sutton-market"), headers=AUTH), 422, "post: 'sutton-market'"),
        (client.post("/api/v1/posts/nope/telemetry", json=report("nope"), headers=AUTH), 404, "no post"),
        (client.post(url, data="x" * 100_000, headers=as_json), 413, ""),
    ]
    for response, status, detail in cases:
        assert response.status_code == status, response.data
        assert response.is_json and set(response.get_json()) == {"error", "detail"}
        assert response.get_json()["detail"].startswith(detail) or detail in response.get_json()["detail"]


def hostile_bodies() -> list[tuple[str, int, str]]:
    """Issue 8, findings 10 and 14, as an attacker with a post's token would send them."""
    good = json.dumps(report("idlewells", "call", duration=1.5))
    return [
        (json.dumps(report("idlewells", faults=5)), 422, "faults: 5 is not a list of names"),
        (json.dumps(report("idlewells", faults="abc")), 422, "faults: 'abc' is not a list of names"),
        (good.replace("1.5", "NaN"), 422, "duration: NaN is not allowed"),
        (good.replace("1.5", "Infinity"), 422, "duration: Infinity is not allowed"),
        (good.replace("1.5", "-Infinity"), 422, "duration: -Infinity is not allowed"),
        ("[" * 30_000 + "]" * 30_000, 413, "body: 60000 bytes"),
        ("[" * 8000 + "]" * 8000, 400, "body: nested more than 8 deep"),  # within 16 KiB: the parser would recurse
        (json.dumps(report("idlewells", extra=[[[[[[[[1]]]]]]]])), 400, "body: nested more than 8 deep"),
        (json.dumps(report("idlewells", reason="x" * 5000)), 422, "reason: 5000 characters"),
        (json.dumps(report("idlewells", faults=["f"] * 1000)), 422, "faults: 1000 items"),
        (json.dumps(report("idlewells", kind="heartbeat")), 422, "kind: 'heartbeat' is not one of"),
    ]


def test_hostile_telemetry_is_refused_naming_the_field_and_breaks_nothing(client: FlaskClient) -> None:
    url = "/api/v1/posts/idlewells/telemetry"
    client.post(url, json=report("idlewells", faults=["tamper"]), headers=AUTH)
    for body, status, detail in hostile_bodies():
        response = client.post(url, data=body, headers={**AUTH, "Content-Type": "application/json"})
        assert response.status_code == status, response.data
        assert response.get_json()["detail"].startswith(detail), response.get_json()
    # Nothing of it reached the post's status: the pages and the JSON API show the last good report.
    assert client.get("/").status_code == 200
    posts = client.get("/api/v1/posts")
    json.loads(posts.data, parse_constant=lambda name: pytest.fail(f"{name} in /api/v1/posts"))
    assert client.get("/api/v1/posts/idlewells").get_json()["faults"] == ["tamper"]


def test_selftest_failure_from_telemetry_raises_an_event(client: FlaskClient, hub: Hub) -> None:
    client.post("/api/v1/posts/sutton-market/telemetry", headers=AUTH,
                json=report("sutton-market", "selftest", result="fail", passed=False, detail="no echo",
                            last_self_test={"at": AT, "passed": False, "detail": "no echo"}))
    [(_, event)] = hub.store.events_since(0)
    assert event.type == "selftest.failed" and event.body["data"]["reason"] == "no echo"
    shown = client.get("/api/v1/posts/sutton-market").get_json()["last_self_test"]
    assert shown == {"at": AT, "passed": False, "detail": "no echo", "part": ""}


def test_selftest_failed_names_the_part_that_failed(client: FlaskClient, hub: Hub) -> None:
    detail = "local: the microphone did not hear the speaker"
    client.post("/api/v1/posts/sutton-market/telemetry", headers=AUTH,
                json=report("sutton-market", "selftest", result="fail", passed=False, detail=detail, part="local",
                            last_self_test={"at": AT, "passed": False, "detail": detail, "part": "local"}))
    [(_, event)] = hub.store.events_since(0)
    assert event.type == "selftest.failed" and event.body["data"]["part"] == "local"
    shown = client.get("/api/v1/posts/sutton-market").get_json()["last_self_test"]
    assert shown["part"] == "local"
    refused = client.post("/api/v1/posts/sutton-market/telemetry", headers=AUTH,
                          json=report("sutton-market", "selftest", result="fail", passed=False, part="kitchen",
                                      last_self_test={"at": AT, "passed": False}))
    assert refused.status_code == 422 and "part" in refused.get_json()["detail"]


def test_what_a_post_sends_is_what_the_sidecar_reads(client: FlaskClient, hub: Hub, site: Site,
                                                     tmp_path: Path) -> None:
    """The post's outbox, with the post's own token, against the sidecar app served over real HTTP on loopback."""
    from sip_refuge.config.secrets import telemetry_token

    server = make_server("127.0.0.1", 0, create_app(hub, token=TOKEN), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}/api/v1/posts/idlewells/telemetry"
    box = TelemetryOutbox("idlewells", url, telemetry_token("idlewells", site.post("idlewells").secret.read()),
                          tmp_path / "spool.jsonl")
    sent = [Telemetry.build("fault", {"fault": "tamper", "active": True, "detail": "door\nopen"}, post="idlewells",
                            at=datetime.now(UTC), state="fault", registered=True, faults=["tamper"], mock_gpio=False),
            Telemetry.build("selftest", {"result": "fail", "detail": "no echo", "call": "idlewells-1"},
                            post="idlewells", at=datetime.now(UTC), state="idle", registered=True,
                            faults=["selftest_failed", "tamper"], mock_gpio=True,
                            last_self_test={"at": 1795727045.5, "passed": False, "detail": "no echo"})]
    try:
        box.start()
        for message in sent:
            box.put(message)
        deadline = time.monotonic() + 10
        while box.sent < len(sent) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        box.stop()
        server.shutdown()
        server.server_close()
    assert box.sent == len(sent) and box.last_error is None
    assert [Telemetry.from_wire(body) for _, body in reversed(hub.store.telemetry("idlewells"))] == sent
    shown = client.get("/api/v1/posts/idlewells").get_json()
    assert shown["faults"] == ["selftest_failed", "tamper"] and shown["mock_gpio"] is True
    assert shown["last_self_test"] == {"at": "2026-11-26T21:04:05.500Z", "passed": False, "detail": "no echo",
                                       "part": ""}
    # tamper, first reported by the first message, is a post.fault once; the failed test its selftest.failed
    events = [e for _, e in hub.store.events_since(0)]
    assert [e.type for e in events] == ["post.fault", "selftest.failed"]
    assert events[0].body["data"]["reason"] == "tamper" and events[0].body["data"]["faults"] == ["tamper"]


def test_device_faults_raise_post_fault_once_each_and_post_ok_when_all_clear(client: FlaskClient, hub: Hub) -> None:
    url = "/api/v1/posts/idlewells/telemetry"
    for faults in (["button_stuck"], ["button_stuck"], ["button_stuck", "tamper", "unregistered"], ["tamper"], [],
                   ["selftest_failed"]):
        kind = "fault" if faults else "state"
        assert client.post(url, headers=AUTH, json=report("idlewells", kind, faults=faults)).status_code == 202
    events = [(e.type, e.body["data"].get("reason"), e.body["data"]["faults"]) for _, e in hub.store.events_since(0)]
    # unregistered and selftest_failed have events of their own (post.offline from Asterisk, selftest.failed)
    assert events == [("post.fault", "button_stuck", ["button_stuck"]),
                      ("post.fault", "tamper", ["button_stuck", "tamper"]), ("post.ok", None, [])]


def test_an_aborted_selftest_keeps_the_last_result_and_raises_nothing(client: FlaskClient, hub: Hub) -> None:
    url = "/api/v1/posts/sutton-market/telemetry"
    client.post(url, headers=AUTH, json=report("sutton-market", "selftest"))
    reply = client.post(url, headers=AUTH, json=report("sutton-market", "selftest", result="aborted", passed=None,
                                                       detail=None, last_self_test=None))
    assert reply.status_code == 202
    assert client.get("/api/v1/posts/sutton-market").get_json()["last_self_test"]["passed"] is True
    assert hub.store.events_since(0) == []


def test_a_status_stored_by_an_earlier_version_cannot_break_the_pages(client: FlaskClient, hub: Hub) -> None:
    """A database written by a sidecar that stored telemetry unchecked: faults 5, NaN, junk self-test."""
    hub.store.save_post_status(PostStatus("idlewells", AT, None, "idle", None, {
        "faults": 5, "registered": math.nan, "last_self_test": {"at": "junk", "passed": "x"}}))
    hub.store.save_post_status(PostStatus("sutton-market", AT, None, "idle", None, {"faults": "abc"}))
    restarted = Hub(hub.site, hub.store, Outbox(hub.store, []), base_url="http://127.0.0.1:8080")
    client = with_token(create_app(restarted, token=TOKEN).test_client())
    page = client.get("/")
    assert page.status_code == 200 and page.data.count(b' id="post-') == len(hub.site.posts)
    posts = client.get("/api/v1/posts")
    body = json.loads(posts.data, parse_constant=lambda name: pytest.fail(f"{name} in /api/v1/posts"))
    idlewells = body["posts"][1]
    assert (idlewells["faults"], idlewells["registered"], idlewells["last_self_test"]) == ([], None, None)
    assert "refuge_post_fault{" not in client.get("/metrics").data.decode()


def test_healthz_and_metrics(client: FlaskClient, hub: Hub) -> None:
    health = client.get("/healthz")
    assert health.status_code == 503 and health.get_json()["ami"]["connected"] is False
    hub.link.on_link(True)
    assert client.get("/healthz").get_json()["status"] == "ok"
    text = client.get("/metrics").data.decode()
    assert "refuge_ami_connected 1" in text and 'refuge_post_up{post="idlewells"} 0' in text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/api/v1/posts/idlewells/telemetry", "/api/v1/posts/%00/telemetry",
                             "/api/v1/posts/" + "x" * 300 + "/telemetry"]),
       body=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode),
                      st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                                   lambda inner: st.lists(inner, max_size=4)
                                   | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                                   max_leaves=10).map(lambda v: json.dumps(v).encode())),
       token=st.sampled_from([TOKEN, "", "nope"]))
def test_fuzzed_telemetry_never_gives_a_5xx(client: FlaskClient, path: str, body: bytes, token: str) -> None:
    response = client.post(path, data=body, headers={"Authorization": f"Bearer {token}",
                                                     "Content-Type": "application/json"})
    assert response.status_code < 500, response.data


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(query=st.text(max_size=40))
@example(query="²")  # a Unicode digit that int() refuses: once a 500
def test_fuzzed_queries_never_give_a_5xx(client: FlaskClient, query: str) -> None:
    segment = query.replace("/", "").replace("?", "").replace("#", "")
    for url in ("/api/v1/incidents", "/api/v1/posts/" + segment, "/api/v1/incidents/" + segment):
        response = client.get(url, query_string={"limit": query, "format": query})
        assert response.status_code < 500, (url, response.data)


def test_press_needs_the_token_and_a_running_agent(client: FlaskClient, anonymous: FlaskClient) -> None:
    assert anonymous.post("/api/v1/posts/idlewells/press").status_code == 401
    assert client.post("/api/v1/posts/nope/press", headers=AUTH).status_code == 404
    # No agent listens on the post's control port in this test: a clear 503, never a 5xx crash page.
    reply = client.post("/api/v1/posts/idlewells/press", headers=AUTH)
    assert reply.status_code == 503 and "no post agent answers" in reply.get_json()["detail"]


def test_a_post_writes_telemetry_with_its_own_token_and_only_for_itself(client: FlaskClient, site: Site) -> None:
    from sip_refuge.config.secrets import telemetry_token

    own = telemetry_token("idlewells", site.post("idlewells").secret.read())
    assert client.post("/api/v1/posts/idlewells/telemetry", json=report("idlewells"),
                       headers={"Authorization": f"Bearer {own}"}).status_code == 202
    # The same token cannot write as another post, nor press a button.
    assert client.post("/api/v1/posts/sutton-market/telemetry", json=report("sutton-market"),
                       headers={"Authorization": f"Bearer {own}"}).status_code == 401
    assert client.post("/api/v1/posts/idlewells/press", headers={"Authorization": f"Bearer {own}"}).status_code == 401
