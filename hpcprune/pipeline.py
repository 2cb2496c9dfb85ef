"""The whole run, step by step: what `hpcprune prune` does.

    hpcprune prune --config configs/quickstart.yaml --out runs/quickstart.h5

config -> world -> model (+ dense training or checkpoint) -> plan -> for each round of the schedule:
score -> select -> mask -> fine-tune -> record. Every rank runs this same function (SPMD); only
rank 0 touches the archive, and what it reads from it reaches the other ranks through the World.

With `model.name: checkpoint` there is no module and no training: the weights are read from a
safetensors file tensor by tensor, and a round is score -> select -> record.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hpcprune.archive import Archive, state_path
from hpcprune.archive_reader import open_archive
from hpcprune.config import CHECKPOINT_MODEL, RunConfig
from hpcprune.data import Splits, load_data
from hpcprune.errors import UsageError
from hpcprune.epoch_checkpoint import EpochCheckpoint, SavedTraining
from hpcprune.fanout import IN_WORLD, select_fanned_out
from hpcprune.finetune import evaluate, resolve_device, train
from hpcprune.launch.ddp import wrap_for_training
from hpcprune.mask_codec import EncodedMask, encode_mask
from hpcprune.masks import apply_masks, packed_kept, unpack_mask
from hpcprune.models import build_model, load_checkpoint, save_checkpoint
from hpcprune.plan import Plan, make_plan
from hpcprune.preempt import stop_here
from hpcprune.schedule import round_targets
from hpcprune.distill import distillation_loss
from hpcprune.gradual import GradualPruner, first_target
from hpcprune.hf import is_hf_model
from hpcprune.prune_step import select_weights
from hpcprune.rewind import RewindRecorder, rewind
from hpcprune.select import Selection
from hpcprune.structured import ChannelPruning
from hpcprune.weights import CheckpointWeights, ModelWeights, Weights
from hpcprune.world import World

log = logging.getLogger("hpcprune")

PackedMasks = dict[str, np.ndarray]  # tensor name -> np.packbits of the flat bool mask (True = keep)


@dataclass
class RunResult:
    archive: str
    dense_accuracy: float  # NaN without a model to evaluate
    final_accuracy: float
    target_sparsity: float
    achieved_sparsity: float
    kept: int
    total: int
    model: nn.Module | None  # the pruned, fine-tuned model (plain module, masks applied)
    target_unit: str = "weights"  # what target_sparsity counts: weights, or channels (prune.granularity)


@dataclass
class ResumePoint:
    """Where a run continues: rank 0 reads it from the archive and broadcasts it."""

    dense_state: str | None = None  # state file of the dense model, once recorded
    dense_accuracy: float | None = None
    last_round: int = 0  # last complete round (0: none)
    round_state: str | None = None  # model state after that round
    training: dict | None = None  # a training stage stopped mid-way (fields of SavedTraining)


@dataclass
class Job:
    """What every stage of one run needs."""

    config: RunConfig
    world: World
    path: Path  # the archive
    device: torch.device
    plan: Plan
    weights: Weights
    model: nn.Module | None = None  # None: masks only, from a checkpoint on disk
    splits: Splits | None = None
    masks: PackedMasks = field(default_factory=dict)  # every tensor's (module) or this rank's (checkpoint)
    channels: ChannelPruning | None = None  # prune.granularity channel: the model's channel groups
    saved_training: SavedTraining | None = None  # where an interrupted training stage continues


def run(config: RunConfig, world: World, *, resume: bool = False, force: bool = False) -> RunResult:
    job = _checkpoint_job(config, world) if config.model.name == CHECKPOINT_MODEL else _model_job(config, world)
    point = _open_archive(job, resume=resume, force=force)
    job.saved_training = SavedTraining(**point.training) if point.training else None
    dense_accuracy = _dense_model(job, point) if job.model is not None else math.nan
    job.masks = _resume_masks(job, point)

    targets = round_targets(config.schedule, config.prune.sparsity)
    accuracy = dense_accuracy
    for round_index in range(point.last_round + 1, len(targets) + 1):
        stop_here(world, job.path, f"before round {round_index}")  # a safe point (hpcprune.preempt)
        accuracy = _prune_round(job, round_index, len(targets), targets[round_index - 1])
    if point.last_round == len(targets) and job.model is not None:
        accuracy = evaluate(job.model, job.splits.test, world=world, device=job.device,
                            batch_size=config.data.eval_batch_size)[1]

    kept = int(world.allreduce_sum(np.array([_kept(job)], dtype=np.int64))[0])
    if world.is_root:
        Archive.at(job.path).record_event("finish", f"{len(targets)} round(s), {kept} of {job.plan.total} weights kept")
    world.barrier()
    return RunResult(str(job.path), dense_accuracy, accuracy, config.prune.sparsity,
                     1.0 - kept / job.plan.total, kept, job.plan.total, job.model,
                     "channels" if job.channels is not None else "weights")


def _model_job(config: RunConfig, world: World) -> Job:
    device = resolve_device(config.device, local_rank=world.local_rank)
    torch.manual_seed(config.seed)
    splits = None if is_hf_model(config.model.name) else load_data(config.data, config.seed)  # text: no images
    shape = {} if splits is None else dict(in_channels=splits.input_shape[0], num_classes=splits.num_classes)
    model = build_model(config.model, **shape)
    if config.model.checkpoint:  # before the archive exists, so a bad checkpoint leaves nothing behind
        load_checkpoint(model, config.model.checkpoint)
    model.to(device)
    plan = make_plan(model, config.prune, world.size)
    channels = ChannelPruning(model, plan, config.prune) if config.prune.granularity == "channel" else None
    return Job(config, world, Path(config.output.path), device, plan, ModelWeights(model), model, splits,
               channels=channels)


def _checkpoint_job(config: RunConfig, world: World) -> Job:
    weights = CheckpointWeights(config.model.checkpoint)
    plan = make_plan(weights.prunable(), config.prune, world.size)
    return Job(config, world, Path(config.output.path), torch.device("cpu"), plan, weights)


# --- archive bookkeeping (rank 0) -------------------------------------------------------------


def _open_archive(job: Job, *, resume: bool, force: bool) -> ResumePoint:
    """Create the archive, or reopen it to resume; every rank learns the resume point."""
    point = ResumePoint()
    if job.world.is_root:
        config_yaml = job.config.to_yaml()
        if resume and job.path.exists():
            _check_states_exist(job.path)  # before open_resume writes: a refused resume changes nothing
            archive = Archive.open_resume(job.path, config_yaml=config_yaml, world_size=job.world.size)
            point = _read_resume_point(job.path, archive)
            log.info("resuming %s after round %d", job.path, point.last_round)
            training = point.training and f", training stage {point.training['stage']} after epoch {point.training['epoch']}"
            archive.record_event("resume", f"after round {point.last_round}{training or ''} on {_where(job.world)}")
        else:
            archive = Archive.create(job.path, config_yaml=config_yaml, model_name=job.config.model.name,
                                     params=_param_table(job), world_size=job.world.size, backend=job.world.name,
                                     force=force)
            archive.record_event("start", _where(job.world))
    shared = job.world.broadcast_bytes(json.dumps(asdict(point)).encode() if job.world.is_root else None)
    return ResumePoint(**json.loads(shared))


def _where(world: World) -> str:
    return f"{world.size} rank(s), {world.name} world"


def _param_table(job: Job) -> list[tuple[str, tuple[int, ...], bool]]:
    prunable = {spec.name for spec in job.plan.tensors}
    if job.model is None:
        return [(name, shape, name in prunable) for name, shape in job.weights.shapes.items()]
    return [(name, tuple(p.shape), name in prunable) for name, p in job.model.named_parameters()]


def _check_states_exist(path: Path) -> None:
    """The model states a resume continues from (dense, last complete round) must be on disk."""
    reader = open_archive(path)
    rounds = reader.rounds()
    for state in filter(None, [(reader.dense or {}).get("state_file"), rounds[-1]["state_file"] if rounds else None]):
        if not Path(state).is_file():
            raise UsageError(f"{path}: cannot resume, the model state {state} it continues from is missing")


def _read_resume_point(path: Path, archive: Archive) -> ResumePoint:
    reader = open_archive(path)
    rounds = archive.completed_rounds()
    dense = reader.dense if archive.dense_done() else {}
    return ResumePoint(
        dense_state=dense.get("state_file"),
        dense_accuracy=dense.get("accuracy"),
        last_round=max(rounds, default=0),
        # The round's own state, not /checkpoint: a kill between marking the round complete and
        # moving the checkpoint would otherwise pair this round's masks with the previous weights.
        round_state=reader.rounds()[-1]["state_file"] if rounds else None,
        training=_saved_training(reader.checkpoint, dense_done=bool(dense), last_round=max(rounds, default=0)),
    )


def _saved_training(checkpoint: dict | None, *, dense_done: bool, last_round: int) -> dict | None:
    """The interrupted training stage resume continues, if it is the next stage to run."""
    saved = SavedTraining.from_checkpoint(checkpoint)
    next_stage = last_round + 1 if dense_done else 0
    return asdict(saved) if saved is not None and saved.stage == next_stage else None


# --- dense model -----------------------------------------------------------------------------


def _dense_model(job: Job, point: ResumePoint) -> float:
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
                         on_epoch_end=RewindRecorder(job.model, job.path, world, config.schedule.rewind_epoch))
    loss, accuracy = _test(job)
    log.info("dense model: test accuracy %.2f %%", 100 * accuracy)
    if world.is_root:
        state_file = state_path(job.path, "dense")
        save_checkpoint(job.model, str(state_file))
        Archive.at(job.path).write_dense(accuracy=accuracy, loss=loss, seconds=time.perf_counter() - started,
                                         history=[asdict(record) for record in history],
                                         state_file=str(state_file.relative_to(job.path.parent)))
    world.barrier()
    return accuracy


def _resume_masks(job: Job, point: ResumePoint) -> PackedMasks:
    """Nothing pruned for a fresh run; the last complete round's masks (and weights) on resume."""
    if not point.last_round:
        return {}
    if job.model is not None:
        load_checkpoint(job.model, point.round_state)
    packed = _encode_masks(open_archive(job.path).read_packed_masks(point.last_round)) if job.world.is_root else None
    masks = _decode_masks(job.world.broadcast_bytes(packed))
    return masks if job.model is not None else {spec.name: masks[spec.name] for spec in job.plan.local(job.world.rank)}


