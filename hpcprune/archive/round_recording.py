"""How a round gets into the archive: whole in one step, or in several steps (block by block).

    hpcprune prune --config configs/quickstart.yaml           # write_round: one part, one update per round
    # a block-sequential pipeline: add_masks(round, block's masks) per block, then finish_round(round, ...)

A round's masks go into part files beside the archive (`mask_parts`), each written once; the archive
links them. `write_round` records a round in one step: its part, then one update that links the
masks, adds the tables and marks the round complete. `add_masks` records one step of a round that
is recorded in several: a part of its own, then one update that links it into the round, which
stays "writing" until `finish_round` adds its attrs and tables and marks it complete, once every
planned tensor has its mask. Each step is whole or absent after a kill, and costs what it writes;
`masks_recorded` says what a resumed pipeline already has. Masks may come as an iterator, written
one at a time, so that memory holds one mask whatever the model.

`RoundRecording` is the part of `hpcprune.archive.writer.Archive` that does this; it uses the
archive's `path`, `file`, `side` (folders), `_update()` (an open update), `_relative`, `_round_attrs`,
`completed_rounds` and `replace_previous_run`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py

from hpcprune.archive import layout
from hpcprune.archive.layout import HISTORY_DTYPE, LAYERS_DTYPE, table
from hpcprune.archive.mask_parts import (
    Masks,
    escape_name,
    link_masks,
    linked_parts,
    unescape_name,
    write_part,
)
from hpcprune.archive.reader import round_name
from hpcprune.archive.update import open_h5


class RoundRecording:
    """Recording rounds into the archive (see the top); mixed into `Archive`."""

    def write_round(self, index: int, *, attrs: Mapping[str, Any], masks: Masks,
                    layers: Sequence[Mapping[str, Any]], history: Sequence[Any], progress: bool = False) -> None:
        """Record one round whole: its masks into one new part file, then one update that links them,
        adds the tables and marks the round complete. `masks`: tensor name -> (packed uint8 bits or
        their encoded chunks, shape, kept), as a mapping or an iterator of pairs written one at a time.
        Masks streamed from the ranks come as such an iterator, each written before the next is asked
        for. `progress`: a bar over the masks written, one per row of `layers` (when stderr is a terminal).

        Replaces an incomplete round of the same index (left by a killed run); a complete one is a bug.
        """
        _check_round_attrs(index, attrs)
        started = time.perf_counter()
        self._refuse_complete(index)
        part = self.side.mask_part(index, 0)
        tensors = write_part(part, masks, round_index=index, progress=progress, total=len(layers))
        with _unlinked_on_failure(part), self._update() as file:
            rounds = file.require_group("rounds")
            if round_name(index) in rounds:
                del rounds[round_name(index)]
            group = rounds.create_group(round_name(index))
            group.attrs["status"] = "writing"
            link_masks(group.create_group("masks", track_order=True), self._relative(part), tensors)
            self._finish(file, group, attrs, layers, history, started)
        self.replace_previous_run()

    def add_masks(self, index: int, masks: Masks, *, progress: bool = False) -> None:
        """One step of a round recorded in several (a block's tensors, say): the masks go into a part of
        their own, then one update links them into round `index` (begun, "writing", by the first step).
        Each step is whole or absent after a kill; `finish_round` completes the round."""
        self._record_step(index, masks, progress=progress)

    def _record_step(self, index: int, masks: Masks, *, step: int | None = None, progress: bool = False,
                     also: Callable[[h5py.Group], None] | None = None) -> None:
        """`add_masks` with the part's number `step` (default: one more than the round's parts so far)
        and `also(round group)` for whatever else the step adds to the archive in the same update."""
        self._refuse_complete(index)
        if step is None:
            with open_h5(self.file, "r") as file:
                group = file.get(f"rounds/{round_name(index)}")
                step = len(linked_parts(group["masks"])) if group is not None and "masks" in group else 0
        part = self.side.mask_part(index, step)
        tensors = write_part(part, masks, round_index=index, progress=progress)
        with _unlinked_on_failure(part), self._update() as file:
            group = file.require_group("rounds").require_group(round_name(index))
            group.attrs["status"] = "writing"
            if "masks" not in group:
                group.create_group("masks", track_order=True)
            twice = [tensor for tensor in tensors if escape_name(tensor) in group["masks"]]
            if twice:
                raise ValueError(f"round {index}: mask {twice[0]} is recorded already")
            link_masks(group["masks"], self._relative(part), tensors)
            if also is not None:
                also(group)
            file.flush()

    def masks_recorded(self, index: int) -> list[str]:
        """The tensors whose masks round `index` links so far, in recording order (a resume goes on from there)."""
        with open_h5(self.file, "r") as file:
            group = file.get(f"rounds/{round_name(index)}/masks")
            return [] if group is None else [unescape_name(key) for key in group]

    def finish_round(self, index: int, *, attrs: Mapping[str, Any], layers: Sequence[Mapping[str, Any]],
                     history: Sequence[Any]) -> None:
        """Complete a round recorded with `add_masks`: its attrs and tables, once every planned mask is linked."""
        _check_round_attrs(index, attrs)
        self._refuse_complete(index)
        started = time.perf_counter()
        with self._update() as file:
            group = file.get(f"rounds/{round_name(index)}")
            refuse_missing_masks(file, group, index)
            self._finish(file, group, attrs, layers, history, started)
        self.replace_previous_run()

    def _finish(self, file: h5py.File, group: h5py.Group, attrs, layers, history, started: float) -> None:
        group.attrs.update(self._round_attrs(attrs))
        group.create_dataset("metrics", data=table(layers, LAYERS_DTYPE))
        group.create_dataset("history", data=table(history, HISTORY_DTYPE))
        group.attrs["seconds_write"] = time.perf_counter() - started
        layout.commit(file, group)

    def _refuse_complete(self, index: int) -> None:
        """A complete round is never written again (its part files are never replaced). Looks at that
        round alone: a check that read every round would make each update cost the archive's rounds."""
        with open_h5(self.file, "r") as file:
            group = file.get(f"rounds/{round_name(index)}")
            if group is not None and group.attrs.get("status") == "complete":
                raise ValueError(f"round {index} is already complete in {self.path}")


def refuse_missing_masks(file: h5py.File, group: h5py.Group | None, index: int) -> None:
    """A round is completed only once every planned tensor has its mask linked."""
    linked = set() if group is None or "masks" not in group else set(group["masks"])
    missing = [tensor for tensor in layout.planned_tensors(file) if escape_name(tensor) not in linked]
    if missing:
        raise ValueError(f"round {index}: no mask recorded for {missing[0]} ({len(missing)} missing)")


@contextlib.contextmanager
def _unlinked_on_failure(part: Path) -> Iterator[None]:
    """A part whose linking update failed is linked by nothing: it goes (a kill leaves it to `leftovers`)."""
    try:
        yield
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def _check_round_attrs(index: int, attrs: Mapping[str, Any]) -> None:
    missing = [key for key in layout.REQUIRED_ROUND_ATTRS if key not in attrs]
    if missing:
        raise ValueError(f"round {index}: attrs lack {', '.join(missing)}")
