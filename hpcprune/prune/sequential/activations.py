"""A rank's windows as they travel from block to block: hidden states, block calls, token masks.

    hpcprune prune --config configs/llm_wanda.yaml --set sequential.activation_budget_mb=256

A `Stream` is one set of windows the rank holds (the calibration windows, the evaluation windows
through the dense model, the same through the pruned model). Its hidden states live in a
`WindowStore`: in memory, or, when the run's estimate exceeds `sequential.activation_budget_mb`, one
safetensors file per window in a per-rank folder beside the archive. Those files are scratch, read
back by this process only and made again on resume, so they are written plainly, without the
fsync and rename of hpcprune.archive.atomic that outputs for later readers get. The calls (attention
masks, position inputs) and token masks are small and stay in memory.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hpcprune.models.block_calls import BlockCall

MIB = 1 << 20


class WindowStore:
    """Hidden states by the window's position in the rank's share; `folder` None: in memory."""

    def __init__(self, folder: Path | None = None):
        self.folder = folder
        self._memory: dict[int, torch.Tensor] = {}
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)  # what a killed run left is made again
            folder.mkdir(parents=True)

    def put(self, position: int, hidden: torch.Tensor) -> None:
        hidden = hidden.detach().to("cpu")
        if self.folder is None:
            self._memory[position] = hidden
        else:
            save_file({"hidden": hidden.contiguous()}, self._file(position))

    def get(self, position: int) -> torch.Tensor:
        if self.folder is None:
            return self._memory[position]
        return load_file(self._file(position))["hidden"]

    def fork(self) -> WindowStore:
        """An empty store of the same kind, for the next block's inputs while these are still read."""
        return WindowStore(None if self.folder is None else self.folder.with_name(self.folder.name + "-next"))

    def take(self, other: WindowStore) -> None:
        """Hold `other`'s states from now on (`other` is left empty)."""
        if self.folder is None:
            self._memory, other._memory = other._memory, {}
            return
        shutil.rmtree(self.folder)
        other.folder.rename(self.folder)
        other.folder.mkdir()  # `other` stays a usable, empty store

    def remove(self) -> None:
        self._memory = {}
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _file(self, position: int) -> Path:
        return self.folder / f"{position:06d}.safetensors"


@dataclass
class Stream:
    """Windows the rank holds, by position: global index, model inputs, hidden states, block call, token mask."""

    name: str
    windows: list[int]  # global window indices, in the rank's order
    store: WindowStore
    inputs: list[dict[str, torch.Tensor]] = field(default_factory=list)  # what the model's forward takes (batch of 1)
    calls: list[BlockCall] = field(default_factory=list)
    keeps: list[torch.Tensor | None] = field(default_factory=list)  # token masks (padding), None: every position

    def __len__(self) -> int:
        return len(self.windows)


def spills(window_bytes: int, windows: int, budget_mb: float) -> bool:
    """Whether `windows` hidden states of `window_bytes` each exceed the rank's activation budget."""
    return window_bytes * windows > budget_mb * MIB


def activation_folder(states: Path, rank: int) -> Path:
    """The rank's spill folder inside the run's states folder."""
    return states / "activations" / f"rank-{rank}"
