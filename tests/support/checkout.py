"""This checkout as it is now (tracked and new files, not ignored ones), copied elsewhere: what a clone gives.

Tests that build or install sip-refuge start from such a copy, so nothing of the working folder that git
would not ship (``build/``, ``*.egg-info``, caches) can reach what they test, and the checkout stays clean.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def copy_checkout(target: Path) -> Path:
    """Copy the files git would commit now (links kept as links) into ``target``."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if not os.path.lexists(source):
            continue  # deleted in the working tree
        dest = target / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            dest.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, dest)
    return target


def git_snapshot(target: Path) -> Path:
    """:func:`copy_checkout` as a git repository with one commit: something to ``git clone``."""
    copy_checkout(target)
    git = ["git", "-C", str(target), "-c", "user.name=sip-refuge tests", "-c", "user.email=tests@localhost"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "the checkout under test"], check=True)
    return target
