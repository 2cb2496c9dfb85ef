"""The stages of a run on a module or a checkpoint: the dense start, then each round
score -> select -> mask -> fine-tune -> record.

    hpcprune prune --config configs/quickstart.yaml

Every rank runs these functions (SPMD). A round's masks are selected on the rank that owns each
tensor; a module needs every mask on every rank to train (`share_masks`), and rank 0 records the
round from the chunks each owner compressed, received one tensor at a time as the archive writes
them (`masks_for_root`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict

import numpy as np
import torch

from hpcprune import registry
from hpcprune.archive.codec import packed_kept
from hpcprune.archive.writer import Archive
from hpcprune.dist.ddp import wrap_for_training
from hpcprune.dist.failures import raise_on_every_rank
from hpcprune.models.builders import load_checkpoint, save_checkpoint
from hpcprune.prune.gradual import GradualPruner, first_target
from hpcprune.prune.masks import UnpackedMasks, apply_masks
from hpcprune.prune.selection import Selection, nothing_kept
from hpcprune.prune.step import select_weights
from hpcprune.run.fanout import select_fanned_out
from hpcprune.run.job import Job
from hpcprune.run.mask_traffic import (
    RecordedMask,
    kept_per_tensor,
    masks_for_root,
    share_masks,
)
from hpcprune.run.resume import ResumePoint
from hpcprune.train.checkpoint import EpochCheckpoint
from hpcprune.train.distill import distillation_loss
from hpcprune.train.finetune import evaluate, train
from hpcprune.train.rewind import RewindRecorder, rewind

log = logging.getLogger("hpcprune")


def dense_model(job: Job, point: ResumePoint) -> float:
    """Bring the model to its dense starting point: recorded state, checkpoint, or dense training."""
    config, world = job.config, job.world
    if point.dense_state is not None:
        load_checkpoint(job.model, point.dense_state)
        return float(point.dense_accuracy)
    started = time.perf_counter()
    history = []
    if not config.model.checkpoint and config.pretrain.epochs:
        log.info("no checkpoint given: training the dense model for %d epochs", config.pretrain.epochs)
        history = _train(job, config.pretrain, masks=None, seed=config.seed, label="dense", stage=0,
                         on_epoch_end=RewindRecorder(job.model, job.side.state("rewind"), world, config.schedule.rewind_epoch))
    loss, accuracy = test_model(job)
    log.info("dense model: test accuracy %.2f %%", 100 * accuracy)
    if world.is_root:
        state_file = job.side.state("dense")
        save_checkpoint(job.model, str(state_file))
        Archive.at(job.path).write_dense(accuracy=accuracy, loss=loss, seconds=time.perf_counter() - started,
                                         history=[asdict(record) for record in history],
                                         state_file=str(state_file.absolute()))
    world.barrier()
    return accuracy


def prune_round(job: Job, round_index: int, rounds: int, target: float) -> float:
    config, world = job.config, job.world
    log.info("round %d/%d: pruning to %.2f %% (%s, %s)", round_index, rounds, 100 * target,
             config.prune.criterion, config.prune.rule)
    started = time.perf_counter()
    # Scores are computed lazily inside selection, one tensor at a time, so score and select
    # share one timer; selection reports how long its own passes took.
    everywhere = False  # whether every rank already has every tensor's mask
    if job.channels is not None:  # whole channels: one small allreduce of channel norms, never fanned out
        selection = job.channels.select(world, target, previous=job.masks)
    elif config.fanout.backend != registry.IN_WORLD:  # shard groups selected as tasks elsewhere, stage by stage
        selection, everywhere = select_fanned_out(job, round_index, first_target(config, target)), True
    else:
        selection = select_weights(job, first_target(config, target))  # calibrate -> score -> select
    _refuse_keeping_nothing(job, selection, first_target(config, target))
    seconds = {"select": time.perf_counter() - started}

    started = time.perf_counter()
    job.masks = selection.masks if job.model is None or everywhere else share_masks(selection.masks, job.plan, world)
    accuracy, loss, history = math.nan, math.nan, []
    if job.model is not None:
        masks = _training_masks(job)
        apply_masks(job.model, masks)
        if config.schedule.rewind_epoch is not None:  # lottery ticket: survivors restart from early weights
            rewind(job.model, job.side.state("rewind"), masks)
        pruner = GradualPruner.for_round(config, job.model, job.splits, world, target,
                                         lambda sparsity: _reselect(job, sparsity), seed=config.seed + round_index)
        hooks = dict(after_step=pruner, loss_fn=distillation_loss(config.distill, job.model, job.side.state("dense")))
        history = _train(job, config.finetune, masks=masks, seed=config.seed + round_index, label=f"round {round_index}",
                         stage=round_index, **hooks)
        selection = selection if pruner is None else pruner.selection  # gradual: the last update's masks
        loss, accuracy = test_model(job)
    seconds["finetune"] = time.perf_counter() - started

    achieved = 1.0 - selection.kept / selection.total
    log.info("round %d/%d: sparsity %.4f %% (%d of %d kept), test accuracy %.2f %%", round_index, rounds,
             100 * achieved, selection.kept, selection.total, 100 * accuracy)
    started = time.perf_counter()
    kept = kept_per_tensor(job.masks, job.plan, world)
    masks = masks_for_root(job.masks, job.plan, world)  # compressed by the rank that owns each tensor
    if world.is_root:
        _record_round(job, masks, kept, round_index, target, selection, accuracy, loss, seconds, history, started)
    world.barrier()
    return accuracy


def _record_round(job, masks: Iterator[RecordedMask], kept: np.ndarray, round_index, target, selection: Selection,
                  accuracy, loss, seconds, history, started):
    round_state = ""
    if job.model is not None:
        state_file = job.side.state(f"round-{round_index:04d}")
        save_checkpoint(job.model, str(state_file))
        round_state = str(state_file.absolute())  # the archive stores it relative to its own folder
    layers = [dict(name=spec.name, numel=spec.numel, kept=int(kept[spec.index]),
                   sparsity=1.0 - int(kept[spec.index]) / spec.numel) for spec in job.plan.tensors]
    attrs = dict(
        criterion=job.config.prune.criterion, rule=job.config.prune.rule, target_sparsity=target,
        achieved_sparsity=1.0 - selection.kept / selection.total,
        threshold=math.nan if selection.threshold is None else selection.threshold,
        kept=selection.kept, total=selection.total, accuracy=accuracy, loss=loss,
        seconds_select=seconds["select"], seconds_finetune=seconds["finetune"],
        seconds_record=time.perf_counter() - started, state_file=round_state, **selection.attrs,
    )
    archive = Archive.at(job.path)
    # The masks arrive while the archive writes them, one tensor at a time, in the plan's order.
    archive.write_round(round_index, attrs=attrs,
                        masks=masks, layers=layers, history=[asdict(record) for record in history],
                        progress=job.config.progress)
    archive.mark_checkpoint(round_index, round_state)


# --- small helpers ---------------------------------------------------------------------------


def _reselect(job: Job, sparsity: float) -> tuple[Selection, dict[str, torch.Tensor]]:
    """One mask update of the gradual schedule: select at `sparsity`, share, and the masks to train with."""
    selection = select_weights(job, sparsity)
    _refuse_keeping_nothing(job, selection, sparsity)
    job.masks = share_masks(selection.masks, job.plan, job.world)
    return selection, _training_masks(job)


def _refuse_keeping_nothing(job: Job, selection: Selection, sparsity: float) -> None:
    """A selection that keeps no weight is refused (selection.kept is the same sum on every rank)."""
    refusal = nothing_kept(selection, rule=job.config.prune.rule, sparsity=sparsity, threshold=job.config.prune.threshold)
    if refusal is not None:
        raise_on_every_rank(job.world, refusal)


def _training_masks(job: Job) -> dict[str, torch.Tensor]:
    """Every tensor's mask as its packed bits (sharing job.masks' memory: unpacked only while applied)."""
    masks = {spec.name: torch.from_numpy(job.masks[spec.name]) for spec in job.plan.tensors}
    if job.channels is None:
        return masks
    # Pruned channels also hold their biases and BatchNorm affines at 0 (small masks, one per channel).
    shapes = {spec.name: spec.shape for spec in job.plan.tensors}
    return {**masks, **job.channels.companion_masks(UnpackedMasks(job.masks, shapes))}


def kept_on_rank(job: Job) -> int:
    """Kept weights this rank knows of (module: all masks on every rank, so rank 0 counts them)."""
    if job.model is not None and not job.world.is_root:
        return 0
    local = job.plan.tensors if job.model is not None else job.plan.local(job.world.rank)
    return sum(packed_kept(job.masks[spec.name]) if spec.name in job.masks else spec.numel for spec in local)


def _train(job: Job, train_config, *, masks, seed, label, stage, **hooks):
    if not train_config.epochs:
        return []
    config = job.config
    # Exact steps reduce gradients themselves; DDP would average them a second time.
    model = job.model if train_config.step_batches else wrap_for_training(job.model, job.world, job.device)
    gradual_round = stage > 0 and config.schedule.kind == "gradual"
    resumable = EpochCheckpoint(job.world, job.path, job.side, stage, label, job.saved_training, saves=not gradual_round)
    return train(model, job.splits.train, job.splits.validation, train_config, world=job.world, device=job.device,
                 seed=seed, batch_size=config.data.batch_size, eval_batch_size=config.data.eval_batch_size,
                 masks=masks, progress=config.progress, describe=label, resumable=resumable, **hooks)


def test_model(job: Job) -> tuple[float, float]:
    if job.splits is None:  # a Hugging Face model: pruned, not evaluated (no labelled data here)
        return math.nan, math.nan
    return evaluate(job.model, job.splits.test, world=job.world, device=job.device,
                    batch_size=job.config.data.eval_batch_size)
