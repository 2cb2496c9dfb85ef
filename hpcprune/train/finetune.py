"""Step 9 — finetune: train the (masked) model with cross-entropy and evaluate it after every epoch.

    hpcprune prune --config configs/quickstart.yaml --set finetune.epochs=2

`train` is written for every world size: `model` may be wrapped in DistributedDataParallel (its
forward then averages gradients across ranks) and the loader shards the data by rank; or, with
`step_batches`, every step's gradient is an exact sum over fixed batches (hpcprune.train.exact_steps),
the same at any world size. The epoch metrics are summed over all ranks, so every rank records the
same numbers; evaluation's are the same for any world size.
With masks, pruned weights stay exactly 0.0 (see `hpcprune.prune.masks.MaskEnforcer`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader
from tqdm import tqdm

from hpcprune.config import LRScheduleConfig, OptimizerConfig, TrainConfig
from hpcprune.dist.exact_sum import sum_kept_terms
from hpcprune.dist.failures import raise_on_every_rank
from hpcprune.dist.world import World
from hpcprune.errors import UsageError
from hpcprune.models.data import make_loader, set_epoch
from hpcprune.prune.masks import MaskEnforcer, apply_masks, unwrap
from hpcprune.train.exact_steps import (
    StepPlan,
    exact_epoch,
    running_statistics_problem,
    share_replica,
    take_step,
)


@dataclass
class EpochRecord:
    epoch: int  # 1-based: the number of epochs completed when the record was made
    train_loss: float  # mean cross-entropy over the epoch's training batches of all ranks
    eval_loss: float  # NaN when there is no evaluation data
    eval_accuracy: float


@dataclass
class TrainingState:
    """Everything `train` carries from one epoch to the next: what a checkpoint must hold to continue."""

    model: nn.Module  # possibly DDP-wrapped
    optimizer: Optimizer
    schedule: LRScheduler
    epochs: int  # the whole run's epoch count
    records: list[EpochRecord] = field(default_factory=list)  # one per epoch done

    @property
    def epoch(self) -> int:
        """Epochs done so far."""
        return len(self.records)


class Resumable(Protocol):
    """Lets a run continue an interrupted `train` (see `hpcprune.train.checkpoint`)."""

    def restore(self, state: TrainingState) -> None:
        """Load a saved state into `state` before the first epoch, or leave it fresh."""

    def after_epoch(self, state: TrainingState) -> None:
        """Called on every rank after each epoch; may save `state` and stop the run by raising."""


# (logits, targets, inputs) -> scalar loss to minimise; plain cross-entropy when none is given
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# (mask enforcer, batches of data.batch_size the step took over all ranks), after every optimizer step
AfterStep = Callable[[MaskEnforcer | None, int], None]


# --- optimizers and learning-rate schedules (registries: a new one is one entry) ------------------

OPTIMIZERS: dict[str, Callable[[Iterable[Any], OptimizerConfig], Optimizer]] = {
    "sgd": lambda params, cfg: torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay),
    # Adam keeps its default betas: `momentum` is an SGD setting.
    "adam": lambda params, cfg: torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
    "adamw": lambda params, cfg: torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
}


def _unit_factor(epoch: int) -> float:
    return 1.0


LR_SCHEDULES: dict[str, Callable[[Optimizer, LRScheduleConfig, int], LRScheduler]] = {
    "constant": lambda opt, cfg, epochs: torch.optim.lr_scheduler.LambdaLR(opt, _unit_factor),
    "cosine": lambda opt, cfg, epochs: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1)),
    "step": lambda opt, cfg, epochs: torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma),
}


def build_optimizer(params: Iterable[Any], cfg: OptimizerConfig) -> Optimizer:
    return OPTIMIZERS[cfg.name](params, cfg)


def build_lr_schedule(optimizer: Optimizer, cfg: LRScheduleConfig, epochs: int) -> LRScheduler:
    """A schedule stepped once per epoch; cosine decays to 0 over `epochs`."""
    return LR_SCHEDULES[cfg.name](optimizer, cfg, epochs)


def resolve_device(name: str, *, local_rank: int = 0) -> torch.device:
    """`auto`: CUDA when available, else CPU. With several GPUs per node, rank `local_rank` takes GPU `local_rank`."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name not in ("auto", "cuda"):
        raise UsageError(f"device: unknown device {name!r}; use auto, cpu or cuda")
    if not torch.cuda.is_available():
        raise UsageError("device: cuda was requested but CUDA is not available here (use device: auto or cpu)")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


# --- training --------------------------------------------------------------------------------------


