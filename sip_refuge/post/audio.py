"""Spoken prompts at the post: shipped as WAV in the package, replaceable per site (``prompts_dir``).

Prompts play on the post's own speaker, not into the call: they tell the caller what is happening while the call
is being set up. They play through the SIP backend's audio path, the one owner of the sound card (pjsua2: a player
on its conference bridge; pyVoIP: its audio engine), one after another, until the machine stops them.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from sip_refuge.errors import RefugeError
from sip_refuge.post.pcm import audioop
from sip_refuge.post.sound import read_wav

PROMPTS = ("connecting", "hold", "unreachable", "callback")


def prompt_path(name: str, prompts_dir: Path | None = None) -> Path:
    """The site's own ``<name>.wav`` when it has one, else the packaged prompt."""
    if name not in PROMPTS:
        raise RefugeError(f"unknown prompt {name!r} (known: {', '.join(PROMPTS)})")
    if prompts_dir is not None and (prompts_dir / f"{name}.wav").is_file():
        return prompts_dir / f"{name}.wav"
    return Path(str(resources.files("sip_refuge") / "prompts" / f"{name}.wav"))


def prompt_pcm(name: str, prompts_dir: Path | None, rate: int) -> bytes:
    """Prompt ``name`` as 16-bit mono samples at ``rate`` (a site's prompt must be 16-bit mono, 8/16/48 kHz)."""
    pcm, file_rate = read_wav(prompt_path(name, prompts_dir))
    if file_rate != rate:
        pcm, _ = audioop.ratecv(pcm, 2, 1, file_rate, rate, None)
    return pcm
