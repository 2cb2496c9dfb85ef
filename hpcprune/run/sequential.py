"""The block-sequential pipeline: a large transformer pruned one block at a time, never whole on a rank.

    hpcprune prune --config configs/llm_wanda.yaml                   # schedule.kind: sequential
    mpirun -n 4 hpcprune prune --config configs/llm_wanda.yaml       # windows shared out, same masks

skeleton (hpcprune.models.lazy: parameters on meta) -> plan (every Linear weight in the blocks) ->
archive created or reopened (hpcprune.run.sequential_archive) -> the rank's windows run up to the
first block (hpcprune.run.sequential_streams) -> for each block: load its weights; evaluation
windows through it dense; statistics, decisions, masks and next inputs (hpcprune.prune.sequential.
engine), or, for a block recorded before a kill, its recorded decisions replayed; evaluation windows
through it pruned; record it (rank 0); release it -> perplexity or embedding fidelity, dense and
pruned (hpcprune.run.sequential_eval) -> the round marked complete.

Threads per rank are `sequential.threads`, set before anything is computed. Preemption signals stop
the run before the next block (hpcprune.dist.signals); resume starts at the first unrecorded block
after running the recorded ones again to rebuild its inputs, and ends with the same bits.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from hpcprune.archive.blocks import round_tables
from hpcprune.archive.writer import Archive
from hpcprune.config import RunConfig
from hpcprune.dist.heap import return_free_heap
from hpcprune.dist.signals import stop_here
from hpcprune.dist.world import World
from hpcprune.models.block_calls import BlockRunner
from hpcprune.models.lazy import LazyModel
from hpcprune.progress import bar
from hpcprune.prune.plan import Plan
from hpcprune.prune.sequential.engine import BlockEngine, pass_stream
from hpcprune.prune.sequential.gram import limit_threads
from hpcprune.prune.sequential.layers import block_layers, sequential_plan
from hpcprune.prune.sequential.methods import LayerRule, block_method
from hpcprune.run.job import RunResult
from hpcprune.run.resume import holding_archive
from hpcprune.run.sequential_archive import (
    ROUND,
    SequentialPoint,
    finish_round,
    open_sequential_archive,
    record_block,
    recorded_decisions,
)
from hpcprune.run.sequential_eval import Evaluation, evaluate
from hpcprune.run.sequential_streams import (
    Streams,
    TextWindows,
    calibration_text,
    evaluation_text,
    first_block_inputs,
)
from hpcprune.train.finetune import resolve_device

log = logging.getLogger("hpcprune")


def run_sequential(config: RunConfig, world: World, *, resume: bool = False, force: bool = False) -> RunResult:
    torch.set_num_threads(config.sequential.threads)
    limit_threads(config.sequential.threads)  # the Hessians' syrk (scipy's OpenBLAS) as well
    device = resolve_device(config.device, local_rank=world.local_rank)
    lazy = LazyModel(config.model.name, config.model.blocks, device)
    plan = sequential_plan(lazy.blocks, lazy.blocks_path, config.prune)
    calibration, evaluation = calibration_text(config, lazy), evaluation_text(config, lazy)
    with holding_archive(world, Path(config.output.path)):  # rank 0 holds the archive from here to the end
        point = open_sequential_archive(config, world, lazy, plan, resume=resume, force=force)
        if point.complete is not None:  # resumed after the end: the recorded figures
            attrs = point.complete
            return _result(config, plan, int(attrs["kept"]), Evaluation(attrs["eval_metric"], attrs["eval_dense"],
                                                                         attrs["eval_pruned"]))
        log.info("%s: %d blocks at %s, %d prunable weights; %s %s to %.2f %%", config.model.name, len(lazy),
                 lazy.blocks_path, plan.total, config.prune.criterion, config.prune.rule, 100 * config.prune.sparsity)
        runner = BlockRunner(device)
        streams = first_block_inputs(config, lazy, world, calibration, evaluation, Path(point.states))
        _run_blocks(config, world, lazy, plan, streams, runner, point, calibration)

        started = time.perf_counter()
        figures = evaluate(lazy, streams.eval_dense, streams.eval_pruned,
                           len(evaluation) if evaluation is not None else 0, world, runner)
        streams.remove()
        kept = _finish(config, world, plan, figures, time.perf_counter() - started)
    log.info("%s: sparsity %.4f %%, %s dense %.4g, pruned %.4g", config.output.path, 100 * (1 - kept / plan.total),
             figures.metric, figures.dense, figures.pruned)
    return _result(config, plan, kept, figures)


def _run_blocks(config: RunConfig, world: World, lazy: LazyModel, plan: Plan, streams: Streams, runner: BlockRunner,
                point: SequentialPoint, calibration: TextWindows | None) -> None:
    """Every block in turn: pruned and recorded, or, recorded before, replayed from the archive."""
    engine = BlockEngine(block_method(config), LayerRule.of(config.prune), world, runner,
                         streams.calibration, len(calibration) if calibration is not None else 0,
                         config.sequential.propagate, calibration.group if calibration is not None else 1,
                         errors=config.sequential.errors)
    recorded = {row["block"]: row for row in point.recorded}
    path = Path(config.output.path)
    with bar(total=len(lazy), enabled=config.progress and world.is_root, description="blocks", unit="block") as progress:
        for index in range(len(lazy)):
            stop_here(world, path, f"before block {index}")  # a safe point: nothing of this block is done
            started = time.perf_counter()
            block = lazy.load_block(index)
            layers = block_layers(plan, block, lazy.block_name(index))
            if streams.eval_dense is not None:
                pass_stream(streams.eval_dense, block, runner)
            if index in recorded:
                engine.replay(block, layers, recorded_decisions(config, world, layers, recorded[index]))
            else:
                outcome = engine.prune(block, layers)
                if world.is_root:
                    record_block(config, index, layers, outcome.decisions, outcome.errors, time.perf_counter() - started)
            if streams.eval_pruned is not None:
                pass_stream(streams.eval_pruned, block, runner)
            lazy.release_block(index)
            return_free_heap()  # so the peak is one block's, not the blocks' done so far
            progress.update(1)
            log.info("block %d/%d %s in %.2f s", index + 1, len(lazy), "replayed" if index in recorded else "pruned",
                     time.perf_counter() - started)


def _finish(config: RunConfig, world: World, plan: Plan, figures: Evaluation, seconds_eval: float) -> int:
    """Rank 0 completes the round from its tables; every rank learns the kept count."""
    kept = 0
    if world.is_root:
        tables = round_tables(Archive.held(config.output.path).file, ROUND)
        kept = sum(int(row["kept"]) for row in tables["metrics"])
        finish_round(config, dict(
            achieved_sparsity=1.0 - kept / plan.total, kept=kept, eval_metric=figures.metric,
            eval_dense=figures.dense, eval_pruned=figures.pruned, blocks=len(tables["blocks"]),
            seconds_select=sum(row["seconds"] for row in tables["blocks"]), seconds_eval=seconds_eval,
            seconds_finetune=0.0), f"{len(tables['blocks'])} blocks, {kept} of {plan.total} weights kept")
    kept = int(world.allreduce_sum(np.array([kept], dtype=np.int64))[0])
    world.barrier()
    return kept


def _result(config: RunConfig, plan: Plan, kept: int, figures: Evaluation) -> RunResult:
    return RunResult(config.output.path, math.nan, math.nan, config.prune.sparsity, 1.0 - kept / plan.total, kept,
                     plan.total, None, eval_metric=figures.metric, eval_dense=figures.dense, eval_pruned=figures.pruned)
