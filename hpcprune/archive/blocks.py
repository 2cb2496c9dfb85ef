"""The block-sequential round in the archive: recorded block by block, complete after the last block and the eval.

    hpcprune prune --config configs/llm_wanda.yaml     # /rounds/0001, one block at a time

Layout, added to format 2 (hpcprune.archive.layout) for `schedule.kind: sequential`:

    /rounds/0001/                 the usual round attrs (criterion, rule, target_sparsity, achieved_sparsity, kept,
                                  total, threshold nan, seconds_*), plus eval_metric ("perplexity" or "cosine"),
                                  eval_dense, eval_pruned (nan without eval.text), propagate, blocks
    /rounds/0001/masks/<name>     as every round: links to the packed bits, one per pruned Linear weight (state-dict
                                  name), each block's masks in a part of their own
                                  (`<masks folder>/round-0001.part-<block NNNN>.h5`, hpcprune.archive.mask_parts)
    /rounds/0001/blocks           table (block i8, seconds f8, weights_file str): one row per finished block, in
                                  order; weights_file is the archive-relative safetensors shard holding the block's
                                  updated float32 weights (`<states folder>/blocks/block-<NNNN>.safetensors`),
                                  "" for methods that only choose masks
    /rounds/0001/metrics          the usual per-layer table (name, numel, kept, sparsity), appended per block
    /rounds/0001/reconstruction   table (name, block i8, error f8): ‖WX − ŴX‖² / ‖WX‖² per layer

A block is recorded as one step of the round (`RoundRecording._record_step`): its shard is written
first (by the pipeline), then its part file, then one archive update (a copy that replaces the
archive, hpcprune.archive.update) links its masks and appends its metrics and reconstruction rows
and its row of `blocks`. A row in `blocks` is therefore the promise that the block's masks (and
shard) are whole, and resume starts at the first block without one. The round's status stays
"writing" until `finish`; the structure check (hpcprune.archive.structure) holds a writing round to
that promise, and a complete one to the plan. A `--force` run replaces the archive it overwrites
once its first block is recorded.

`BlockRecords` is the `Archive` of a block-sequential run: `BlockRecords.create` / `open_resume`
give one that holds the archive's lock, and `Archive.at(path)` finds it again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hpcprune.archive import layout
from hpcprune.archive.codec import EncodedMask
from hpcprune.archive.layout import (
    HISTORY_DTYPE,
    LAYERS_DTYPE,
    REQUIRED_ROUND_ATTRS,
    STRING,
    table,
)
from hpcprune.archive.reader import _row, open_archive, open_checked, round_name
from hpcprune.archive.round_recording import refuse_missing_masks
from hpcprune.archive.update import open_h5
from hpcprune.archive.writer import Archive

BLOCKS_DTYPE = np.dtype([("block", "i8"), ("seconds", "f8"), ("weights_file", STRING)])
RECONSTRUCTION_DTYPE = np.dtype([("name", STRING), ("block", "i8"), ("error", "f8")])
TABLES = {"blocks": BLOCKS_DTYPE, "metrics": LAYERS_DTYPE, "reconstruction": RECONSTRUCTION_DTYPE}
BlockMasks = Mapping[str, tuple["np.ndarray | EncodedMask", Sequence[int], int]]


class BlockRecords(Archive):
    """Rank 0's writer of a block-sequential round (see the top)."""

    def begin(self, index: int, attrs: Mapping[str, Any]) -> None:
        """Create the round (status "writing") unless a killed run left it: then its blocks stay."""
        missing = [key for key in REQUIRED_ROUND_ATTRS if key not in attrs]
        if missing:
            raise ValueError(f"round {index}: attrs lack {', '.join(missing)}")
        with open_h5(self.file, "r") as file:
            if f"rounds/{round_name(index)}" in file:
                return
        with self._update() as file:
            group = file.require_group("rounds").create_group(round_name(index))
            group.attrs.update(self._round_attrs(attrs))
            group.attrs["status"] = "writing"
            group.create_group("masks", track_order=True)
            for name, dtype in TABLES.items():
                group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(256,))
            group.create_dataset("history", data=np.zeros(0, dtype=HISTORY_DTYPE))
            file.flush()

    def record_block(self, index: int, block: int, *, seconds: float, weights_file: str, masks: BlockMasks,
                     errors: Mapping[str, float]) -> None:
        """One finished block: masks (name -> (packed bits or chunks, shape, kept)) into the block's part,
        then one update that links them and appends the block's rows, its row of `blocks` among them."""
        with open_h5(self.file, "r") as file:
            if block in file[f"rounds/{round_name(index)}/blocks"]["block"]:
                raise ValueError(f"round {index}: block {block} is already recorded in {self.path}")
        layers = [dict(name=name, numel=math.prod(shape), kept=kept, sparsity=1.0 - kept / max(math.prod(shape), 1))
                  for name, (_, shape, kept) in masks.items()]
        rows = {"metrics": table(layers, LAYERS_DTYPE),
                "reconstruction": table([dict(name=name, block=block, error=float(error))
                                         for name, error in errors.items()], RECONSTRUCTION_DTYPE),
                "blocks": table([dict(block=block, seconds=seconds,
                                      weights_file=self._relative(weights_file) if weights_file else "")],
                                BLOCKS_DTYPE)}  # last: the block's promise

        def append_rows(group: h5py.Group) -> None:
            for name, new in rows.items():
                _append(group[name], new)

        self._record_step(index, masks, step=block, also=append_rows)
        self.replace_previous_run()  # a --force run's first block: the old run goes now

    def finish(self, index: int, attrs: Mapping[str, Any]) -> None:
        """The round's final attrs (sparsity, eval figures), then "complete", once every planned mask is there."""
        with self._update() as file:
            group = file[f"rounds/{round_name(index)}"]
            refuse_missing_masks(file, group, index)
            group.attrs.update({key: (math.nan if value is None else value) for key, value in attrs.items()})
            layout.commit(file, group)
        self.replace_previous_run()


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
    """Packed masks of `names` in round `index`, each checked against the plan and its checksums."""
    return open_archive(path).read_packed_masks(index, names)


def round_tables(path: str | Path, index: int) -> dict[str, list[dict[str, Any]]]:
    """The round's blocks, metrics and reconstruction tables as rows of plain values."""
    with open_checked(Path(path)) as file:
        group = file[f"rounds/{round_name(index)}"]
        return {name: [_row(row) for row in group[name][()]] for name in TABLES if name in group}
