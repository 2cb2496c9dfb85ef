"""Small file systems made for a test (tmpfs): read-only, or full. Mounting needs root with CAP_SYS_ADMIN.

The `mounted` fixture is registered for every test module by tests/conftest.py.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest


@pytest.fixture
def mounted(tmp_path):
    """A fresh mount point (tmpfs): mount options set its limits; unmounted at the end."""
    points = []

    def mount(options: str) -> Path:
        point = tmp_path / f"mount{len(points)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True, text=True)
        if done.returncode != 0:
            from tests.conftest import missing  # here: conftest imports this module

            missing("mounting a tmpfs", f"needs root with CAP_SYS_ADMIN: {done.stderr.strip()}")
        points.append(point)
        return point

    yield mount
    for point in reversed(points):
        subprocess.run(["umount", "-l", str(point)], check=False)


def fill(folder: Path, leave: int) -> None:
    """Fill the file system of `folder` until at most `leave` bytes are free."""
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(folder / "filler", "wb") as filler:
        filler.write(b"\0" * max(0, free - leave))
    while os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize > leave:
        with open(folder / "filler", "ab") as filler:
            filler.write(b"\0" * 4096)


def remount(point: Path, options: str) -> None:
    """Change the options of a mount made by `mounted` (e.g. "ro" once an archive is written)."""
    subprocess.run(["mount", "-o", f"remount,{options}", str(point)], check=True, capture_output=True)
