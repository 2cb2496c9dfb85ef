"""Shared by the tests: run the real CLI and launchers in a subprocess, and read archives with plain h5py."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"

MPI_ENV = {
    # Open MPI refuses root and more ranks than cores unless told; CI runs as root on 2 cores.
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
    "PYTHONPATH": str(ROOT),
    # One thread per process: ranks side by side on two cores must not fight over threads.
    "OMP_NUM_THREADS": "1",
}


def mpi_env(**extra: str) -> dict[str, str]:
    """This process's environment with MPI_ENV and `extra` on top: what the launched ranks get."""
    return {**os.environ, **MPI_ENV, **extra}


def run_cli(*args: str, timeout: float = 600, env: dict | None = None, python_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`python -m hpcprune ARGS` with the repository importable; returns the finished process."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, *python_args, "-m", "hpcprune", *args], capture_output=True, text=True,
                          timeout=timeout, env=environment, cwd=ROOT)


def launch(command: list[str], timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`command` (under mpirun, torchrun or none) in the repository with mpi_env() and `env`; the finished process."""
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=mpi_env(**(env or {})))


def driver(*args: str) -> list[str]:
    """The command line of tests/drivers.py with ARGS (put a launcher in front for ranks)."""
    return [sys.executable, "-m", "tests.drivers", *args]


def torchrun(ranks: int, *args: str) -> list[str]:
    """`torchrun --nproc_per_node RANKS ARGS`, through this interpreter."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), *args]


def archive_masks(path: Path, round_index: int) -> dict[str, np.ndarray]:
    """The packed mask bytes of one round, straight from HDF5."""
    with h5py.File(path, "r") as archive:
        group = archive[f"rounds/{round_index:04d}/masks"]
        return {name: group[name][()] for name in group}


def updated_weights(path: Path) -> dict[str, bytes]:
    """A block-sequential run's updated weights (methods that change them), as the bytes of each
    float32 tensor, from the shards its blocks table names; {} for a method that changes none."""
    from safetensors.numpy import load_file

    from hpcprune.archive.blocks import recorded_blocks

    return {name: tensor.tobytes() for row in recorded_blocks(path, 1) if row["weights_file"]
            for name, tensor in load_file(row["weights_file"]).items()}


def flip_mask_byte(path: Path, round_index: int, tensor: str) -> None:
    """Damage one byte inside the stored chunk of a mask, in whichever file holds it (a part file)."""
    with h5py.File(path, "r") as archive:
        dataset = archive[f"rounds/{round_index:04d}/masks/{tensor}"]
        holder, chunk = dataset.file.filename, dataset.id.get_chunk_info(0)
    with open(holder, "r+b") as raw:
        raw.seek(chunk.byte_offset + chunk.size // 2)
        byte = raw.read(1)
        raw.seek(-1, os.SEEK_CUR)
        raw.write(bytes([byte[0] ^ 0xFF]))


def damage(path: Path, how: str, round_index: int, tensor: str = "fc1.weight") -> None:
    """Break an archive's structure as a hand or a bad copy would: delete round `round_index` ("round"),
    its mask of `tensor` ("mask") or the part file holding it ("part"), transpose that mask's shape
    attribute ("shape"), or make /checkpoint continue after round `round_index` ("checkpoint")."""
    with h5py.File(path, "a") as archive:
        if how == "round":
            del archive[f"rounds/{round_index:04d}"]
        elif how == "checkpoint":
            archive["checkpoint"].attrs["round"] = round_index
        elif how == "part":
            (Path(path).parent / archive[f"rounds/{round_index:04d}/masks"].get(tensor, getlink=True).filename).unlink()
        elif how == "mask":
            del archive[f"rounds/{round_index:04d}/masks/{tensor}"]
        elif how == "shape":
            mask = archive[f"rounds/{round_index:04d}/masks/{tensor}"]
            mask.attrs["shape"] = mask.attrs["shape"][::-1]


def complete_rounds(path: Path) -> list[int]:
    with h5py.File(path, "r") as archive:
        rounds = archive.get("rounds", {})
        return sorted(int(name) for name in rounds if rounds[name].attrs.get("status") == "complete")


def assert_same_masks(mine: Path, reference: Path, rounds: Iterable[int] | None = None) -> None:
    """The two archives hold the same packed masks, bit for bit, tensors in the same order.

    Without `rounds`: the same rounds are complete in both, and every one of them is compared;
    with `rounds`: those rounds only (whatever else is complete).
    """
    if rounds is None:
        rounds = complete_rounds(reference)
        assert complete_rounds(mine) == rounds, \
            f"complete rounds: {mine} has {complete_rounds(mine)}, {reference} has {rounds}"
    for round_index in rounds:
        ours, theirs = archive_masks(mine, round_index), archive_masks(reference, round_index)
        assert list(ours) == list(theirs), \
            f"{mine} round {round_index}: tensors {list(ours)}, but {reference} has {list(theirs)}"
        for tensor in theirs:
            assert np.array_equal(ours[tensor], theirs[tensor]), \
                f"{mine} round {round_index}: mask {tensor} differs from {reference}'s"
