"""The whole run, step by step: what `hpcprune prune` does.

    hpcprune prune --config configs/quickstart.yaml --out runs/quickstart.h5

config -> world -> model (+ dense training or checkpoint) -> plan -> for each round of the schedule:
score -> select -> mask -> fine-tune -> record. Every rank runs this same function (SPMD); only
rank 0 touches the archive, and what it reads from it reaches the other ranks through the World.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from hpcprune.archive import Archive, open_archive, state_path
from hpcprune.config import RunConfig
from hpcprune.data import Splits, load_data
from hpcprune.finetune import evaluate, resolve_device, train
from hpcprune.launch.ddp import wrap_for_training
from hpcprune.masks import apply_masks, pack_mask, unpack_mask
from hpcprune.models import build_model, load_checkpoint, save_checkpoint
from hpcprune.plan import Plan, make_plan
from hpcprune.schedule import round_targets
from hpcprune.scoring import ScoreContext, score_tensor
from hpcprune.select import select
from hpcprune.world import World

log = logging.getLogger("hpcprune")


@dataclass
class RunResult:
    archive: str
    dense_accuracy: float
    final_accuracy: float
    target_sparsity: float
    achieved_sparsity: float
    kept: int
    total: int
    model: nn.Module  # the pruned, fine-tuned model (plain module, masks applied)


@dataclass
class ResumePoint:
    """Where a run continues: rank 0 reads it from the archive and broadcasts it."""

    dense_state: str | None = None  # state file of the dense model, once recorded
    dense_accuracy: float | None = None
    last_round: int = 0  # last complete round (0: none)
    round_state: str | None = None  # model state after that round


def run(config: RunConfig, world: World, *, resume: bool = False, force: bool = False) -> RunResult:
    archive_path = Path(config.output.path)
    device = resolve_device(config.device, local_rank=world.local_rank)
    torch.manual_seed(config.seed)
    splits = load_data(config.data, config.seed)
    model = build_model(config.model, in_channels=splits.input_shape[0], num_classes=splits.num_classes)
    if config.model.checkpoint:  # before the archive exists, so a bad checkpoint leaves nothing behind
        load_checkpoint(model, config.model.checkpoint)
    model.to(device)
    plan = make_plan(model, config.prune, world.size)

    point = _open_archive(config, model, world, archive_path, resume=resume, force=force)
    dense_accuracy = _dense_model(config, model, splits, world, device, archive_path, point)
    masks = _resume_masks(model, plan, world, archive_path, point)

    targets = round_targets(config.schedule, config.prune.sparsity)
    accuracy = dense_accuracy
    for round_index in range(point.last_round + 1, len(targets) + 1):
        masks, accuracy = _prune_round(config, model, plan, masks, splits, world, device, archive_path,
                                       round_index, len(targets), targets[round_index - 1])
    if point.last_round == len(targets) and point.last_round:
        accuracy = _test_accuracy(config, model, splits, world, device)

    kept = sum(int(mask.sum()) for mask in masks.values())
    result = RunResult(str(archive_path), dense_accuracy, accuracy, config.prune.sparsity,
                       1.0 - kept / plan.total, kept, plan.total, model)
    world.barrier()
    return result


# --- archive bookkeeping (rank 0) -------------------------------------------------------------


def _open_archive(config: RunConfig, model: nn.Module, world: World, path: Path, *, resume: bool, force: bool) -> ResumePoint:
    """Create the archive, or reopen it to resume; every rank learns the resume point."""
    point = ResumePoint()
    if world.is_root:
        if resume and path.exists():
            archive = Archive.open_resume(path, config_yaml=config.to_yaml(), world_size=world.size)
            point = _read_resume_point(path, archive)
            log.info("resuming %s after round %d", path, point.last_round)
        else:
            params = [(name, tuple(p.shape), name in _prunable_names(model, config)) for name, p in model.named_parameters()]
            Archive.create(path, config_yaml=config.to_yaml(), model_name=config.model.name, params=params,
                           world_size=world.size, backend=world.name, force=force)
    shared = world.broadcast_bytes(json.dumps(asdict(point)).encode() if world.is_root else None)
    return ResumePoint(**json.loads(shared))


def _prunable_names(model: nn.Module, config: RunConfig) -> set[str]:
    return {spec.name for spec in make_plan(model, config.prune, 1).tensors}


def _read_resume_point(path: Path, archive: Archive) -> ResumePoint:
    reader = open_archive(path)
    rounds = archive.completed_rounds()
    dense = reader.dense or {}
    checkpoint = reader.checkpoint or {}
    return ResumePoint(
        dense_state=dense.get("state_file") if archive.dense_done() else None,
        dense_accuracy=dense.get("accuracy") if archive.dense_done() else None,
        last_round=max(rounds, default=0),
        round_state=checkpoint.get("state_file") if rounds else None,
    )


# --- dense model -----------------------------------------------------------------------------


def _dense_model(config: RunConfig, model: nn.Module, splits: Splits, world: World, device: torch.device,
                 path: Path, point: ResumePoint) -> float:
    """Bring the model to its dense starting point: recorded state, checkpoint, or dense training."""
    if point.dense_state is not None:
        load_checkpoint(model, str(_beside(path, point.dense_state)))
        return float(point.dense_accuracy)
    started = time.perf_counter()
    history = []
    if not config.model.checkpoint and config.pretrain.epochs:
        log.info("no checkpoint given: training the dense model for %d epochs", config.pretrain.epochs)
        history = _train(config, config.pretrain, model, splits, world, device, masks=None, seed=config.seed, label="dense")
    loss, accuracy = evaluate(model, splits.test, world=world, device=device, batch_size=config.data.eval_batch_size)
    log.info("dense model: test accuracy %.2f %%", 100 * accuracy)
    if world.is_root:
        state_file = state_path(path, "dense")
        save_checkpoint(model, str(state_file))
        Archive.at(path).write_dense(accuracy=accuracy, loss=loss, seconds=time.perf_counter() - started,
                                     history=[asdict(record) for record in history],
                                     state_file=str(state_file.relative_to(path.parent)))
    world.barrier()
    return accuracy


def _resume_masks(model: nn.Module, plan: Plan, world: World, path: Path, point: ResumePoint) -> dict[str, torch.Tensor]:
    """All-keep masks for a fresh run; the last complete round's masks and weights on resume."""
    if not point.last_round:
        return {spec.name: torch.ones(spec.shape, dtype=torch.bool) for spec in plan.tensors}
    load_checkpoint(model, str(_beside(path, point.round_state)))
    packed = _root_masks_bytes(path, point.last_round) if world.is_root else None
    return _decode_masks(world.broadcast_bytes(packed), plan)


