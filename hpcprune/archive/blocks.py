"""The block-sequential round in the archive: recorded block by block, complete after the last block and the eval.

    hpcprune prune --config configs/llm_wanda.yaml     # /rounds/0001, one block at a time

Layout, added to format 1 (hpcprune.archive.writer) for `schedule.kind: sequential`:

    /rounds/0001/                 the usual round attrs (criterion, rule, target_sparsity, achieved_sparsity, kept,
                                  total, threshold nan, seconds_*), plus eval_metric ("perplexity" or "cosine"),
                                  eval_dense, eval_pruned (nan without eval.text), propagate, blocks
    /rounds/0001/masks/<name>     as every round: packed bits, one per pruned Linear weight (state-dict name)
    /rounds/0001/blocks           table (block i8, seconds f8, weights_file str): one row per finished block, in
                                  order; weights_file is the archive-relative safetensors shard holding the block's
                                  updated float32 weights (`<archive stem>.states/blocks/block-<NNNN>.safetensors`),
                                  "" for methods that only choose masks
    /rounds/0001/metrics          the usual per-layer table (name, numel, kept, sparsity), appended per block
    /rounds/0001/reconstruction   table (name, block i8, error f8): ‖WX − ŴX‖² / ‖WX‖² per layer

A block is recorded in one archive update (a copy that replaces the archive, hpcprune.archive.update):
its masks, its metrics and reconstruction rows, and its row of `blocks` last. A row in `blocks` is
therefore the promise that the block's masks (and shard, written before) are whole, and resume
starts at the first block without one. The round's status stays "writing" until `finish`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hpcprune.archive.codec import EncodedMask
from hpcprune.archive.reader import _row, open_archive, open_checked, round_name
from hpcprune.archive.update import open_h5
from hpcprune.archive.writer import (
    HISTORY_DTYPE,
    LAYERS_DTYPE,
    REQUIRED_ROUND_ATTRS,
    STRING,
    Archive,
    _commit,
    _table,
    _write_mask,
    escape_name,
)

BLOCKS_DTYPE = np.dtype([("block", "i8"), ("seconds", "f8"), ("weights_file", STRING)])
RECONSTRUCTION_DTYPE = np.dtype([("name", STRING), ("block", "i8"), ("error", "f8")])
TABLES = {"blocks": BLOCKS_DTYPE, "metrics": LAYERS_DTYPE, "reconstruction": RECONSTRUCTION_DTYPE}


class BlockRecords(Archive):
    """Rank 0's writer of a block-sequential round."""

    def begin(self, index: int, attrs: Mapping[str, Any]) -> None:
        """Create the round (status "writing") unless a killed run left it: then its blocks stay."""
        missing = [key for key in REQUIRED_ROUND_ATTRS if key not in attrs]
        if missing:
            raise ValueError(f"round {index}: attrs lack {', '.join(missing)}")
        with open_h5(self.path, "a") as file:
            rounds = file.require_group("rounds")
            if round_name(index) in rounds:
                return
            group = rounds.create_group(round_name(index))
            group.attrs.update(self._round_attrs(attrs))
            group.attrs["status"] = "writing"
            group.create_group("masks", track_order=True)
            for name, dtype in TABLES.items():
                group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(256,))
            group.create_dataset("history", data=np.zeros(0, dtype=HISTORY_DTYPE))
            file.flush()

    def record_block(self, index: int, block: int, *, seconds: float, weights_file: str,
                     masks: Mapping[str, tuple[np.ndarray | EncodedMask, Sequence[int], int]],
                     errors: Mapping[str, float]) -> None:
        """One finished block: masks (name -> (packed bits or chunks, shape, kept)), tables, then its row."""
        with open_h5(self.path, "a") as file:
            group = file[f"rounds/{round_name(index)}"]
            if block in group["blocks"]["block"]:
                raise ValueError(f"round {index}: block {block} is already recorded in {self.path}")
            for name, (packed, shape, kept) in masks.items():
                if escape_name(name) in group["masks"]:  # a block recorded in part cannot be: one update per block
                    raise ValueError(f"round {index}: mask {name} exists before its block {block} is recorded")
                _write_mask(group["masks"], name, packed, tuple(shape), kept)
            layers = [dict(name=name, numel=int(np.prod(shape)), kept=kept, sparsity=1.0 - kept / max(int(np.prod(shape)), 1))
                      for name, (_, shape, kept) in masks.items()]
            _append(group["metrics"], _table(layers, LAYERS_DTYPE))
            _append(group["reconstruction"], _table(
                [dict(name=name, block=block, error=float(error)) for name, error in errors.items()], RECONSTRUCTION_DTYPE))
            relative = self._relative(weights_file) if weights_file else ""
            _append(group["blocks"], _table([dict(block=block, seconds=seconds, weights_file=relative)], BLOCKS_DTYPE))
            file.flush()

    def finish(self, index: int, attrs: Mapping[str, Any]) -> None:
        """The round's final attrs (sparsity, eval figures), then "complete"."""
        with open_h5(self.path, "a") as file:
            group = file[f"rounds/{round_name(index)}"]
            group.attrs.update({key: (math.nan if value is None else value) for key, value in attrs.items()})
            _commit(file, group)


def _append(dataset: h5py.Dataset, rows: np.ndarray) -> None:
    start = dataset.shape[0]
    dataset.resize((start + len(rows),))
    if len(rows):
        dataset[start:] = rows


def recorded_blocks(path: str | Path, index: int) -> list[dict[str, Any]]:
    """The round's `blocks` rows (weights_file absolute, None when empty); [] when the round is not there."""
    reader = open_archive(path)
    if index not in [attrs["index"] for attrs in reader.rounds(include_incomplete=True)]:
        return []
    return reader.blocks(index)


def read_block_masks(path: str | Path, index: int, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Packed masks of `names` in round `index` (checksums verified by HDF5's filter)."""
    with open_checked(Path(path)) as file:
        masks = file[f"rounds/{round_name(index)}/masks"]
        return {name: masks[escape_name(name)][()] for name in names}


def round_tables(path: str | Path, index: int) -> dict[str, list[dict[str, Any]]]:
    """The round's blocks, metrics and reconstruction tables as rows of plain values."""
    with open_checked(Path(path)) as file:
        group = file[f"rounds/{round_name(index)}"]
        return {name: [_row(row) for row in group[name][()]] for name in TABLES if name in group}
