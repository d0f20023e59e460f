"""CCTV targets and the outbox against real receivers on loopback (see tests/support/receivers.py)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sip_refuge.config.model import Site
from sip_refuge.config.secrets import Masker, new_value
from sip_refuge.sidecar import events as ev
from sip_refuge.sidecar.outbox import Backoff, Outbox
from sip_refuge.sidecar.store import Store
from sip_refuge.sidecar.targets import Target, TargetError, make_target
from sip_refuge.sidecar.targets.nx import NxTarget
from tests.support.receivers import (
    BlackHole,
    MilestoneEventServer,
    NxServer,
    WebhookReceiver,
    make_site,
    refused_port,
    running_vlc,
)

pytestmark = pytest.mark.integration

REVEALED = "rtsp://viewer:cam-S3cret%21pw%2Fwith%40odd@10.20.5.11:554/stream1"
FAST = Backoff(base=0.05, cap=0.4)  # real backoff, compressed so outages resolve in a test's time


def eventually(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Wait for a condition with a deadline (for state that has no notifier, such as outbox status)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def calls(site: Site, count: int) -> list[list[ev.Event]]:
    out = []
    for n in range(count):
        post = ("sutton-market", "bus-station")[n % 2]
        now = datetime.now(UTC)
        out.append([ev.build_event(t, site, post_id=post, now=now, incident=f"inc-{n}", desk_id="desk-1")
                    for t in (ev.CALL_QUEUED, ev.CALL_ANSWERED, ev.CALL_ENDED)])
    return out


def webhook_yaml(name: str, url: str, extra: str = "") -> str:
    return f"  - {{type: webhook, name: {name}, url: \"{url}\", secret_file: webhook.secret{extra}}}"


@pytest.fixture()
def receiver(tmp_path: Path) -> Iterator[WebhookReceiver]:
    key = new_value("webhook")
    (tmp_path / "webhook.secret").write_text(key)
    rx = WebhookReceiver(key)
    rx.start()
    yield rx
    rx.stop()


def running(outbox: Outbox) -> Outbox:
    outbox.start()
    return outbox


def per_incident(events: list[dict[str, object]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for body in events:
        data = body["data"]
        assert isinstance(data, dict)
        out.setdefault(str(data["incident"]), []).append(str(body["type"]))
    return out


def site_with(tmp_path: Path, cctv: str) -> Site:
    """The test site; ``make_site`` writes a fresh webhook secret unless the fixture already made one."""
    keep = (tmp_path / "webhook.secret").read_text() if (tmp_path / "webhook.secret").exists() else None
    site: Site = make_site(tmp_path, cctv)
    if keep is not None:
        (tmp_path / "webhook.secret").write_text(keep)
    return site


def test_webhook_event_arrives_signed_with_the_full_camera_url(tmp_path: Path, receiver: WebhookReceiver) -> None:
    """A stored event reaches a Standard Webhooks receiver with a valid signature, the event id as
    webhook-id, and the camera URL with its password (only there)."""
    site = site_with(tmp_path, webhook_yaml("vms", receiver.url + "/hooks/refuge"))
    store = Store(tmp_path / "db.sqlite3")
    outbox = running(Outbox(store, [make_target(c) for c in site.cctv], reveal=ev.Revealer(site),
                            mask=Masker.for_site(site)))
    try:
        event = calls(site, 1)[0][0]
        outbox.publish(event)
        receiver.wait_for(lambda: len(receiver.events) == 1, what="call.queued")
    finally:
        outbox.close()
    body = receiver.events[0]
    assert body["type"] == "call.queued" and body["data"]["camera"]["rtsp_url"] == REVEALED
    assert body["data"]["post"]["id"] == "sutton-market" and receiver.rejected == 0
    headers = {k.lower(): v for k, v in receiver.headers[0].items()}
    assert headers["webhook-id"] == event.id and headers["webhook-signature"].startswith("v1,")
    assert "S3cret" not in store.event(event.id).to_json()  # type: ignore[union-attr]


def test_a_wrong_key_is_rejected_by_the_receiver(tmp_path: Path, receiver: WebhookReceiver) -> None:
    """The receiver really verifies: a sender with another key gets 401 and the event stays pending."""
    site = site_with(tmp_path, webhook_yaml("vms", receiver.url))
    (tmp_path / "webhook.secret").write_text(new_value("webhook"))
    target = make_target(site.cctv[0])
    with pytest.raises(TargetError, match="answered HTTP 401"):
        target.deliver(calls(site, 1)[0][0])
    assert receiver.rejected == 1 and receiver.events == []


def test_body_template_and_extra_headers(tmp_path: Path, receiver: WebhookReceiver) -> None:
    """A Jinja2 body template shapes the request for a VMS; the signature covers the rendered body."""
    template = '{"alarm": "{{ type }}", "where": {{ post.name | tojson }}, "stream": {{ rtsp_url | tojson }}}'
    extra = f", headers: {{X-Api-Key: k-123}}, body_template: '{template}'"
    site = site_with(tmp_path, webhook_yaml("vms", receiver.url, extra))
    make_target(site.cctv[0]).deliver(ev.Revealer(site)(calls(site, 1)[0][0]))
    assert receiver.events == [{"alarm": "call.queued", "where": "Sutton Market Place", "stream": REVEALED}]
    assert {k.lower(): v for k, v in receiver.headers[0].items()}["x-api-key"] == "k-123"


def test_receiver_down_then_back_gets_every_event_once_in_order(tmp_path: Path, receiver: WebhookReceiver) -> None:
    """With the receiver down during three calls, all nine events arrive after it returns, in order per
    incident, each id once after de-duplication."""
    site = site_with(tmp_path, webhook_yaml("vms", receiver.url))
    outbox = running(Outbox(Store(tmp_path / "db.sqlite3"), [make_target(site.cctv[0])], backoff=FAST))
    try:
        receiver.stop()
        published = [e for call in calls(site, 3) for e in call]
        for event in published:
            outbox.publish(event)
        eventually(lambda: outbox.status()[0].failed >= 6, what="failed attempts while the receiver is down")
        assert outbox.status()[0].delivered == 0
        receiver.start()
        receiver.wait_for(lambda: len(receiver.events) == 9, what="all nine events")
        eventually(lambda: outbox.status()[0].pending == 0, what="the outbox to drain")
    finally:
        outbox.close()
    assert sorted(receiver.ids) == sorted(e.id for e in published)
    assert per_incident(receiver.events) == {f"inc-{n}": ["call.queued", "call.answered", "call.ended"]
                                             for n in range(3)}


def test_slow_and_dead_targets_do_not_delay_a_healthy_one(tmp_path: Path, receiver: WebhookReceiver) -> None:
    """While one target hangs in its first request and another refuses connections, the healthy target
    gets every event."""
    hole, dead = BlackHole(), f"http://127.0.0.1:{refused_port()}/hook"
    cctv = "\n".join([webhook_yaml("healthy", receiver.url), webhook_yaml("slow", hole.url),
                      webhook_yaml("dead", dead)])
    site = site_with(tmp_path, cctv)
    targets = [make_target(c, timeout=120) for c in site.cctv]
    outbox = running(Outbox(Store(tmp_path / "db.sqlite3"), targets, backoff=FAST))
    try:
        for event in [e for call in calls(site, 3) for e in call]:
            outbox.publish(event)
        receiver.wait_for(lambda: len(receiver.events) == 9, what="the healthy target's nine events")
        eventually(lambda: outbox.status()[0].pending == 0, what="the healthy target to record them")
        # One request per incident (each stream's head goes at once), none of a second event of an incident.
        hole.wait_for(lambda: len(hole.connections) == 3, what="the slow target's three connections")
        status = {s.name: s for s in outbox.status()}
        # The slow target is still inside its first requests: it has neither succeeded nor failed yet.
        assert len(hole.connections) == 3 and (status["slow"].delivered, status["slow"].failed) == (0, 0)
        assert status["slow"].in_flight == 3
        assert status["dead"].delivered == 0 and status["slow"].pending == status["dead"].pending == 9
        assert status["healthy"].pending == 0 and status["healthy"].last_success is not None
        eventually(lambda: outbox.status()[2].failed >= 1, what="the dead target's first failure")
        assert "cannot reach" in (outbox.status()[2].last_error or "")
    finally:
        hole.release()
        outbox.close()


def test_a_new_outbox_on_the_same_database_resumes(tmp_path: Path, receiver: WebhookReceiver) -> None:
    """Stop the outbox while deliveries are pending; a new Store and Outbox on the same file deliver
    them, in order."""
    site = site_with(tmp_path, webhook_yaml("vms", receiver.url))
    db = tmp_path / "db.sqlite3"
    receiver.fail_with = 503
    first = running(Outbox(Store(db), [make_target(site.cctv[0])], backoff=FAST))
    published = calls(site, 2)
    for event in [e for call in published for e in call]:
        first.publish(event)
    eventually(lambda: first.status()[0].failed >= 2, what="503s")
    first.close()
    first.store.close()
    receiver.fail_with = None
    second = running(Outbox(Store(db), [make_target(site.cctv[0])], backoff=FAST))
    try:
        receiver.wait_for(lambda: len(receiver.events) == 6, what="six events after the restart")
    finally:
        second.close()
    assert per_incident(receiver.events) == {"inc-0": ["call.queued", "call.answered", "call.ended"],
                                             "inc-1": ["call.queued", "call.answered", "call.ended"]}


def test_milestone_generic_event_fires_on_the_compatible_data_source(tmp_path: Path) -> None:
    """A Milestone "Compatible" generic event server (fake written from the XProtect manual: TCP, ASCII,
    echo all bytes, expression matching, localhost only) receives the templated string and matches it."""
    server = MilestoneEventServer(expressions={"RefugeQueuedSutton": ["call.queued", "sutton-market"],
                                               "RefugeAnswered": ["call.answered"]})
    try:
        site = site_with(tmp_path, f"  - {{type: milestone, name: xprotect, host: 127.0.0.1, port: {server.port},"
                                   " template: 'SIPREFUGE {type} {post_id} {workstation}'}")
        outbox = running(Outbox(Store(tmp_path / "db.sqlite3"), [make_target(site.cctv[0])], backoff=FAST))
        try:
            for event in calls(site, 1)[0]:
                outbox.publish(event)
            server.wait_for(lambda: len(server.packages) == 3, what="three generic event strings")
            eventually(lambda: outbox.status()[0].delivered == 3, what="echo-acknowledged deliveries")
        finally:
            outbox.close()
        assert server.packages[0] == "SIPREFUGE call.queued sutton-market ws-1"
        assert [name for name, _ in server.fired] == ["RefugeQueuedSutton", "RefugeAnswered"]
        # The event server serves only allowed clients: no echo is no delivery.
        server.allowed = ("192.0.2.1",)
        with pytest.raises(TargetError, match="echoed b''"):
            make_target(site.cctv[0]).deliver(calls(site, 1)[0][0])
    finally:
        server.close()


def nx_site(tmp_path: Path, server: NxServer) -> Site:
    cctv = (f"  - {{type: nx, name: nx, url: \"{server.url}\", username: admin, password_file: nx.secret,"
            " cameras: {sutton-market: \"{5f1c8cbd-0c7b-4c7f-8d28-0e9d4c0f5a11}\"}}")
    return site_with(tmp_path, cctv)


def test_nx_legacy_create_event_with_digest_auth(tmp_path: Path) -> None:
    """An Nx Witness mediaserver fake (from the Nx API docs: /api/createEvent, digest auth, error codes in
    the JSON body) gets a generic event that references the post's camera."""
    server = NxServer("admin", "nx-admin-password-1")
    server.start()
    try:
        site = nx_site(tmp_path, server)
        outbox = running(Outbox(Store(tmp_path / "db.sqlite3"), [make_target(site.cctv[0])], backoff=FAST))
        try:
            outbox.publish(calls(site, 1)[0][0])
            server.wait_for(lambda: len(server.events) == 1, what="createEvent")
        finally:
            outbox.close()
        got = server.events[0]
        assert got["metadata"] == {"cameraRefs": ["{5f1c8cbd-0c7b-4c7f-8d28-0e9d4c0f5a11}"]}
        assert got["source"] == "sip-refuge" and got["caption"] == "call.queued Sutton Market Place"
        assert "incident inc-0" in got["description"]
        server.password = "changed-on-the-server"
        with pytest.raises(TargetError, match="answered HTTP 401"):
            make_target(site.cctv[0]).deliver(calls(site, 1)[0][0])
    finally:
        server.stop()


