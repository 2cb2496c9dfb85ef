"""Lottery-ticket rewinding: pruned networks retrain from early weights (Frankle & Carbin 2019;
Frankle et al. 2020 rewind to an early epoch rather than to initialisation).

    hpcprune prune --config configs/fmnist_lenet300_rewind.yaml      # schedule.rewind_epoch: 0

During dense training the weights after `schedule.rewind_epoch` epochs (0: the initialisation) are
saved as the run's `rewind.safetensors` state (in its states folder, `hpcprune.archive.side_files`);
after each round's pruning the surviving weights are reset to them (pruned ones stay 0) before
fine-tuning.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from hpcprune.dist.world import World
from hpcprune.models.builders import load_checkpoint, save_checkpoint
from hpcprune.prune.masks import apply_masks


class RewindRecorder:
    """Saves the model's weights (rank 0) once `epoch` dense epochs are done; `on_epoch_end` of training."""

    def __init__(self, model: nn.Module, state: Path, world: World, epoch: int | None):
        self._model, self._path, self._world, self._epoch = model, state, world, epoch
        self.at_epoch(0)

    def at_epoch(self, done: int) -> None:
        if done == self._epoch and self._world.is_root:
            save_checkpoint(self._model, self._path)

    def __call__(self, record) -> None:
        self.at_epoch(record.epoch)


def rewind(model: nn.Module, state: Path, masks: Mapping[str, torch.Tensor]) -> None:
    """Reset `model` to the early weights recorded in `state`, keeping the pruned positions at 0."""
    load_checkpoint(model, state)
    apply_masks(model, masks)
