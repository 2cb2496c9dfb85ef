"""The gradual schedule's mask updates during fine-tuning (Zhu & Gupta 2017).

    hpcprune prune --config configs/fmnist_lenet300_gradual.yaml

The round prunes to s_i before fine-tuning; then, after every Δt-th optimizer step from t0 on,
`GradualPruner` selects new masks at s_t (hpcprune.prune.schedule.gradual_sparsity) with the round's
criterion and rule on the current weights, weights pruned earlier scoring -inf so that pruning only
grows. Every rank takes the same steps (DDP pads the data to equal batch counts), so all of them
reach each update together and run its collectives in step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from hpcprune.config import RunConfig
from hpcprune.errors import UsageError
from hpcprune.models.data import make_loader
from hpcprune.prune.masks import MaskEnforcer, apply_masks, unwrap
from hpcprune.prune.schedule import gradual_end, gradual_sparsity
from hpcprune.prune.selection import Selection

# sparsity -> (selection, every tensor's bool mask): one score -> select -> share pass of the pipeline
Reselect = Callable[[float], tuple[Selection, Mapping[str, torch.Tensor]]]


def first_target(config: RunConfig, target: float) -> float:
    """The sparsity a round prunes to before fine-tuning: s_i for gradual, else the round's target."""
    return config.schedule.initial_sparsity if config.schedule.kind == "gradual" else target


class GradualPruner:
    """`after_step` hook of `hpcprune.train.finetune.train` that moves the masks on schedule."""

    def __init__(self, config: RunConfig, model: torch.nn.Module, target: float, reselect: Reselect):
        self._schedule, self._model, self._target, self._reselect = config.schedule, model, target, reselect
        self.step = 0
        self.selection: Selection | None = None  # of the latest update
        self.sparsities: list[float] = []  # s_t of every update made, in order

    @classmethod
    def for_round(cls, config: RunConfig, model, splits, world, target: float, reselect: Reselect,
                  *, seed: int) -> GradualPruner | None:
        """A pruner for a gradual round (None for other schedules), refused when fine-tuning ends too soon."""
        if config.schedule.kind != "gradual":
            return None
        total = 0
        if splits is not None and config.finetune.epochs:
            steps = len(make_loader(splits.train, config.data.batch_size, shuffle=True, seed=seed, world=world))
            total = steps * config.finetune.epochs
        if gradual_end(config.schedule) > total:
            raise UsageError(f"schedule: the last gradual update is at step {gradual_end(config.schedule)} "
                             f"(start_step + updates * interval) but fine-tuning has only {total} steps; "
                             "raise finetune.epochs or lower schedule.interval/updates")
        return cls(config, model, target, reselect)

    def __call__(self, enforcer: MaskEnforcer | None) -> None:
        self.step += 1
        sparsity = gradual_sparsity(self._schedule, self._target, self.step)
        if sparsity is None:
            return
        self.selection, masks = self._reselect(sparsity)
        self.sparsities.append(sparsity)
        model = unwrap(self._model)
        apply_masks(model, masks)
        if enforcer is not None:
            enforcer.retarget(model, masks)
            enforcer.after_step()  # newly pruned weights lose their momentum/Adam state too

    @property
    def achieved(self) -> float:
        return math.nan if self.selection is None else 1 - self.selection.kept / self.selection.total
