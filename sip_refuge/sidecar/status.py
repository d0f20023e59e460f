"""What the sidecar knows now about each post and camera, kept in memory and written through to the store.

Loaded from the store at start, so the pages show a post's latest state at once, and kept in memory, so they
go on showing it while the store cannot write. A post's status merges what reaches the sidecar from two
sides: its agent's telemetry (state, registration, faults, last self-test) and Asterisk (reachable or not).
Not thread-safe: the recorder uses it under its lock.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from sip_refuge.sidecar.records import CameraStatus, PostStatus
from sip_refuge.telemetry import Telemetry


class StatusBoard:
    def __init__(self, posts: dict[str, PostStatus], cameras: dict[str, CameraStatus]) -> None:
        self._posts, self._cameras = dict(posts), dict(cameras)

    def posts(self) -> dict[str, PostStatus]:
        return dict(self._posts)

    def cameras(self) -> dict[str, CameraStatus]:
        return dict(self._cameras)

    def faults(self, post_id: str) -> set[str]:
        """The faults the post's agent reported last (none known: empty)."""
        previous = self._posts.get(post_id)
        return set(previous.detail.get("faults") or []) if previous is not None and previous.detail else set()

    def telemetry(self, post_id: str, message: Telemetry, at: str) -> PostStatus:
        """Merge an agent's report: its state and faults replace the last ones; a report without a self-test
        result keeps the last result known; reachability stays Asterisk's."""
        previous = self._posts.get(post_id)
        detail: dict[str, Any] = {"registered": message.registered, "faults": list(message.faults),
                                  "mock_gpio": message.mock_gpio, "sip_counters": dict(message.sip_counters)}
        last = message.last_self_test
        if last is not None:
            detail["last_self_test"] = asdict(last)
        elif previous is not None and previous.detail and "last_self_test" in previous.detail:
            detail["last_self_test"] = previous.detail["last_self_test"]
        status = self._posts[post_id] = PostStatus(post_id, at, previous.online if previous else None,
                                                   message.state, previous.contact if previous else None, detail)
        return status

    def reachability(self, post_id: str, online: bool, at: str) -> PostStatus:
        previous = self._posts.get(post_id)
        status = self._posts[post_id] = PostStatus(
            post_id, at, online, previous.state if previous else None, previous.contact if previous else None,
            previous.detail if previous else None)
        return status

    def camera(self, post_id: str, ok: bool, reason: str, at: str) -> CameraStatus:
        status = self._cameras[post_id] = CameraStatus(post_id, at, ok, reason)
        return status
