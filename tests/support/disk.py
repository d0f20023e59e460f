"""A real small filesystem that tests fill up: a tmpfs mounted for the test, so "disk full" is the kernel's ENOSPC.

Mounting needs root. The tests run as root here and in CI; anywhere else the test fails and says why (it is
never skipped: a disk-full that is not tested is a disk-full that loses events).
"""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path
from types import TracebackType


class SmallDisk:
    """``with SmallDisk(folder, "4m") as disk:`` mounts a tmpfs of that size on ``folder``."""

    def __init__(self, path: Path, size: str = "4m") -> None:
        self.path, self.size = path, size
        self.filler = path / "filler"
        self.mounted = False

    def __enter__(self) -> SmallDisk:
        self.path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0700", "tmpfs", str(self.path)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise AssertionError(f"cannot mount a {self.size} tmpfs on {self.path} for a real disk-full test "
                                 f"(run the tests as root, as CI does): {(done.stderr or done.stdout).strip()}")
        self.mounted = True
        return self

    def fill(self) -> int:
        """Write until the filesystem refuses (ENOSPC); returns the bytes written."""
        written = 0
        with open(self.filler, "ab", buffering=0) as f:
            for chunk in (1 << 16, 4096, 1):
                try:
                    while True:
                        written += f.write(b"\0" * chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
        return written

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True, check=False)
            self.mounted = False