def test_nx_rest_v4_generic_event_logs_in_again_when_the_session_expires(tmp_path: Path) -> None:
    """The Nx REST v4 fake (login/sessions bearer token, events/generic, 401 on expiry) gets both events;
    the target logs in once, then again after the session expired."""
    server = NxServer("admin", "nx-admin-password-1")
    server.start()
    try:
        site = nx_site(tmp_path, server)
        target = NxTarget("nx", server.url, "admin", "nx-admin-password-1", api="v4",
                          cameras={"sutton-market": "cam-1"})
        queued, answered, _ = calls(site, 1)[0]
        target.deliver(queued)
        server.expire_sessions()
        target.deliver(answered)
        assert server.logins == 2
        assert [(e["api"], e["state"], e["caption"], e["deviceIds"]) for e in server.events] == [
            ("v4", "instant", "call.queued Sutton Market Place", ["cam-1"]),
            ("v4", "instant", "call.answered Sutton Market Place", ["cam-1"])]
        with pytest.raises(TargetError, match="login to .* answered HTTP 401"):
            NxTarget("nx", server.url, "admin", "wrong", api="v4", cameras={}).deliver(queued)
    finally:
        server.stop()


def test_real_vlc_plays_the_calling_posts_camera(tmp_path: Path) -> None:
    """Debian's real VLC (HTTP interface, run as an unprivileged user) gets the post's full RTSP URL in its
    playlist on call.queued; a wrong password is refused."""
    with running_vlc(tmp_path) as vlc:
        site = site_with(tmp_path, f"  - {{type: vlc, name: wall, url: \"{vlc.url}\", password_file: vlc.secret}}")
        (tmp_path / "vlc.secret").write_text(vlc.password)
        targets: list[Target] = [make_target(site.cctv[0])]
        outbox = running(Outbox(Store(tmp_path / "db.sqlite3"), targets, reveal=ev.Revealer(site), backoff=FAST))
        try:
            for event in calls(site, 1)[0]:
                outbox.publish(event)
            eventually(lambda: outbox.status()[0].delivered == 3, what="three deliveries")
        finally:
            outbox.close()
        assert vlc.playlist() == [REVEALED]
        (tmp_path / "vlc.secret").write_text("not-the-vlc-password")
        with pytest.raises(TargetError, match="answered HTTP 401"):
            make_target(site.cctv[0]).deliver(ev.Revealer(site)(calls(site, 1)[0][0]))

