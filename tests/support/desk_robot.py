"""The desk robot lives in the package (the demo uses it too); tests import it from here as well."""

from sip_refuge.demo.robot import DeskRobot, Ring, goertzel_power, tone_pcm

__all__ = ["DeskRobot", "Ring", "goertzel_power", "tone_pcm"]
