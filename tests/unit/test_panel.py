"""The button/LED panel on gpiozero's MockFactory: real gpiozero devices on mock pins, no MagicMock."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from gpiozero import Device
from gpiozero.pins.mock import MockFactory, MockPin
from gpiozero.threads import GPIOThread

from sip_refuge.config.model import Gpio
from sip_refuge.errors import PanelError
from sip_refuge.post.commands import Light, SetLights
from sip_refuge.post.events import ButtonPressed, ButtonReleased, Event, TamperChanged
from sip_refuge.post.panel import MockPanel, Panel

GPIO = Gpio(button=17, yellow=22, green=23, red=24, tamper=25)
# Short enough for a quick test, long enough to sit well above the tolerance of assert_states_and_times.
BLINK = {Light.BLINK: (0.1, 0.1), Light.FLASH: (0.05, 0.05)}


@pytest.fixture
def factory() -> Iterator[MockFactory]:
    mock = MockFactory()
    yield mock
    mock.close()


@pytest.fixture
def events() -> queue.Queue[Event]:
    return queue.Queue()


@pytest.fixture
def panel(factory: MockFactory, events: queue.Queue[Event]) -> Iterator[Panel]:
    with Panel(GPIO, events.put, pin_factory=factory, post_id="sutton-market", blink_times=BLINK) as p:
        yield p


def pin(factory: MockFactory, number: int) -> MockPin:
    found: MockPin = factory.pin(number)
    return found


def drained(events: queue.Queue[Event]) -> list[Event]:
    out = []
    while not events.empty():
        out.append(events.get_nowait())
    return out


def wait_for(condition: Callable[[], bool], limit: float = 5.0) -> None:
    # Waits on gpiozero's blink thread, which runs on real time; the limit only bounds a broken test.
    deadline = time.monotonic() + limit
    pause = threading.Event()
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        pause.wait(0.01)


def blink_threads() -> list[Any]:
    # Exactly GPIOThread: each Button also owns a HoldThread (a subclass) for its whole life.
    return [t for t in threading.enumerate() if type(t) is GPIOThread and t.is_alive()]


def test_a_button_edge_enqueues_press_and_release(panel: Panel, factory: MockFactory,
                                                  events: queue.Queue[Event]) -> None:
    button = pin(factory, 17)
    assert button.state is True  # pulled up: released
    button.drive_low()
    button.drive_high()
    assert drained(events) == [ButtonPressed(), ButtonReleased()]


def test_steady_lights_follow_the_command(panel: Panel, factory: MockFactory) -> None:
    for number in (22, 23):
        pin(factory, number).clear_states()
    panel.apply(SetLights(yellow=Light.ON))
    panel.apply(SetLights(yellow=Light.ON, green=Light.ON))
    panel.apply(SetLights(green=Light.ON))
    pin(factory, 22).assert_states_and_times([(0.0, False), (0.0, True), (0.0, False)])
    pin(factory, 23).assert_states_and_times([(0.0, False), (0.0, True)])
    assert pin(factory, 24).states[-1].state is False
    assert panel.shown() == {"yellow": "off", "green": "on", "red": "off"}


def test_blink_pattern_over_time(panel: Panel, factory: MockFactory) -> None:
    red = pin(factory, 24)
    red.clear_states()  # times are measured from here, not from when the fixture made the pin
    panel.apply(SetLights(red=Light.BLINK))
    wait_for(lambda: len(red.states) >= 6)
    panel.apply(SetLights(red=Light.ON))  # stops and joins the blink thread
    red.assert_states([False, True, False, True, False, True])
    red.assert_states_and_times([(0.0, False), (0.0, True), (0.1, False), (0.1, True), (0.1, False), (0.1, True)])
    assert red.states[-1].state is True and blink_threads() == []


def test_repeating_the_same_blink_keeps_its_rhythm(panel: Panel, factory: MockFactory) -> None:
    green = pin(factory, 23)
    green.clear_states()
    panel.apply(SetLights(green=Light.BLINK))
    wait_for(lambda: len(green.states) >= 3)
    panel.apply(SetLights(green=Light.BLINK, red=Light.ON))  # a restart here would stretch a phase
    wait_for(lambda: len(green.states) >= 5)
    panel.apply(SetLights())
    green.assert_states_and_times([(0.0, False), (0.0, True), (0.1, False), (0.1, True), (0.1, False)])


def test_fast_flash_uses_its_own_times(panel: Panel, factory: MockFactory) -> None:
    yellow = pin(factory, 22)
    yellow.clear_states()
    panel.apply(SetLights(yellow=Light.FLASH))
    wait_for(lambda: len(yellow.states) >= 4)
    panel.apply(SetLights())
    yellow.assert_states_and_times([(0.0, False), (0.0, True), (0.05, False), (0.05, True)])


def test_tamper_loop_opening_and_closing(panel: Panel, factory: MockFactory, events: queue.Queue[Event]) -> None:
    loop = pin(factory, 25)
    loop.drive_low()  # housing closed
    panel.sync()
    loop.drive_high()
    assert drained(events) == [TamperChanged(False), TamperChanged(False), TamperChanged(True)]


def test_panel_without_tamper_input(factory: MockFactory, events: queue.Queue[Event]) -> None:
    with Panel(Gpio(17, 22, 23, 24), events.put, pin_factory=factory) as p:
        p.sync()
        assert p.tamper is None and drained(events) == []


def test_a_failing_emit_never_reaches_gpiozero(factory: MockFactory, caplog: pytest.LogCaptureFixture) -> None:
    def broken(event: Event) -> None:
        raise RuntimeError("queue gone")

    with Panel(GPIO, broken, pin_factory=factory, post_id="sutton-market"):
        pin(factory, 17).drive_low()
    assert "sutton-market" in caplog.text and "queue gone" in caplog.text


def test_a_bad_pin_is_a_panel_error(factory: MockFactory, events: queue.Queue[Event]) -> None:
    with pytest.raises(PanelError, match="post p1: cannot set up GPIO"):
        Panel(Gpio(17, 22, 23, 99), events.put, pin_factory=factory, post_id="p1")
    # The devices made before the bad pin were released: the same pins can be used again.
    with Panel(Gpio(17, 22, 23, 24), events.put, pin_factory=factory):
        pass


def test_the_global_pin_factory_is_never_touched(events: queue.Queue[Event]) -> None:
    before = Device.pin_factory
    with MockPanel(GPIO, events.put):
        pass
    assert Device.pin_factory is before


def test_mock_panel_press_drives_the_pin_low_then_high(events: queue.Queue[Event]) -> None:
    with MockPanel(GPIO, events.put, post_id="sutton-market", blink_times=BLINK) as mock:
        drained(events)  # the mock housing closing at start
        button = pin(mock.factory, 17)
        button.clear_states()
        mock.press()
        button.assert_states([True, False, True])
        mock.hold()
        mock.release()
        mock.open_tamper()
        mock.close_tamper()
    assert drained(events) == [ButtonPressed(), ButtonReleased(), ButtonPressed(), ButtonReleased(),
                               TamperChanged(True), TamperChanged(False)]


def test_mock_panel_without_tamper_refuses_to_open_it(events: queue.Queue[Event]) -> None:
    with MockPanel(Gpio(17, 22, 23, 24), events.put, post_id="p1") as mock, pytest.raises(PanelError):
        mock.open_tamper()


def test_closing_stops_blinking(events: queue.Queue[Event], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    mock = MockPanel(GPIO, events.put, blink_times=BLINK)
    mock.apply(SetLights(Light.BLINK, Light.FLASH, Light.BLINK))
    assert len(blink_threads()) == 3
    mock.close()
    assert blink_threads() == [] and caplog.records == []
