"""The windows a rank carries through a block-sequential run, and their first block's inputs.

    hpcprune prune --config configs/llm_wanda.yaml     # calibration.text, eval.text

Every rank tokenizes the texts the same way (hpcprune.models.text_windows) and takes its share:
evaluation windows w with w mod world size == rank, twice (once through the dense blocks, once
through the pruned ones); calibration windows, for the statistics, in groups of
`sequential.window_group` consecutive windows, group g on rank g mod world size (a group is one
term of the exact sums, so it must sit whole on one rank). The model's own forward then runs
each window up to the first block (the embeddings, loaded only for this) and what the block is
called with is kept: hidden states in a store (memory, or spilled into the run's states folder when the
estimate exceeds `sequential.activation_budget_mb`), the call's other arguments in memory, equal
tensors of different windows shared.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from hpcprune.config import CalibrationConfig, RunConfig
from hpcprune.dist.world import World
from hpcprune.models.block_calls import capture_first_call, moved, share_equal
from hpcprune.models.lazy import LazyModel
from hpcprune.models.text_windows import (
    calibration_windows,
    eval_windows,
    read_text,
    sentence_windows,
)
from hpcprune.prune.sequential.activations import (
    Stream,
    WindowStore,
    activation_folder,
    spills,
)
from hpcprune.prune.sequential.input_statistics import windows_per_term

FLOAT32_BYTES = 4


@dataclass
class TextWindows:
    """All windows of one text (every rank holds the token ids; each runs only its share)."""

    ids: torch.Tensor  # [windows, length] int64
    mask: torch.Tensor | None = None  # attention mask of sentence windows (padding), None: every token
    group: int = 1  # consecutive windows that go to one rank together (sequential.window_group)

    def __len__(self) -> int:
        return len(self.ids)

    def mine(self, world: World) -> list[int]:
        """Windows of the groups g with g mod world size == rank, in order."""
        return [window for window in range(len(self)) if (window // self.group) % world.size == world.rank]

    def inputs(self, window: int) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": self.ids[window][None]}
        if self.mask is not None:
            inputs["attention_mask"] = self.mask[window][None]
        return inputs

    def keep(self, window: int) -> torch.Tensor | None:
        return None if self.mask is None else self.mask[window]


def calibration_text(config: RunConfig, lazy: LazyModel) -> TextWindows | None:
    cfg, folder = config.calibration, lazy.files.folder
    if cfg.text is None:
        return None
    windows = TextWindows(calibration_windows(folder, cfg)) if lazy.causal else TextWindows(*sentence_windows(folder, cfg))
    windows.group = windows_per_term(len(windows), config.sequential.window_group)
    return windows


def evaluation_text(config: RunConfig, lazy: LazyModel) -> TextWindows | None:
    """Causal LMs: consecutive windows of eval.text; encoders: every non-empty line of it, one a window."""
    text, folder = config.eval.text, lazy.files.folder
    if text is None:
        return None
    length = config.eval.sequence_length or config.calibration.sequence_length
    if lazy.causal:
        return TextWindows(eval_windows(folder, text, length))
    lines = sum(1 for line in read_text(text, "eval.text").splitlines() if line.strip())
    every_line = CalibrationConfig(text=text, sequence_length=length, samples=max(lines, 1))  # order is immaterial:
    return TextWindows(*sentence_windows(folder, every_line))  # the mean cosine is an exact sum


@dataclass
class Streams:
    calibration: Stream | None
    eval_dense: Stream | None
    eval_pruned: Stream | None
    spill_folder: Path | None = None  # the rank's folder of spilled hidden states, None: in memory

    def all(self) -> list[Stream]:
        return [stream for stream in (self.calibration, self.eval_dense, self.eval_pruned) if stream is not None]

    def remove(self) -> None:
        """Drop every stream's hidden states, and the rank's spill folder with whatever is left in it."""
        for stream in self.all():
            stream.store.remove()
        if self.spill_folder is not None:
            shutil.rmtree(self.spill_folder, ignore_errors=True)


def first_block_inputs(config: RunConfig, lazy: LazyModel, world: World, calibration: TextWindows | None,
                       evaluation: TextWindows | None, states: Path) -> Streams:
    """The rank's streams, each window run by the model up to its first block; spilled hidden states go
    into `states`, the run's states folder."""
    folder = _spill_folder(config, lazy, world, calibration, evaluation, states)
    streams = Streams(
        _stream("calibration", calibration, world, folder),
        _stream("eval_dense", evaluation, world, folder),
        _stream("eval_pruned", evaluation, world, folder),
        folder,
    )
    previous = None
    with lazy.outer_modules_on_call():
        for stream, text in ((streams.calibration, calibration), (streams.eval_dense, evaluation)):
            for position, window in enumerate([] if stream is None else stream.windows):
                hidden, call = capture_first_call(lazy.model, lazy.blocks, moved(stream.inputs[position], lazy.device))
                previous = share_equal(call, previous)
                stream.calls.append(previous)
                stream.store.put(position, hidden)
                if stream is streams.eval_dense:  # the pruned evaluation starts from the same inputs
                    streams.eval_pruned.calls.append(previous)
                    streams.eval_pruned.store.put(position, hidden)
    return streams


def _stream(name: str, text: TextWindows | None, world: World, folder: Path | None) -> Stream | None:
    if text is None:
        return None
    windows = text.mine(world)
    store = WindowStore(None if folder is None else folder / name)
    return Stream(name, windows, store, inputs=[text.inputs(window) for window in windows],
                  keeps=[text.keep(window) for window in windows])


def _spill_folder(config: RunConfig, lazy: LazyModel, world: World, calibration: TextWindows | None,
                  evaluation: TextWindows | None, states: Path) -> Path | None:
    """The rank's spill folder when its windows' hidden states would exceed the budget, else None."""
    hidden = getattr(lazy.model.config, "hidden_size", None)
    if hidden is None:
        return None
    held, length = 0, 0
    if calibration is not None:  # dense propagation keeps the next block's inputs beside the current ones
        held += len(calibration.mine(world)) * (2 if config.sequential.propagate == "dense" else 1)
        length = max(length, calibration.ids.shape[1])
    if evaluation is not None:
        held += 2 * len(evaluation.mine(world))
        length = max(length, evaluation.ids.shape[1])
    if not spills(length * hidden * FLOAT32_BYTES, held, config.sequential.activation_budget_mb):
        return None
    return activation_folder(states, world.rank)
