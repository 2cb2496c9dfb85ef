"""Shared by the tests: run the real CLI in a subprocess and read archives with plain h5py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


def run_cli(*args: str, timeout: float = 600, env: dict | None = None, python_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`python -m hpcprune ARGS` with the repository importable; returns the finished process."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, *python_args, "-m", "hpcprune", *args], capture_output=True, text=True,
                          timeout=timeout, env=environment, cwd=ROOT)


def archive_masks(path: Path, round_index: int) -> dict[str, np.ndarray]:
    """The packed mask bytes of one round, straight from HDF5."""
    with h5py.File(path, "r") as archive:
        group = archive[f"rounds/{round_index:04d}/masks"]
        return {name: group[name][()] for name in group}


def complete_rounds(path: Path) -> list[int]:
    with h5py.File(path, "r") as archive:
        rounds = archive.get("rounds", {})
        return sorted(int(name) for name in rounds if rounds[name].attrs.get("status") == "complete")
