"""The one exception tree of sip-refuge.

Code raises a subclass of :class:`RefugeError` for every failure a user or operator can meet, so the
command line and the thread boundaries can report it cleanly instead of printing a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


class RefugeError(Exception):
    """Base of every error sip-refuge raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One mistake in a site file, located to the line."""

    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.path}: {self.message}"


class ConfigError(RefugeError):
    """The site file has mistakes; ``problems`` lists every one of them."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class PbxError(RefugeError):
    """Asterisk could not be found, built, started or asked something."""


class SipError(RefugeError):
    """A SIP backend failed (registration, call, media)."""


class PanelError(RefugeError):
    """The post's button/LED panel could not be driven."""


class SidecarError(RefugeError):
    """The sidecar could not start or do its work."""