# --- one round: score -> select -> mask -> fine-tune -> record -------------------------------


def _prune_round(job: Job, round_index: int, rounds: int, target: float) -> float:
    config, world = job.config, job.world
    log.info("round %d/%d: pruning to %.2f %% (%s, %s)", round_index, rounds, 100 * target,
             config.prune.criterion, config.prune.rule)
    started = time.perf_counter()
    # Scores are computed lazily inside selection, one tensor at a time, so score and select
    # share one timer; selection reports how long its own passes took.
    if job.channels is not None:  # whole channels: one small allreduce of channel norms, never fanned out
        selection = job.channels.select(world, target, previous=job.masks)
    elif config.fanout.backend != IN_WORLD:  # shard groups selected as tasks elsewhere, stage by stage
        selection = select_fanned_out(job, round_index, first_target(config, target))
    else:
        selection = select_weights(job, first_target(config, target))  # calibrate -> score -> select
    seconds = {"select": time.perf_counter() - started}

    started = time.perf_counter()
    job.masks = _share_masks(selection.masks, world) if job.model is not None else dict(selection.masks)
    accuracy, loss, history = math.nan, math.nan, []
    if job.model is not None:
        masks = _bool_masks(job)
        apply_masks(job.model, masks)
        if config.schedule.rewind_epoch is not None:  # lottery ticket: survivors restart from early weights
            rewind(job.model, job.path, masks)
        pruner = GradualPruner.for_round(config, job.model, job.splits, world, target,
                                         lambda sparsity: _reselect(job, sparsity), seed=config.seed + round_index)
        hooks = dict(after_step=pruner, loss_fn=distillation_loss(config.distill, job.model, state_path(job.path, "dense")))
        history = _train(job, config.finetune, masks=masks, seed=config.seed + round_index, label=f"round {round_index}",
                         stage=round_index, **hooks)
        selection = selection if pruner is None else pruner.selection  # gradual: the last update's masks
        loss, accuracy = _test(job)
    seconds["finetune"] = time.perf_counter() - started

    achieved = 1.0 - selection.kept / selection.total
    log.info("round %d/%d: sparsity %.4f %% (%d of %d kept), test accuracy %.2f %%", round_index, rounds,
             100 * achieved, selection.kept, selection.total, 100 * accuracy)
    started = time.perf_counter()
    local = {spec.name: job.masks[spec.name] for spec in job.plan.local(world.rank)}
    encoded = _gather_encoded(local, world)  # compressed by the rank that owns each tensor
    if world.is_root:
        _record_round(job, encoded, round_index, target, selection, accuracy, loss, seconds, history, started)
    world.barrier()
    return accuracy


