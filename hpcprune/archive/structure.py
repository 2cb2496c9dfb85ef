"""An archive checked against its own table of contents before anything trusts it.

    hpcprune inspect layers run.h5      # hpcprune: error: run.h5 is damaged: round 2 has no mask of fc1.weight

/model/params is the plan: its prunable rows are the tensors every round must hold a mask of, with
that shape. `check_structure` runs on every open (`ArchiveReader`), from the archive's own metadata,
without reading a mask's bits: every round up to the last one marked complete is there and
complete, /checkpoint names no round beyond it, and every complete round links a mask for each
planned tensor in a part file that exists, with the planned shape in its shape attribute, so even a
reader that reads no mask refuses an edited one. That opens each round's part file once and reads
one attribute per mask with HDF5's low-level calls: about 2.6 ms a round of 10 masks here. A
block-sequential round still being written
(hpcprune.archive.blocks) is held to what its tables promise: a mask, of the planned shape, for each
layer of its recorded blocks, and none beyond them. `check_mask` checks one mask's dataset against
the plan (its name, its shape attribute, its length in packed bytes) before a reader reads it. Each
finding is one line that names the round and the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hpcprune.archive.mask_parts import escape_name, unescape_name
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
            _check_round_links(path, index, group, list(planned), planned)
        elif "blocks" in group:  # a block-sequential round so far: each recorded block's masks
            recorded = [name.decode() if isinstance(name, bytes) else name for name in group["metrics"]["name"]]
            _check_round_links(path, index, group, recorded, planned)


def _check_round_links(path: Path, index: int, group: h5py.Group, expected: list[str],
                       planned: Mapping[str, tuple[int, ...]]) -> None:
    """The round links a mask of each `expected` tensor (every planned one when complete, those of the
    recorded blocks while a block-sequential round is written), in a part file that exists, and no
    other mask, and each mask's shape attribute is the planned shape (each part opened once)."""
    if "masks" not in group:
        raise _damaged(path, f"round {index} has no masks group")
    masks = group["masks"]
    unplanned = [tensor for tensor in expected if tensor not in planned]
    extra = sorted(set(masks) - {escape_name(tensor) for tensor in expected})
    unplanned += [unescape_name(name) for name in extra if unescape_name(name) not in planned]
    if unplanned:
        raise _damaged(path, f"round {index} has a mask of {unplanned[0]}, which /model/params does not plan")
    if extra:
        raise _damaged(path, f"round {index} has a mask of {unescape_name(extra[0])}, which no recorded block lists")
    in_parts: dict[str, list[tuple[str, str]]] = {}  # part file -> (tensor, its dataset there)
    for tensor in expected:
        link = masks.get(escape_name(tensor), getlink=True)
        if link is None:
            raise _damaged(path, f"round {index} has no mask of {tensor}")
        if isinstance(link, h5py.ExternalLink):
            in_parts.setdefault(link.filename, []).append((tensor, link.path))
        else:  # format 1: the mask inside the archive
            _compare_shapes(path, index, tensor, _shape_of(masks[escape_name(tensor)]), planned[tensor])
    for name, tensors in in_parts.items():
        part = path.parent / name
        if not part.is_file():
            raise _damaged(path, f"round {index}: the mask of {tensors[0][0]} is in {part}, which is missing")
        with h5py.File(part, "r", locking="best-effort") as file:
            for tensor, inside in tensors:
                stored = _shape_attribute(file, inside)
                if stored is None:
                    raise _damaged(path, f"round {index}: the mask of {tensor} is not in {part}")
                _compare_shapes(path, index, tensor, stored, planned[tensor])


def check_mask(path: Path, index: int, dataset: h5py.Dataset, tensor: str, shape: tuple[int, ...]) -> None:
    """One mask's dataset against the plan: the tensor it names, its shape attribute, its packed length."""
    named = dataset.attrs.get("name")
    if named != tensor:
        raise _damaged(path, f"round {index}: the mask linked as {tensor} is named {named!r}")
    _compare_shapes(path, index, tensor, _shape_of(dataset), shape)
    if dataset.shape != ((math.prod(shape) + 7) // 8,):
        raise _damaged(path, f"round {index}: mask {tensor} holds {dataset.shape[0] if dataset.shape else 0} packed "
                             f"bytes, where shape {_text(shape)} needs {(math.prod(shape) + 7) // 8}")


def _shape_of(dataset: h5py.Dataset) -> tuple[int, ...]:
    return tuple(int(size) for size in dataset.attrs.get("shape", ()))


def _shape_attribute(file: h5py.File, inside: str) -> tuple[int, ...] | None:
    """The shape attribute of the mask dataset `inside` (None: no such dataset), read with HDF5's
    low-level calls: an open checks every mask of every round, and a high-level Dataset and its
    attribute manager cost several times as much per mask."""
    try:
        dataset = h5py.h5o.open(file.id, inside.encode())
    except KeyError:
        return None
    if not h5py.h5a.exists(dataset, b"shape"):
        return ()
    attribute = h5py.h5a.open(dataset, b"shape")
    values = np.empty(attribute.shape, dtype=attribute.dtype)
    attribute.read(values)
    return tuple(int(size) for size in values.ravel())


def _compare_shapes(path: Path, index: int, tensor: str, stored: tuple[int, ...], shape: tuple[int, ...]) -> None:
    if stored != shape:
        raise _damaged(path, f"round {index}: mask {tensor} has shape {_text(stored)}, "
                             f"where /model/params plans {_text(shape)}")


def _text(shape: tuple[int, ...]) -> str:
    return "x".join(str(size) for size in shape) or "scalar"


def _damaged(path: Path, finding: str) -> UsageError:
    return UsageError(f"{path} is damaged: {finding}")
