"""Spoken prompts at the post: shipped as WAV in the package, replaceable per site (``prompts_dir``).

Prompts play on the post's own speaker, not into the call: they tell the caller what is happening
while the call is being set up. Without a sound card (tests, demo) a null device records what it
would have played, so tests can assert on it.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
from importlib import resources
from pathlib import Path
from typing import Protocol

from sip_refuge.errors import RefugeError

log = logging.getLogger(__name__)

PROMPTS = ("connecting", "hold", "unreachable", "callback")


def prompt_path(name: str, prompts_dir: Path | None = None) -> Path:
    """The site's own ``<name>.wav`` when it has one, else the packaged prompt."""
    if name not in PROMPTS:
        raise RefugeError(f"unknown prompt {name!r} (known: {', '.join(PROMPTS)})")
    if prompts_dir is not None and (prompts_dir / f"{name}.wav").is_file():
        return prompts_dir / f"{name}.wav"
    return Path(str(resources.files("sip_refuge") / "prompts" / f"{name}.wav"))


class Audio(Protocol):
    def play(self, name: str) -> None:
        """Start playing prompt ``name``, replacing any prompt still playing; returns at once."""

    def stop(self) -> None:
        """Stop any prompt."""


class NullAudio:
    """No sound card: remember what was played (the demo and the tests read ``played``)."""

    def __init__(self, post_id: str, prompts_dir: Path | None = None) -> None:
        self.post_id, self.prompts_dir = post_id, prompts_dir
        self.played: list[str] = []

    def play(self, name: str) -> None:
        prompt_path(name, self.prompts_dir)  # an unknown or missing prompt is a bug: fail loudly here too
        self.played.append(name)
        log.info("post %s: prompt %s (null audio device)", self.post_id, name)

    def stop(self) -> None:
        return None


class AlsaAudio:
    """Play through ALSA's ``aplay`` on a real post; one prompt at a time, never blocking the caller."""

    def __init__(self, post_id: str, device: str = "default", prompts_dir: Path | None = None) -> None:
        if shutil.which("aplay") is None:
            raise RefugeError("aplay (Debian package alsa-utils) is needed to play prompts on a sound card")
        self.post_id, self.device, self.prompts_dir = post_id, device, prompts_dir
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None

    def play(self, name: str) -> None:
        path = prompt_path(name, self.prompts_dir)
        with self._lock:
            self._stop_locked()
            try:
                self._proc = subprocess.Popen(["aplay", "-q", "-D", self.device, str(path)],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            except OSError as exc:
                log.error("post %s: cannot play prompt %s: %s", self.post_id, name, exc)

    def stop(self) -> None:
        with self._lock:
            self._stop_locked()

    def _stop_locked(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(2)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