def _share_masks(local: PackedMasks, world: World) -> PackedMasks:
    """Every rank needs every mask to train the full model: gather packed bits on rank 0, broadcast."""
    merged = _gather_masks(local, world)
    return local if world.size == 1 else _decode_masks(world.broadcast_bytes(_encode_masks(merged) if world.is_root else None))


def _gather_masks(local: PackedMasks, world: World) -> PackedMasks | None:
    """All ranks' packed masks on rank 0 (None elsewhere): numel/8 bytes per tensor."""
    if world.size == 1:
        return local
    gathered = world.gather_bytes(_encode_masks(local))
    if gathered is None:
        return None
    merged: PackedMasks = {}
    for chunk in gathered:
        merged.update(_decode_masks(chunk))
    return merged


def _gather_encoded(local: PackedMasks, world: World) -> dict[str, tuple[EncodedMask, int]] | None:
    """This rank's masks compressed and checksummed here, gathered on rank 0 with their kept counts."""
    header, blobs = [], []
    for name, packed in local.items():
        encoded = encode_mask(packed)
        header.append([name, encoded.nbytes, encoded.chunk_bytes, [len(c) for c in encoded.chunks],
                       packed_kept(packed)])
        blobs += encoded.chunks
    gathered = world.gather_bytes(json.dumps(header).encode() + b"\n" + b"".join(blobs))
    if gathered is None:
        return None
    masks = {}
    for data in gathered:
        header_line, _, body = data.partition(b"\n")
        offset = 0
        for name, nbytes, chunk_bytes, lengths, kept in json.loads(header_line):
            chunks = []
            for length in lengths:
                chunks.append(body[offset:offset + length])
                offset += length
            masks[name] = (EncodedMask(nbytes, chunk_bytes, chunks), kept)
    return masks


