"""The gradual schedule's mask updates during fine-tuning (Zhu & Gupta 2017).

    hpcprune prune --config configs/fmnist_lenet300_gradual.yaml
    mpirun -n 4 hpcprune prune --config configs/fmnist_lenet300_gradual.yaml   # the same schedule

The round prunes to s_i before fine-tuning; then at every Δt-th step from t0 on, `GradualPruner`
selects new masks at s_t (hpcprune.prune.schedule.gradual_sparsity) with the round's criterion and
rule on the current weights, weights pruned earlier scoring -inf so that pruning only grows.

A step of the schedule is one batch of `data.batch_size` samples counted over all ranks, so a config
means the same at every world size: one optimizer step of DDP on n ranks consumes n such batches
and advances the schedule by n; one exact step (`finetune.step_batches: N`,
hpcprune.train.exact_steps) consumes N at any world size, and then the weights, and so every
update's masks, are the same bit for bit on any number of ranks. An update falls on the optimizer
step that reaches its schedule step (the same step when the batches per step divide t0 and Δt; when
one step crosses several updates, the last of them is made). Every rank takes the same optimizer
steps (DDP pads the data to equal batch counts; exact steps are the same list everywhere), so all of
them reach each update together and run its collectives in step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping

import torch

from hpcprune.config import RunConfig
from hpcprune.errors import UsageError
from hpcprune.models.data import make_loader
from hpcprune.prune.masks import MaskEnforcer, apply_masks, unwrap
from hpcprune.prune.schedule import gradual_end, gradual_update_within
from hpcprune.prune.selection import Selection

log = logging.getLogger("hpcprune")

# sparsity -> (selection, every tensor's bool mask): one score -> select -> share pass of the pipeline
Reselect = Callable[[float], tuple[Selection, Mapping[str, torch.Tensor]]]


def first_target(config: RunConfig, target: float) -> float:
    """The sparsity a round prunes to before fine-tuning: s_i for gradual, else the round's target."""
    return config.schedule.initial_sparsity if config.schedule.kind == "gradual" else target


class GradualPruner:
    """`after_step` hook of `hpcprune.train.finetune.train` that moves the masks on schedule."""

    def __init__(self, config: RunConfig, model: torch.nn.Module, target: float, reselect: Reselect):
        self._schedule, self._model, self._target, self._reselect = config.schedule, model, target, reselect
        self.step = 0  # schedule steps done: batches of data.batch_size, over all ranks
        self.selection: Selection | None = None  # of the latest update
        self.updates: list[tuple[int, float, int]] = []  # (schedule step, s_t, kept weights) of each update made

    @classmethod
    def for_round(cls, config: RunConfig, model, splits, world, target: float, reselect: Reselect,
                  *, seed: int) -> GradualPruner | None:
        """A pruner for a gradual round (None for other schedules), refused when fine-tuning ends too soon."""
        if config.schedule.kind != "gradual":
            return None
        total = 0
        if splits is not None and config.finetune.epochs:
            total = fine_tuning_steps(config, len(splits.train), world, seed)
        if gradual_end(config.schedule) > total:
            raise UsageError(f"schedule: the last gradual update is at step {gradual_end(config.schedule)} "
                             f"(start_step + updates * interval) but fine-tuning has only {total} steps "
                             f"(batches of data.batch_size over all ranks); "
                             "raise finetune.epochs or lower schedule.interval/updates")
        return cls(config, model, target, reselect)

    def __call__(self, enforcer: MaskEnforcer | None, batches: int) -> None:
        """After an optimizer step that took `batches` batches of data.batch_size over all ranks."""
        before, self.step = self.step, self.step + batches
        due = gradual_update_within(self._schedule, self._target, before, self.step)
        if due is None:
            return
        step, sparsity = due
        self.selection, masks = self._reselect(sparsity)
        self.updates.append((step, sparsity, self.selection.kept))
        log.info("gradual update %d/%d at step %d: sparsity %.4f %% (%d of %d kept)",
                 (step - self._schedule.start_step) // self._schedule.interval, self._schedule.updates, step,
                 100 * sparsity, self.selection.kept, self.selection.total)
        model = unwrap(self._model)
        apply_masks(model, masks)
        if enforcer is not None:
            enforcer.retarget(model, masks)
            enforcer.after_step()  # newly pruned weights lose their momentum/Adam state too

    @property
    def achieved(self) -> float:
        return math.nan if self.selection is None else 1 - self.selection.kept / self.selection.total


def fine_tuning_steps(config: RunConfig, samples: int, world, seed: int) -> int:
    """Schedule steps the round's fine-tuning takes on `samples` training samples."""
    epochs, batch_size = config.finetune.epochs, config.data.batch_size
    if config.finetune.step_batches is not None:  # exact steps: every batch once, no padding
        return -(-samples // batch_size) * epochs
    per_rank = len(make_loader(range(samples), batch_size, shuffle=True, seed=seed, world=world))
    return schedule_steps(per_rank, world.size, epochs)


def schedule_steps(batches_per_rank: int, world_size: int, epochs: int) -> int:
    """Schedule steps fine-tuning takes: every rank's batches of every epoch (DDP pads the ranks equal)."""
    return batches_per_rank * world_size * epochs
