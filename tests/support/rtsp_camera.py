"""The RTSP test camera lives in the package (the demo uses it too); tests import it from here as well."""

from sip_refuge.demo.camera import MODES, READY, TestCamera

__all__ = ["MODES", "READY", "TestCamera"]