def train(model: nn.Module, train_data, eval_data, cfg: TrainConfig, *, world: World, device: torch.device,
          seed: int, batch_size: int, eval_batch_size: int, masks: Mapping[str, torch.Tensor] | None = None,
          progress: bool = False, describe: str = "train",
          on_epoch_end: Callable[[EpochRecord], None] | None = None,
          resumable: Resumable | None = None, loss_fn: LossFn | None = None,
          after_step: AfterStep | None = None) -> list[EpochRecord]:
    """Train `model` (already on `device`, possibly DDP-wrapped) for `cfg.epochs` epochs.

    `eval_data` (None: no evaluation) is evaluated after every epoch; `on_epoch_end` receives each
    epoch's record. `resumable` may start from a saved epoch and save the state after any epoch.
    `loss_fn(logits, targets, inputs)` replaces the cross-entropy (distillation); `after_step` runs
    after every optimizer step with the mask enforcer (the gradual schedule moves the masks there).
    Returns one record per epoch.
    """
    torch.manual_seed(seed)  # dropout and any other randomness of the model's forward
    optimizer = build_optimizer(model.parameters(), cfg.optimizer)
    schedule = build_lr_schedule(optimizer, cfg.lr_schedule, cfg.epochs)
    enforcer = None
    if masks is not None:
        apply_masks(unwrap(model), masks)
        enforcer = MaskEnforcer(model, masks, optimizer)
    run_epoch = _epoch_runner(model, train_data, cfg, optimizer, enforcer, world=world, device=device, seed=seed,
                              batch_size=batch_size, loss_fn=loss_fn, after_step=after_step)

    state = TrainingState(model, optimizer, schedule, cfg.epochs)
    if resumable is not None:
        resumable.restore(state)
    records = state.records
    for epoch in range(state.epoch, cfg.epochs):
        shown = progress and world.is_root
        bar = partial(_progress_bar, description=f"{describe} {epoch + 1}/{cfg.epochs}") if shown else None
        train_loss = run_epoch(epoch, bar)
        schedule.step()
        eval_loss, eval_accuracy = _evaluate_or_nan(model, eval_data, world=world, device=device, batch_size=eval_batch_size)
        records.append(EpochRecord(epoch + 1, train_loss, eval_loss, eval_accuracy))
        if on_epoch_end is not None:
            on_epoch_end(records[-1])
        if resumable is not None:
            resumable.after_epoch(state)
    return records


def _epoch_runner(model, train_data, cfg: TrainConfig, optimizer, enforcer, *, world: World, device, seed: int,
                  batch_size: int, loss_fn, after_step) -> Callable[[int, Callable | None], float]:
    """(epoch, progress wrapper or None) -> mean training loss: DDP's steps, or exact steps (`cfg.step_batches`)."""
    if cfg.step_batches is not None:
        if model is not unwrap(model):
            raise ValueError("exact steps reduce the gradients themselves: train the model itself, not a DDP wrapper")
        problem = running_statistics_problem(model, world.size, "step_batches")
        if problem:  # every rank finds it alike (the pipeline refuses it earlier, before the archive exists)
            raise_on_every_rank(world, UsageError(problem))
        share_replica(model, world)
        plan = StepPlan(len(train_data), batch_size, cfg.step_batches, seed, world.rank, world.size)
        loss_of = loss_fn or _cross_entropy
        return lambda epoch, bar: exact_epoch(model, train_data, plan, epoch, optimizer, enforcer, world=world,
                                              device=device, loss_of=loss_of, after_step=after_step,
                                              wrap_steps=bar or iter)
    loader = make_loader(train_data, batch_size, shuffle=True, seed=seed, world=world)

    def run_epoch(epoch: int, bar: Callable | None) -> float:
        set_epoch(loader, epoch)
        return one_epoch(model, bar(loader) if bar else loader, optimizer, enforcer, world=world, device=device,
                         loss_fn=loss_fn, after_step=after_step)
    return run_epoch


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, targets)


def one_epoch(model: nn.Module, batches: Iterable, optimizer: Optimizer, enforcer: MaskEnforcer | None, *,
              world: World, device: torch.device, loss_fn: LossFn | None = None,
              after_step: AfterStep | None = None) -> float:
    """One pass over `batches`; returns the mean training loss over the samples of all ranks."""
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # on device: no sync per batch
    samples = 0
    for inputs, targets in batches:
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        logits = model(inputs)  # model(), not the module: DDP syncs gradients here
        loss = (loss_fn or _cross_entropy)(logits, targets, inputs)
        loss.backward()
        take_step(optimizer, enforcer, after_step, world.size)  # DDP: one batch per rank
        loss_sum += loss.detach() * len(targets)
        samples += len(targets)
    totals = world.allreduce_sum(np.array([loss_sum.item(), samples], dtype=np.float64))
    return _ratio(totals[0], totals[1])


def _progress_bar(steps, description: str):
    # disable=None: tqdm switches itself off when stderr is not a terminal (batch jobs, logs).
    return tqdm(steps, desc=description, leave=False, disable=None, unit="step")


# --- evaluation ------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, data, *, world: World, device: torch.device, batch_size: int) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over `data`, the same bits for any world size; NaN for no samples.

    Batch b is samples [b*batch_size, (b+1)*batch_size), computed whole on rank b mod n (the same
    logits wherever it runs), and the batches' loss sums are added exactly (hpcprune.dist.exact_sum).
    """
    # The ranks hold different numbers of batches; hence the unwrapped module, as a DDP forward may
    # run collectives (buffer broadcast) that would then wait forever.
    module = unwrap(model)
    was_training = module.training
    module.eval()
    batches = -(-len(data) // batch_size)
    mine = [list(range(b * batch_size, min(len(data), (b + 1) * batch_size))) for b in range(world.rank, batches, world.size)]
    losses, correct, samples = [], torch.zeros((), dtype=torch.int64, device=device), 0  # on device: no sync per batch
    for inputs, targets in DataLoader(data, batch_sampler=mine, num_workers=0):
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        logits = module(inputs)
        losses.append(F.cross_entropy(logits, targets, reduction="sum").double().reshape(1))
        correct += (logits.argmax(dim=1) == targets).sum()
        samples += len(targets)
    module.train(was_training)
    loss_sum = float(sum_kept_terms(losses, (1,), batches, world)[0])
    correct, samples = world.allreduce_sum(np.array([int(correct), samples], dtype=np.int64))
    return _ratio(loss_sum, samples), _ratio(correct, samples)


def _evaluate_or_nan(model, data, **kwargs) -> tuple[float, float]:
    if data is None:
        return float("nan"), float("nan")
    return evaluate(model, data, **kwargs)


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else float("nan")
