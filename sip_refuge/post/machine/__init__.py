"""The post's behaviour as a pure state machine: ``PostMachine.handle(event, now)`` -> commands (see :mod:`.core`)."""

from sip_refuge.post.machine.core import PostMachine
from sip_refuge.post.machine.rules import Settings, State

__all__ = ["PostMachine", "Settings", "State"]
