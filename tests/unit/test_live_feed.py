"""A camera's shared live feed (sidecar/live.py): one decoder for all viewers, only while anyone watches."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from sip_refuge.errors import SidecarError
from sip_refuge.sidecar.live import LiveFeed
from tests.support.waiting import wait_for


class Decoder:
    """Stands in for CameraMonitor.mjpeg: numbered parts, as fast as the feed takes them, until stopped."""

    def __init__(self) -> None:
        self.started = 0
        self.running = 0
        self._lock = threading.Lock()

    def __call__(self, stop: threading.Event) -> Iterator[bytes]:
        with self._lock:
            self.started += 1
            run = self.started
            self.running += 1
        try:
            number = 0
            while not stop.wait(0.005):
                number += 1
                yield f"run {run} part {number}".encode()
        finally:
            with self._lock:
                self.running -= 1


class Viewer:
    def __init__(self) -> None:
        self.wakes = 0

    def wake(self) -> None:
        self.wakes += 1


@pytest.fixture()
def decoder() -> Decoder:
    return Decoder()


@pytest.fixture()
def feed(decoder: Decoder) -> Iterator[LiveFeed]:
    live = LiveFeed("sutton-market", decoder)
    yield live
    live.close()
    live.join(5)


def test_viewers_of_one_camera_share_one_decoder(feed: LiveFeed, decoder: Decoder) -> None:
    first, second = Viewer(), Viewer()
    a, b = feed.watch(first.wake), feed.watch(second.wake)
    wait_for(lambda: first.wakes > 3 and second.wakes > 3, 10, "parts for both viewers")
    assert decoder.started == 1 and decoder.running == 1 and feed.viewers() == 2
    number, part = feed.latest()
    assert part is not None and part.startswith(b"run 1 part ")
    wait_for(lambda: feed.latest()[0] > number, 10, "a newer part")
    feed.leave(a)
    assert decoder.running == 1  # the other still watches
    feed.leave(b)
    wait_for(lambda: decoder.running == 0, 10, "the decoder stopped after the last viewer left")


def test_a_new_viewing_starts_a_fresh_decoder_and_never_shows_an_old_picture(feed: LiveFeed, decoder: Decoder) -> None:
    viewer = Viewer()
    feed.leave(feed.watch(viewer.wake))
    first = feed.watch(viewer.wake)
    wait_for(lambda: feed.latest()[1], 10, "a part")
    feed.leave(first)
    wait_for(lambda: decoder.running == 0, 10, "the decoder stopped")
    later = Viewer()
    feed.watch(later.wake)
    number, part = feed.latest()
    assert part is None or part.startswith(f"run {decoder.started} ".encode())
    wait_for(lambda: later.wakes, 10, "a part of the new viewing")
    assert feed.latest()[1].startswith(f"run {decoder.started} ".encode())  # type: ignore[union-attr]
    assert decoder.running == 1


def test_a_closed_feed_stops_its_decoder_and_refuses_viewers(feed: LiveFeed, decoder: Decoder) -> None:
    feed.watch(Viewer().wake)
    wait_for(lambda: decoder.running == 1, 10, "the decoder running")
    feed.close()
    feed.join(5)
    assert decoder.running == 0
    with pytest.raises(SidecarError, match="stopping"):
        feed.watch(Viewer().wake)


def test_a_failing_decoder_is_logged_and_started_again(caplog: pytest.LogCaptureFixture) -> None:
    runs: list[int] = []

    def source(stop: threading.Event) -> Iterator[bytes]:
        runs.append(1)
        yield b"a part"
        if len(runs) == 1:
            raise RuntimeError("the decoder broke")
        while not stop.wait(0.005):
            yield b"another part"

    feed = LiveFeed("idlewells", source)
    viewer = Viewer()
    feed.watch(viewer.wake)
    try:
        wait_for(lambda: feed.latest()[1] == b"another part", 10, "parts from the restarted decoder")
    finally:
        feed.close()
        feed.join(5)
    assert "post idlewells: live view failed" in caplog.text