def _root_masks_bytes(path: Path, round_index: int) -> bytes:
    masks = open_archive(path).read_masks(round_index)
    return _encode_masks({name: mask for name, mask in masks.items()})


# --- one round: score -> select -> mask -> fine-tune -> record -------------------------------


def _prune_round(config: RunConfig, model: nn.Module, plan: Plan, masks: dict[str, torch.Tensor], splits: Splits,
                 world: World, device: torch.device, path: Path, round_index: int, rounds: int, target: float):
    log.info("round %d/%d: pruning to %.2f %% (%s, %s)", round_index, rounds, 100 * target,
             config.prune.criterion, config.prune.rule)
    seconds = {}
    started = time.perf_counter()
    scores = _score_local(config, model, plan, masks, world)
    seconds["score"] = time.perf_counter() - started

    started = time.perf_counter()
    selection = select(config.prune.rule, scores, plan, world, sparsity=target, threshold=config.prune.threshold)
    del scores  # scores are only needed to choose; free them before training
    masks = _share_masks(selection.masks, plan, world)
    seconds["select"] = time.perf_counter() - started

    started = time.perf_counter()
    apply_masks(model, masks)
    history = _train(config, config.finetune, model, splits, world, device, masks=masks,
                     seed=config.seed + round_index, label=f"round {round_index}")
    loss, accuracy = evaluate(model, splits.test, world=world, device=device, batch_size=config.data.eval_batch_size)
    seconds["finetune"] = time.perf_counter() - started

    achieved = 1.0 - selection.kept / selection.total
    log.info("round %d/%d: sparsity %.4f %% (%d of %d kept), test accuracy %.2f %%", round_index, rounds,
             100 * achieved, selection.kept, selection.total, 100 * accuracy)
    if world.is_root:
        _record_round(config, model, masks, path, round_index, target, selection, accuracy, loss, seconds, history)
    world.barrier()
    return masks, accuracy


