"""Shared by the inspect and report tests: real runs of the CLI, and archives read back with plain h5py."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import h5py
import numpy as np

from hpcprune.archive.reader import open_archive
from hpcprune.cli import main
from tests.helpers import CONFIGS, run_cli

SMOKE = str(CONFIGS / "smoke.yaml")  # three iterative rounds with fine-tuning on synthetic data
ONESHOT = str(CONFIGS / "oneshot_global.yaml")  # one round, no training, LeNet-5


def prune(folder: Path, config: str, *settings: str) -> Path:
    """Run `hpcprune prune` for real; the archive it wrote."""
    out = folder / "run.h5"
    finished = run_cli("prune", "--config", config, "--out", str(out), *(arg for s in settings for arg in ("--set", s)))
    assert finished.returncode == 0, finished.stderr
    return out


def mask_bits(path: Path, round_index: int) -> dict[str, np.ndarray]:
    """Each tensor's flat bool mask (True = kept), straight from HDF5 with numpy."""
    with h5py.File(path, "r") as archive:
        group = archive[f"rounds/{round_index:04d}/masks"]
        return {dataset.attrs["name"]: np.unpackbits(dataset[()], count=int(np.prod(dataset.attrs["shape"]))).astype(bool)
                for dataset in group.values()}


def round_attrs(path: Path, round_index: int) -> dict:
    with h5py.File(path, "r") as archive:
        return dict(archive[f"rounds/{round_index:04d}"].attrs)


def copy_run(path: Path, folder: Path) -> Path:
    """The archive and its side folders (states, masks) copied into `folder` (relative paths keep working)."""
    folder.mkdir(parents=True, exist_ok=True)
    side = open_archive(path).side
    shutil.copy(path, folder / path.name)
    for kept in (side.states, side.masks):
        if kept.exists():
            shutil.copytree(kept, folder / kept.name)
    return folder / path.name


def older_format(path: Path, folder: Path) -> Path:
    """A copy of the archive marked as written in format 0."""
    old = copy_run(path, folder)
    with h5py.File(old, "a") as archive:
        archive.attrs["format_version"] = 0
    return old


def truncated(path: Path, folder: Path) -> Path:
    """The first half of the archive's bytes, as a copy cut off mid-write would leave it."""
    folder.mkdir(parents=True, exist_ok=True)
    cut = folder / "cut.h5"
    data = path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    return cut


def run_main(args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """The CLI's own entry point in this process: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["hpcprune", *args])
    try:
        main()
        status = 0
    except SystemExit as done:
        status = done.code or 0
    captured = capsys.readouterr()
    return status, captured.out, captured.err
