"""Event payloads (spec section 6) and where the camera password may and may not appear."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from sip_refuge.config.model import Camera, Secret, Site
from sip_refuge.config.secrets import Masker, mask_url
from sip_refuge.errors import SidecarError
from sip_refuge.sidecar import events as ev
from tests.support.receivers import CAMERA_PASSWORD, make_site

NOW = datetime(2026, 11, 26, 21, 4, 5, 123456, tzinfo=UTC)


@pytest.fixture()
def site(tmp_path: Path) -> Site:
    site: Site = make_site(tmp_path)
    return site


def test_call_queued_has_exactly_the_spec_shape(site: Site) -> None:
    event = ev.build_event(ev.CALL_QUEUED, site, post_id="sutton-market", now=NOW, incident="inc-1",
                           reference="REC-0001", snapshot_url="http://sidecar/snapshots/inc-1.jpg")
    body = json.loads(event.to_json())
    assert body == {
        "type": "call.queued",
        "timestamp": "2026-11-26T21:04:05.123Z",
        "data": {
            "incident": "inc-1",
            "reference": "REC-0001",
            "post": {"id": "sutton-market", "name": "Sutton Market Place",
                     "location": {"address": "Market Place, Sutton-in-Ashfield", "lat": 53.1246, "lon": -1.2617}},
            "camera": {"rtsp_url": "rtsp://viewer@10.20.5.11:554/stream1"},
            "desk": None,
            "snapshot_url": "http://sidecar/snapshots/inc-1.jpg",
        },
    }
    assert event.id.startswith("evt_") and event.stream == "incident:inc-1"


def test_call_answered_names_desk_and_workstation(site: Site) -> None:
    event = ev.build_event(ev.CALL_ANSWERED, site, post_id="sutton-market", now=NOW, incident="inc-1",
                           desk_id="desk-1")
    assert event.body["data"]["desk"] == {"id": "desk-1", "name": "Operator Desk 1", "extension": "2001",
                                          "workstation": "ws-1"}


def test_every_type_builds_and_extra_fields_never_override(site: Site) -> None:
    for type_ in ev.EVENT_TYPES:
        event = ev.build_event(type_, site, post_id="bus-station", now=NOW, reason="black image",
                               extra={"post": "overridden?", "probe": {"mean": 0.4}})
        data: dict[str, Any] = event.body["data"]
        assert event.body["type"] == type_ and data["reason"] == "black image"
        assert data["post"]["id"] == "bus-station" and data["probe"] == {"mean": 0.4}
        assert data["post"]["location"] == {"address": "Station Street, Kirkby-in-Ashfield", "lat": None,
                                            "lon": None}
        assert event.stream == "post:bus-station"


@pytest.mark.parametrize("kwargs, message", [
    ({"type_": "call.lost", "post_id": "sutton-market"}, "unknown event type"),
    ({"type_": "call.queued", "post_id": "nowhere"}, "no post with id 'nowhere'"),
    ({"type_": "call.answered", "post_id": "sutton-market", "desk_id": "desk-9"}, "no desk with id 'desk-9'"),
])
def test_bad_requests_raise_sidecar_errors(site: Site, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(SidecarError, match=message):
        ev.build_event(site=site, now=NOW, **kwargs)


def test_timestamps_are_utc_with_milliseconds() -> None:
    assert ev.iso_utc(datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2)))) == "2026-01-02T01:04:05.000Z"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ev.iso_utc(datetime.now(UTC)))
    with pytest.raises(SidecarError):
        ev.iso_utc(datetime(2026, 1, 2))


def test_stored_body_has_no_camera_password_and_revealer_adds_it(site: Site) -> None:
    event = ev.build_event(ev.CALL_QUEUED, site, post_id="sutton-market", now=NOW, incident="inc-1")
    assert CAMERA_PASSWORD not in event.to_json()
    revealed = ev.Revealer(site)(event)
    url = revealed.body["data"]["camera"]["rtsp_url"]
    assert url == "rtsp://viewer:cam-S3cret%21pw%2Fwith%40odd@10.20.5.11:554/stream1"
    assert revealed.id == event.id and revealed.body["data"]["post"] == event.body["data"]["post"]
    assert event.body["data"]["camera"]["rtsp_url"] == "rtsp://viewer@10.20.5.11:554/stream1"  # unchanged
    # What a log line would show of the revealed event is masked by the site's masker and by mask_url alone.
    assert mask_url(revealed.to_json()).count("viewer:***@10.20.5.11") == 1
    assert "S3cret" not in Masker.for_site(site)(revealed.to_json())


def test_revealer_leaves_cameras_without_password_alone(site: Site) -> None:
    event = ev.build_event(ev.POST_OFFLINE, site, post_id="bus-station", now=NOW)
    assert ev.Revealer(site)(event).body == event.body


def test_camera_url_masks_an_inline_password_unless_revealed(tmp_path: Path) -> None:
    inline = Camera("rtsp://admin:hunter22@10.0.0.9/live")
    assert ev.camera_url(inline, reveal=False) == "rtsp://admin:***@10.0.0.9/live"
    assert ev.camera_url(inline, reveal=True) == "rtsp://admin:hunter22@10.0.0.9/live"
    secret = tmp_path / "pw"
    secret.write_text("p@ss word\n")
    v6 = Camera("rtsp://op@[fd00::5]:8554/s?x=1", "op", Secret(file=secret))
    assert ev.camera_url(v6, reveal=True) == "rtsp://op:p%40ss%20word@[fd00::5]:8554/s?x=1"
    assert ev.camera_url(v6, reveal=False) == "rtsp://op@[fd00::5]:8554/s?x=1"
    assert ev.camera_url(Camera("rtsp://10.0.0.1/s"), reveal=True) == "rtsp://10.0.0.1/s"


def test_missing_camera_secret_still_gives_a_url(tmp_path: Path) -> None:
    camera = Camera("rtsp://op@10.0.0.1/s", "op", Secret(file=tmp_path / "missing"))
    assert ev.camera_url(camera, reveal=True) == "rtsp://op@10.0.0.1/s"


def test_json_round_trip_through_the_store_form(site: Site) -> None:
    event = ev.build_event(ev.CAMERA_FAULT, site, post_id="sutton-market", now=NOW, reason="frozen")
    again = ev.event_from_json(event.id, event.incident, event.post_id, event.to_json())
    assert again == ev.Event(event.id, event.type, event.timestamp, None, "sutton-market", json.loads(event.to_json()))
    assert again.to_json() == event.to_json()