def _score_local(config: RunConfig, model: nn.Module, plan: Plan, masks: dict[str, torch.Tensor], world: World):
    """Scores of this rank's tensors; weights pruned in earlier rounds get -inf so they stay pruned."""
    parameters = dict(model.named_parameters())
    context = ScoreContext(seed=config.seed)
    scores = {}
    for spec in plan.local(world.rank):
        score = score_tensor(config.prune.criterion, spec, parameters[spec.name], context).cpu()
        scores[spec.name] = score.masked_fill_(~masks[spec.name], float("-inf"))
    return scores


def _share_masks(local: dict[str, torch.Tensor], plan: Plan, world: World) -> dict[str, torch.Tensor]:
    """Every rank needs every mask to train the full model: gather packed bits on rank 0, broadcast."""
    if world.size == 1:
        return dict(local)
    gathered = world.gather_bytes(_encode_masks(local))
    merged = None
    if world.is_root:
        merged = {}
        for chunk in gathered:
            merged.update(_decode_masks(chunk, plan))
        merged = _encode_masks({spec.name: merged[spec.name] for spec in plan.tensors})
    return _decode_masks(world.broadcast_bytes(merged), plan)


def _encode_masks(masks: dict[str, torch.Tensor]) -> bytes:
    """Packed masks as bytes: a JSON header line (names, byte counts) then the packed bits."""
    packed = {name: pack_mask(mask).tobytes() for name, mask in masks.items()}
    header = json.dumps([[name, len(data)] for name, data in packed.items()]).encode()
    return header + b"\n" + b"".join(packed.values())


def _decode_masks(data: bytes, plan: Plan) -> dict[str, torch.Tensor]:
    import numpy as np

    header, _, body = data.partition(b"\n")
    masks, offset = {}, 0
    for name, size in json.loads(header):
        bits = np.frombuffer(body, dtype=np.uint8, count=size, offset=offset)
        masks[name] = unpack_mask(bits, plan.by_name(name).shape)
        offset += size
    return masks


def _record_round(config, model, masks, path, round_index, target, selection, accuracy, loss, seconds, history):
    state_file = state_path(path, f"round-{round_index:04d}")
    save_checkpoint(model, str(state_file))
    relative_state = str(state_file.relative_to(path.parent))
    packed = {name: (pack_mask(mask), tuple(mask.shape), int(mask.sum())) for name, mask in masks.items()}
    layers = [dict(name=name, numel=mask.numel(), kept=kept, sparsity=1.0 - kept / mask.numel())
              for name, mask in masks.items() for kept in [int(mask.sum())]]
    attrs = dict(
        criterion=config.prune.criterion, rule=config.prune.rule, target_sparsity=target,
        achieved_sparsity=1.0 - selection.kept / selection.total,
        threshold=float("nan") if selection.threshold is None else selection.threshold,
        kept=selection.kept, total=selection.total, accuracy=accuracy, loss=loss,
        seconds_score=seconds["score"], seconds_select=seconds["select"], seconds_finetune=seconds["finetune"],
        state_file=relative_state,
    )
    archive = Archive.at(path)
    archive.write_round(round_index, attrs=attrs, masks=packed, layers=layers,
                        history=[asdict(record) for record in history])
    archive.mark_checkpoint(round_index, relative_state)


# --- small helpers ---------------------------------------------------------------------------


def _train(config, train_config, model, splits, world, device, *, masks, seed, label):
    if not train_config.epochs:
        return []
    model = wrap_for_training(model, world, device)
    return train(model, splits.train, splits.validation, train_config, world=world, device=device, seed=seed,
                 batch_size=config.data.batch_size, eval_batch_size=config.data.eval_batch_size, masks=masks,
                 progress=config.progress, describe=label)


def _test_accuracy(config, model, splits, world, device) -> float:
    return evaluate(model, splits.test, world=world, device=device, batch_size=config.data.eval_batch_size)[1]


def _beside(archive_path: Path, relative: str) -> Path:
    return archive_path.parent / relative
