"""The post's button, LEDs and tamper input through gpiozero.

gpiozero calls our callbacks on its own threads (or, with MockFactory, on the thread that drives a pin),
so callbacks only hand an event to ``emit`` (normally the runner's queue ``put``): the machine is only ever
touched by the runner's thread. The pin factory is injected, never taken from ``Device.pin_factory``, so
two panels (or a test and a panel) never share global state and no fallback warning is raised.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Self

from gpiozero import LED, Button
from gpiozero.pins.mock import MockFactory, MockPin

from sip_refuge.config.model import Gpio
from sip_refuge.errors import PanelError
from sip_refuge.post.commands import Light, SetLights
from sip_refuge.post.events import ButtonPressed, ButtonReleased, Event, TamperChanged

log = logging.getLogger(__name__)

# (on, off) seconds. Slow enough to read from across a platform, different enough to tell apart.
BLINK_TIMES: Mapping[Light, tuple[float, float]] = {Light.BLINK: (0.5, 0.5), Light.FLASH: (0.15, 0.15)}

# gpiozero filters edges closer than this; the machine debounces logically on top, because long cables
# (field notes, complaint 10) bounce longer than any value that still feels instant.
BOUNCE_TIME = 0.01

# We never use gpiozero's when_held (the machine times a stuck button itself), but every Button's hold
# thread waits this long when it is closed while pressed; a closed tamper loop is "pressed" for good.
HOLD_TIME = 0.1


class Panel:
    """Button (to ground, internal pull-up), yellow/green/red LEDs and an optional normally-closed tamper loop."""

    def __init__(self, gpio: Gpio, emit: Callable[[Event], None], *, pin_factory: Any, post_id: str = "",
                 bounce_time: float | None = BOUNCE_TIME,
                 blink_times: Mapping[Light, tuple[float, float]] = BLINK_TIMES) -> None:
        self.post_id = post_id
        self._emit = emit
        self._blink_times = blink_times
        self._shown: dict[str, Light] = {}
        self._devices: list[Any] = []
        try:
            self.button: Any = self._keep(Button(gpio.button, pull_up=True, bounce_time=bounce_time,
                                                 hold_time=HOLD_TIME, pin_factory=pin_factory))
            self.leds: dict[str, Any] = {
                colour: self._keep(LED(pin, pin_factory=pin_factory))
                for colour, pin in (("yellow", gpio.yellow), ("green", gpio.green), ("red", gpio.red))
            }
            self.tamper: Any = None
            if gpio.tamper is not None:
                self.tamper = self._keep(Button(gpio.tamper, pull_up=True, bounce_time=bounce_time,
                                                hold_time=HOLD_TIME, pin_factory=pin_factory))
        except Exception as exc:  # gpiozero raises many unrelated types for "this pin cannot be used"
            self.close()
            raise PanelError(f"post {post_id}: cannot set up GPIO {gpio}: {exc}") from exc
        self.button.when_pressed = self._pressed
        self.button.when_released = self._released
        if self.tamper is not None:
            # Normally closed: a closed loop pulls the pin low; an open housing or a cut wire lets it rise.
            self.tamper.when_pressed = self._tamper_closed
            self.tamper.when_released = self._tamper_opened

    def _keep(self, device: Any) -> Any:
        self._devices.append(device)
        return device

    # -- gpiozero threads: enqueue only -------------------------------------------------------------
    def _pressed(self) -> None:
        self._send(ButtonPressed())

    def _released(self) -> None:
        self._send(ButtonReleased())

    def _tamper_opened(self) -> None:
        self._send(TamperChanged(active=True))

    def _tamper_closed(self) -> None:
        self._send(TamperChanged(active=False))

    def _send(self, event: Event) -> None:
        # This is a thread boundary: an exception here would kill gpiozero's event thread silently.
        try:
            self._emit(event)
        except Exception:
            log.exception("post %s: cannot enqueue %s", self.post_id, event)

    # -- the runner's thread ------------------------------------------------------------------------
    def sync(self) -> None:
        """Emit the tamper state as it is now: edges alone would miss a housing already open at boot."""
        if self.tamper is not None:
            self._send(TamperChanged(active=not self.tamper.is_pressed))

    def apply(self, lights: SetLights) -> None:
        for colour, pattern in (("yellow", lights.yellow), ("green", lights.green), ("red", lights.red)):
            # Restarting an unchanged blink would reset its phase and make it stutter on every command.
            if self._shown.get(colour) is pattern:
                continue
            led = self.leds[colour]
            if pattern is Light.ON:
                led.on()
            elif pattern is Light.OFF:
                led.off()
            else:
                on_time, off_time = self._blink_times[pattern]
                led.blink(on_time=on_time, off_time=off_time, n=None, background=True)
            self._shown[colour] = pattern

    def shown(self) -> dict[str, str]:
        """The pattern each LED is showing (for status output)."""
        return {colour: str(self._shown.get(colour, Light.OFF)) for colour in self.leds}

    def close(self) -> None:
        for device in reversed(self._devices):
            device.close()  # stops blink threads and releases the pins
        self._devices.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class MockPanel(Panel):
    """``--gpio mock``: the same panel on its own gpiozero MockFactory, with hands to push the button."""

    def __init__(self, gpio: Gpio, emit: Callable[[Event], None], *, post_id: str = "",
                 blink_times: Mapping[Light, tuple[float, float]] = BLINK_TIMES) -> None:
        self.factory = MockFactory()
        super().__init__(gpio, emit, pin_factory=self.factory, post_id=post_id, blink_times=blink_times)
        if self.tamper is not None:
            self._pin(self.tamper).drive_low()  # a mock housing starts closed

    @staticmethod
    def _pin(device: Any) -> MockPin:
        pin: MockPin = device.pin
        return pin

    def press(self) -> None:
        """A short press: the button pin goes low, then high again."""
        self.hold()
        self.release()

    def hold(self) -> None:
        self._pin(self.button).drive_low()

    def release(self) -> None:
        self._pin(self.button).drive_high()

    def open_tamper(self) -> None:
        if self.tamper is None:
            raise PanelError(f"post {self.post_id} has no tamper input")
        self._pin(self.tamper).drive_high()

    def close_tamper(self) -> None:
        if self.tamper is None:
            raise PanelError(f"post {self.post_id} has no tamper input")
        self._pin(self.tamper).drive_low()

    def close(self) -> None:
        super().close()
        self.factory.close()
