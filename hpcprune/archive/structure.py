"""An archive checked against its own table of contents before anything trusts it.

    hpcprune inspect layers run.h5      # hpcprune: error: run.h5 is damaged: round 2 has no mask of fc1.weight

/model/params is the plan: its prunable rows are the tensors every round must hold a mask of, with
that shape. `check_structure` runs on every open (`ArchiveReader`), from the archive's own metadata
and the names of its part files, without reading a mask: every round up to the last one marked
complete is there and complete, /checkpoint names no round beyond it, and every complete round
links a mask for each planned tensor, to a part file that exists. `check_mask` checks one mask's
dataset against the plan (its name, its shape attribute, its length in packed bytes) before a
reader reads it. Each finding is one line that names the round and the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py

from hpcprune.archive.mask_parts import escape_name
from hpcprune.errors import UsageError


def planned_shapes(params: list[dict[str, Any]]) -> dict[str, tuple[int, ...]]:
    """Prunable tensor -> shape, in the plan's order, from /model/params rows (shape "300x784", "" for a scalar)."""
    return {row["name"]: tuple(int(size) for size in row["shape"].split("x") if size) for row in params if row["prunable"]}


def check_structure(path: Path, rounds: list[tuple[int, h5py.Group]], planned: Mapping[str, tuple[int, ...]],
                    checkpoint_round: int | None) -> None:
    """Refuse (one line) an archive whose rounds or masks do not match what it says it holds."""
    complete = [index for index, group in rounds if group.attrs.get("status") == "complete"]
    last = max(complete, default=0)
    present = {index for index, _ in rounds}
    for index in range(1, last + 1):
        if index not in present:
            raise _damaged(path, f"round {index} is missing (round {last} is recorded as complete)")
        if index not in complete:
            raise _damaged(path, f"round {index} is not complete, but round {last} is")
    if checkpoint_round is not None and checkpoint_round > last:
        raise _damaged(path, f"/checkpoint continues after round {checkpoint_round}, which is not complete")
    for index, group in rounds:
        if index in complete:
            _check_round_links(path, index, group, planned)


def _check_round_links(path: Path, index: int, group: h5py.Group, planned: Mapping[str, tuple[int, ...]]) -> None:
    if "masks" not in group:
        raise _damaged(path, f"round {index} has no masks group")
    masks = group["masks"]
    present: dict[str, bool] = {}  # part file -> exists: one look per part, not per mask
    for tensor in planned:
        link = masks.get(escape_name(tensor), getlink=True)
        if link is None:
            raise _damaged(path, f"round {index} has no mask of {tensor}")
        if isinstance(link, h5py.ExternalLink):
            if link.filename not in present:
                present[link.filename] = (path.parent / link.filename).is_file()
            if not present[link.filename]:
                raise _damaged(path, f"round {index}: the mask of {tensor} is in {path.parent / link.filename}, "
                                     f"which is missing")
    extra = sorted(set(masks) - {escape_name(tensor) for tensor in planned})
    if extra:
        raise _damaged(path, f"round {index} has a mask of {extra[0]}, which /model/params does not plan")


def check_mask(path: Path, index: int, dataset: h5py.Dataset, tensor: str, shape: tuple[int, ...]) -> None:
    """One mask's dataset against the plan: the tensor it names, its shape attribute, its packed length."""
    named = dataset.attrs.get("name")
    if named != tensor:
        raise _damaged(path, f"round {index}: the mask linked as {tensor} is named {named!r}")
    stored = tuple(int(size) for size in dataset.attrs.get("shape", ()))
    if stored != shape:
        raise _damaged(path, f"round {index}: mask {tensor} has shape {_text(stored)}, "
                             f"where /model/params plans {_text(shape)}")
    if dataset.shape != ((math.prod(shape) + 7) // 8,):
        raise _damaged(path, f"round {index}: mask {tensor} holds {dataset.shape[0] if dataset.shape else 0} packed "
                             f"bytes, where shape {_text(shape)} needs {(math.prod(shape) + 7) // 8}")


def _text(shape: tuple[int, ...]) -> str:
    return "x".join(str(size) for size in shape) or "scalar"


def _damaged(path: Path, finding: str) -> UsageError:
    return UsageError(f"{path} is damaged: {finding}")
