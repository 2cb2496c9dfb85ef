"""The whole run, step by step: what `hpcprune prune` does.

    hpcprune prune --config configs/quickstart.yaml --out runs/quickstart.h5

config -> world -> model (+ dense training or checkpoint) -> plan -> for each round of the schedule:
score -> select -> mask -> fine-tune -> record (hpcprune.run.rounds). Every rank runs this same
function (SPMD); only rank 0 touches the archive (hpcprune.run.resume creates or reopens it), and
what it reads from it reaches the other ranks through the World.

With `model.name: checkpoint` there is no module and no training: the weights are read from a
safetensors file tensor by tensor, and a round is score -> select -> record. With
`schedule.kind: sequential` a Hugging Face model is pruned one block at a time (hpcprune.run.sequential).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from hpcprune import registry
from hpcprune.archive.writer import Archive
from hpcprune.config import CHECKPOINT_MODEL, RunConfig
from hpcprune.dist.ddp import refuse_shared_gpus
from hpcprune.dist.failures import agreed
from hpcprune.dist.signals import stop_here
from hpcprune.dist.world import World
from hpcprune.errors import UsageError
from hpcprune.models.builders import build_model, check_takes_input, load_checkpoint
from hpcprune.models.data import load_data
from hpcprune.models.hf import is_hf_model
from hpcprune.models.weights import CheckpointWeights, ModelWeights
from hpcprune.prune.channels import ChannelPruning
from hpcprune.prune.plan import make_plan
from hpcprune.prune.schedule import round_targets
from hpcprune.prune.selection import keeps_nothing, sparsity_keeps_nothing
from hpcprune.run.job import Job, RunResult
from hpcprune.run.resume import holding_archive, open_run_archive, resume_masks
from hpcprune.run.rounds import dense_model, kept_on_rank, prune_round
from hpcprune.run.sequential import run_sequential
from hpcprune.train.checkpoint import SavedTraining
from hpcprune.train.exact_steps import running_statistics_problem
from hpcprune.train.finetune import evaluate, resolve_device


def run(config: RunConfig, world: World, *, resume: bool = False, force: bool = False) -> RunResult:
    if config.schedule.kind == registry.SEQUENTIAL:  # large transformers, block by block
        return run_sequential(config, world, resume=resume, force=force)
    # Every rank reads the user's files (data, model code, checkpoint) itself: a refusal on any rank
    # is raised on all of them, before anything is written (hpcprune.dist.failures).
    job = agreed(world, lambda: _job(config, world))
    refuse_shared_gpus(world, job.device)
    with holding_archive(world, job.path):  # rank 0 holds the archive's lock from here to the end of the run
        point = open_run_archive(job, resume=resume, force=force)
        job.saved_training = SavedTraining(**point.training) if point.training else None
        dense_accuracy = dense_model(job, point) if job.model is not None else math.nan
        job.masks = resume_masks(job, point)

        targets = round_targets(config.schedule, config.prune.sparsity)
        accuracy = dense_accuracy
        for round_index in range(point.last_round + 1, len(targets) + 1):
            stop_here(world, job.path, f"before round {round_index}")  # a safe point (hpcprune.dist.signals)
            accuracy = prune_round(job, round_index, len(targets), targets[round_index - 1])
        if point.last_round == len(targets) and job.model is not None:
            accuracy = evaluate(job.model, job.splits.test, world=world, device=job.device,
                                batch_size=config.data.eval_batch_size)[1]

        kept = int(world.allreduce_sum(np.array([kept_on_rank(job)], dtype=np.int64))[0])
        if world.is_root:
            Archive.at(job.path).record_event("finish", f"{len(targets)} round(s), {kept} of {job.plan.total} weights kept")
        world.barrier()
    return RunResult(str(job.path), dense_accuracy, accuracy, config.prune.sparsity,
                     1.0 - kept / job.plan.total, kept, job.plan.total, job.model,
                     "channels" if job.channels is not None else "weights")


def _job(config: RunConfig, world: World) -> Job:
    job = _checkpoint_job(config, world) if config.model.name == CHECKPOINT_MODEL else _model_job(config, world)
    target = max(round_targets(config.schedule, config.prune.sparsity))
    if job.channels is None and keeps_nothing(config.prune.rule, target, job.plan, config.prune.min_density):
        raise sparsity_keeps_nothing(config.prune.rule, target, job.plan.total)
    return job


def _model_job(config: RunConfig, world: World) -> Job:
    device = resolve_device(config.device, local_rank=world.local_rank)
    if device.type == "cuda":  # this rank's GPU, before anything (NCCL, RNG, the model) touches one
        torch.cuda.set_device(device)
    torch.manual_seed(config.seed)
    splits = None if is_hf_model(config.model.name) else load_data(config.data, config.seed)  # text: no images
    shape = {} if splits is None else dict(in_channels=splits.input_shape[0], num_classes=splits.num_classes)
    model = build_model(config.model, **shape)
    plan = make_plan(model, config.prune, world.size)
    if splits is not None:  # a model that cannot take the images is refused now, not deep in training
        check_takes_input(model, config.model.name, splits.input_shape, splits.num_classes)
    if config.model.checkpoint:  # before the archive exists, so a bad checkpoint leaves nothing behind
        load_checkpoint(model, config.model.checkpoint)
    for key, training in (("pretrain.step_batches", config.pretrain), ("finetune.step_batches", config.finetune)):
        problem = training.step_batches and running_statistics_problem(model, world.size, key)
        if problem:  # before the archive exists
            raise UsageError(problem)
    model.to(device)
    channels = ChannelPruning(model, plan, config.prune) if config.prune.granularity == "channel" else None
    return Job(config, world, Path(config.output.path), device, plan, ModelWeights(model), model, splits,
               channels=channels)


def _checkpoint_job(config: RunConfig, world: World) -> Job:
    weights = CheckpointWeights(config.model.checkpoint)
    plan = make_plan(weights.prunable(), config.prune, world.size)
    weights.read_ahead([spec.name for spec in plan.local(world.rank)])  # selection's passes, in order
    return Job(config, world, Path(config.output.path), torch.device("cpu"), plan, weights)