def _encode_masks(masks: PackedMasks) -> bytes:
    """Packed masks as bytes: a JSON header line (names, byte counts) then the packed bits."""
    header = json.dumps([[name, int(packed.nbytes)] for name, packed in masks.items()]).encode()
    return header + b"\n" + b"".join(np.ascontiguousarray(packed).tobytes() for packed in masks.values())


def _decode_masks(data: bytes) -> PackedMasks:
    header, _, body = data.partition(b"\n")
    masks, offset = {}, 0
    for name, size in json.loads(header):
        masks[name] = np.frombuffer(body, dtype=np.uint8, count=size, offset=offset)
        offset += size
    return masks


def _record_round(job, masks: dict[str, tuple[EncodedMask, int]], round_index, target, selection: Selection, accuracy, loss, seconds, history, started):
    relative_state = ""
    if job.model is not None:
        state_file = state_path(job.path, f"round-{round_index:04d}")
        save_checkpoint(job.model, str(state_file))
        relative_state = str(state_file.relative_to(job.path.parent))
    layers, packed = [], {}
    for spec in job.plan.tensors:  # global order, whichever rank scored the tensor
        encoded, kept = masks[spec.name]
        packed[spec.name] = (encoded, spec.shape, kept)
        layers.append(dict(name=spec.name, numel=spec.numel, kept=kept, sparsity=1.0 - kept / spec.numel))
    attrs = dict(
        criterion=job.config.prune.criterion, rule=job.config.prune.rule, target_sparsity=target,
        achieved_sparsity=1.0 - selection.kept / selection.total,
        threshold=math.nan if selection.threshold is None else selection.threshold,
        kept=selection.kept, total=selection.total, accuracy=accuracy, loss=loss,
        seconds_select=seconds["select"], seconds_finetune=seconds["finetune"],
        seconds_record=time.perf_counter() - started, state_file=relative_state, **selection.attrs,
    )
    archive = Archive.at(job.path)
    archive.write_round(round_index, attrs=attrs,
                        masks=packed, layers=layers, history=[asdict(record) for record in history],
                        progress=job.config.progress)
    archive.mark_checkpoint(round_index, relative_state)


