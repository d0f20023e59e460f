"""The sidecar's JSON API and health routes through Flask's test client (no network needed)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask.testing import FlaskClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sip_refuge.config import Site, load_site
from sip_refuge.config.secrets import init_secrets
from sip_refuge.sidecar.core import Hub
from sip_refuge.sidecar.outbox import Outbox
from sip_refuge.sidecar.store import Store
from sip_refuge.sidecar.web import create_app

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "site.example.yaml"
TOKEN = "t0ken-for-the-api-tests-0123456789"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    path = tmp_path_factory.mktemp("site") / "site.yaml"
    shutil.copy(EXAMPLE, path)
    init_secrets(load_site(path, check_secrets=False))
    return load_site(path)


@pytest.fixture()
def hub(site: Site) -> Iterator[Hub]:
    store = Store(":memory:")
    yield Hub(site, store, Outbox(store, []), base_url="http://127.0.0.1:8080")
    store.close()


@pytest.fixture()
def client(hub: Hub) -> FlaskClient:
    return create_app(hub, token=TOKEN).test_client()


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_posts_list_every_post_of_the_site(client: FlaskClient) -> None:
    body = client.get("/api/v1/posts").get_json()
    assert [p["id"] for p in body["posts"]] == ["sutton-market", "idlewells", "kirkby-bus-station"]
    assert body["posts"][0]["location"]["address"].startswith("Market Place")
    assert client.get("/api/v1/posts/idlewells").get_json()["name"] == "Idlewells Shopping Centre"


def test_a_call_becomes_an_incident_with_its_timeline(client: FlaskClient, hub: Hub) -> None:
    hub.on_ami_event({"Event": "QueueCallerJoin", "Queue": "refuge", "Channel": "PJSIP/idlewells-00000001",
                      "Uniqueid": "9.1", "Position": "1"})
    hub.on_ami_event({"Event": "AgentCalled", "Uniqueid": "9.1", "Interface": "PJSIP/desk-1"})
    hub.on_ami_event({"Event": "AgentConnect", "Uniqueid": "9.1", "Interface": "PJSIP/desk-1"})
    assert client.get("/api/v1/posts/idlewells").get_json()["call"]["state"] == "answered"
    hub.on_ami_event({"Event": "AgentComplete", "Uniqueid": "9.1", "Reason": "agent"})
    [incident] = client.get("/api/v1/incidents").get_json()["incidents"]
    assert incident["post_id"] == "idlewells" and incident["answered_by"] == "desk-1"
    assert incident["outcome"] == "ended"
    assert [t["kind"] for t in incident["timeline"]] == ["queued", "desk_rung", "answered", "ended"]
    csv = client.get("/api/v1/incidents?format=csv")
    assert csv.status_code == 200 and csv.data.decode().splitlines()[1].startswith(incident["id"])
    types = [e.type for _, e in hub.store.events_since(0)]
    assert types == ["call.queued", "call.answered", "call.ended"]


def test_telemetry_needs_the_token(client: FlaskClient) -> None:
    url = "/api/v1/posts/idlewells/telemetry"
    assert client.post(url, json={"kind": "state", "state": "idle"}).status_code == 401
    assert client.post(url, json={"kind": "state"}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post(url, json={"kind": "state", "state": "idle"}, headers=AUTH).status_code == 202
    assert client.get("/api/v1/posts/idlewells").get_json()["state"] == "idle"


def test_bad_telemetry_gets_clear_4xx(client: FlaskClient) -> None:
    url = "/api/v1/posts/idlewells/telemetry"
    cases = [
        (client.post(url, data="{not json", headers={**AUTH, "Content-Type": "application/json"}), 400),
        (client.post(url, json=[1, 2], headers=AUTH), 400),
        (client.post(url, json={"kind": "bogus"}, headers=AUTH), 422),
        (client.post("/api/v1/posts/nope/telemetry", json={"kind": "state"}, headers=AUTH), 404),
        (client.post(url, data="x" * 100_000, headers={**AUTH, "Content-Type": "application/json"}), 413),
    ]
    for response, status in cases:
        assert response.status_code == status, response.data
        assert response.is_json and "error" in response.get_json()


def test_selftest_failure_from_telemetry_raises_an_event(client: FlaskClient, hub: Hub) -> None:
    client.post("/api/v1/posts/sutton-market/telemetry", headers=AUTH,
                json={"kind": "selftest", "passed": False, "detail": "no echo"})
    [(_, event)] = hub.store.events_since(0)
    assert event.type == "selftest.failed" and event.body["data"]["reason"] == "no echo"


def test_healthz_and_metrics(client: FlaskClient, hub: Hub) -> None:
    health = client.get("/healthz")
    assert health.status_code == 503 and health.get_json()["ami"]["connected"] is False
    hub.on_ami_link(True)
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


def test_press_needs_the_token_and_a_running_agent(client: FlaskClient) -> None:
    assert client.post("/api/v1/posts/idlewells/press").status_code == 401
    assert client.post("/api/v1/posts/nope/press", headers=AUTH).status_code == 404
    # No agent listens on the post's control port in this test: a clear 503, never a 5xx crash page.
    reply = client.post("/api/v1/posts/idlewells/press", headers=AUTH)
    assert reply.status_code == 503 and "no post agent answers" in reply.get_json()["detail"]


def test_a_post_writes_telemetry_with_its_own_token_and_only_for_itself(client: FlaskClient, site: Site) -> None:
    from sip_refuge.config.secrets import telemetry_token

    own = telemetry_token("idlewells", site.post("idlewells").secret.read())
    body = {"kind": "state", "state": "idle"}
    assert client.post("/api/v1/posts/idlewells/telemetry", json=body,
                       headers={"Authorization": f"Bearer {own}"}).status_code == 202
    # The same token cannot write as another post, nor press a button.
    assert client.post("/api/v1/posts/sutton-market/telemetry", json=body,
                       headers={"Authorization": f"Bearer {own}"}).status_code == 401
    assert client.post("/api/v1/posts/idlewells/press", headers={"Authorization": f"Bearer {own}"}).status_code == 401