# --- small helpers ---------------------------------------------------------------------------


def _reselect(job: Job, sparsity: float) -> tuple[Selection, dict[str, torch.Tensor]]:
    """One mask update of the gradual schedule: select at `sparsity`, share, unpack."""
    selection = select_weights(job, sparsity)
    job.masks = _share_masks(selection.masks, job.world)
    return selection, _bool_masks(job)


def _bool_masks(job: Job) -> dict[str, torch.Tensor]:
    masks = {spec.name: unpack_mask(job.masks[spec.name], spec.shape) for spec in job.plan.tensors}
    # Pruned channels also hold their biases and BatchNorm affines at 0.
    return masks if job.channels is None else {**masks, **job.channels.companion_masks(masks)}


def _kept(job: Job) -> int:
    """Kept weights this rank knows of (module: all masks on every rank, so rank 0 counts them)."""
    if job.model is not None and not job.world.is_root:
        return 0
    local = job.plan.tensors if job.model is not None else job.plan.local(job.world.rank)
    return sum(packed_kept(job.masks[spec.name]) if spec.name in job.masks else spec.numel for spec in local)


def _train(job: Job, train_config, *, masks, seed, label, stage, **hooks):
    if not train_config.epochs:
        return []
    config = job.config
    model = wrap_for_training(job.model, job.world, job.device)
    gradual_round = stage > 0 and config.schedule.kind == "gradual"
    resumable = EpochCheckpoint(job.world, job.path, stage, label, job.saved_training, saves=not gradual_round)
    return train(model, job.splits.train, job.splits.validation, train_config, world=job.world, device=job.device,
                 seed=seed, batch_size=config.data.batch_size, eval_batch_size=config.data.eval_batch_size,
                 masks=masks, progress=config.progress, describe=label, resumable=resumable, **hooks)


def _test(job: Job) -> tuple[float, float]:
    if job.splits is None:  # a Hugging Face model: pruned, not evaluated (no labelled data here)
        return math.nan, math.nan
    return evaluate(job.model, job.splits.test, world=job.world, device=job.device,
                    batch_size=job.config.data.eval_batch_size)
