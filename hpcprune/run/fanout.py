"""Selection fanned out: each shard group's selection runs as an independent task, in stages.

    hpcprune prune --config configs/oneshot_global.yaml --set fanout.backend=dask
    hpcprune prune --config configs/oneshot_global.yaml --set fanout.backend=slurm-array --set fanout.shards=4

The coordinator (rank 0 of the run, often its only rank) splits the plan's tensors into
`fanout.shards` shard groups exactly as it would split them over ranks, and runs the unchanged
selection code of each group as a task on a backend (a SLURM job array, dask workers). The run's
other ranks, if any, wait for the masks and then fine-tune with it as usual: `hpcprune submit
--tasks-per-node N` scores on job arrays and fine-tunes with DDP in the submitted job. The tasks never talk to each other:
each sees a `ReplayWorld` whose `allreduce_sum` of stage s writes the task's contribution (a
fixed-size array: histograms, counts) to a file and waits for the sum. The coordinator adds up the
contributions of every task in rank order (what an allreduce gives) as soon as all are there, and
stores the sum; the waiting tasks read it and go on. A task that gets through selection writes its
packed masks. The rule's arithmetic is the same code on the same shards, so the masks equal those of
any world, bit for bit, for every rule.

Tasks stay stateless all the same. One that waited `fanout.linger_s` in vain (the others had no slot
to run in) stops and is started again for the next stage, and one that was killed, failed or lost
its node is simply started again, alone: a started task first replays the stages already summed
from their files (checking that it contributes what it contributed before, so scores that are not
deterministic stop the run instead of corrupting it). Every file a task writes appears at once
(written aside, then renamed), so which files exist says which tasks answered which stage, and
finished work is never redone.

Files live in `<archive>.fanout/` (run.h5.fanout/), which every task must see (a shared filesystem); a round's
files are removed once its masks are collected, the backends' logs stay in `logs/`.
"""

from __future__ import annotations

import abc
import contextlib
import importlib
import json
import logging
import shutil
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from hpcprune import registry
from hpcprune.archive.atomic import write_atomically
from hpcprune.archive.side_files import fanout_folder
from hpcprune.config import FanoutConfig, RunConfig, load_config_text
from hpcprune.dist.failures import AgreedFailure
from hpcprune.dist.world import World
from hpcprune.errors import UsageError
from hpcprune.models.safetensors_stream import TensorSpec as StreamedTensor
from hpcprune.models.safetensors_stream import write_streamed
from hpcprune.models.weights import CheckpointWeights
from hpcprune.prune.mask_store import store_masks
from hpcprune.prune.plan import Plan
from hpcprune.prune.selection import Selection
from hpcprune.prune.step import select_weights
from hpcprune.run.fanout_files import (
    POLL_S,
    REFUSALS,
    RoundDescription,
    RoundFiles,
    previous_masks,
    write_masks,
)
from hpcprune.run.mask_traffic import share_masks

log = logging.getLogger("hpcprune")

MAX_STAGES = 32
"""More stages than any rule has (the global rule has 4): past it the tasks are not converging."""

Task = Callable[[str, int], str]  # (round folder, shard rank) -> what the task left behind


# --- a task: one shard's selection, replayed up to the first stage not yet reduced ---------------------


class StageReached(BaseException):
    """A task got to a collective whose sum is not known yet. A BaseException: no `except Exception`
    on the way up may mistake this stop for a failure of the selection."""

    def __init__(self, stage: int):
        super().__init__(f"stage {stage}")
        self.stage = stage


class ReplayWorld(World):
    """Rank `rank` of `size`, for one task: collectives are the sums stored in the round's files."""

    name = "replay"
    restarts_failed_ranks = True  # a task that fails is started again alone (run_stages)

    def __init__(self, files: RoundFiles, rank: int, size: int, linger_s: float = 0.0):
        self.files, self.rank, self.size, self.linger_s = files, rank, size, linger_s
        self.stage = 0

    def allreduce_sum(self, array: np.ndarray) -> np.ndarray:
        self.stage += 1
        part = self.files.part_path(self.stage, self.rank)
        if part.exists():  # this shard got here before (a replay): it must contribute the same again
            recorded = np.load(part)
            if recorded.dtype != array.dtype or not np.array_equal(recorded, array):
                raise RuntimeError(f"shard {self.rank}: its stage-{self.stage} contribution differs from the one "
                                   f"it recorded before: its scores are not deterministic")
        else:
            self.files.write_part(self.stage, self.rank, array)
        reduced = self.files.reduced(self.stage, wait_s=self.linger_s)
        if reduced is None:
            raise StageReached(self.stage)
        return reduced

    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        raise NotImplementedError("a replayed shard talks to the others only through allreduce_sum")

    def gather_bytes(self, data: bytes, root: int = 0) -> list[bytes] | None:
        raise NotImplementedError("a replayed shard talks to the others only through allreduce_sum")

    def barrier(self) -> None:
        raise NotImplementedError("a replayed shard talks to the others only through allreduce_sum")


@dataclass
class ShardJob:
    """What `select_weights` reads of a job, for one shard: weights on disk, no module, no data."""

    config: RunConfig
    world: World
    plan: Plan
    weights: CheckpointWeights
    masks: Mapping[str, np.ndarray]  # earlier masks of this shard's tensors
    model: None = None
    splits: None = None


# What a task's selection may refuse, as every rank would under MPI: the same refusal every time,
# so it ends the round instead of being started again. Ordered: the first kind found is raised.


def run_shard(folder: str, rank: int) -> str:
    """The task: select shard `rank` of the round in `folder` as far as the stored stages allow."""
    files = RoundFiles(folder)
    description = files.description()
    config = load_config_text(description.config, str(files.folder / "round.json")).model_copy(
        update={"progress": False})
    plan = description.plan()
    world = ReplayWorld(files, rank, description.shards, linger_s=description.linger_s)
    weights = CheckpointWeights(description.weights)
    weights.read_ahead([spec.name for spec in plan.local(rank)])
    shard = ShardJob(config, world, plan, weights, previous_masks(description.previous, plan.local(rank)))
    try:
        selection = select_weights(shard, description.target)
    except StageReached as reached:
        return str(reached)
    except tuple(REFUSALS.values()) as error:
        files.write_error(rank, error)
        return "refused"
    except AgreedFailure as failure:  # a refusal every shard learned of in a stage's sum
        files.write_error(rank, failure.cause or _refusal_elsewhere(failure))
        return "refused"
    files.write_result(rank, selection, plan.local(rank))
    return "masks"


def _refusal_elsewhere(failure: AgreedFailure) -> Exception:
    kind = UsageError if failure.exit_code == UsageError.exit_code else ValueError
    return kind(f"stopped: shard {failure.failed_rank} refused the selection")


# --- the coordinator: run every stage until each task wrote its masks ---------------------------------


def run_stages(backend: Backend, files: RoundFiles, *, shards: int, retries: int, task: Task = run_shard) -> None:
    """Start the tasks, sum each stage once every task answered it, and start again the tasks that
    stopped or failed before answering the stage in progress, until every task wrote its masks."""
    running: dict[int, Running] = {}
    try:
        _drive(backend, files, shards, retries, task, running)
    except BaseException:
        for job in running.values():  # a failed round leaves nothing running (nor holding a slot)
            job.cancel()
        raise


def _drive(backend: Backend, files: RoundFiles, shards: int, retries: int, task: Task,
           running: dict[int, Running]) -> None:
    failures: Counter[int] = Counter()
    stage = 1
    while True:
        files.raise_errors(shards)
        if all(files.answered(stage, rank) for rank in range(shards)):
            finished = [rank for rank in range(shards) if files.result_path(rank).exists()]
            if len(finished) == shards:
                return
            if finished:
                raise RuntimeError(f"{files.folder}: shards {finished} finished at stage {stage} while the "
                                   f"others reduce: their collectives do not line up")
            reduce_stage(files, stage, shards)
            stage += 1
            if stage > MAX_STAGES:
                raise RuntimeError(f"{files.folder}: the tasks still reduce after {MAX_STAGES} stages")
            continue
        for rank, job in list(running.items()):
            if job.done():
                del running[rank]
                failure = job.failure()
                if failure is not None:
                    failures[rank] += 1
                    log.warning("stage %d: shard %d failed (%d of %d attempts): %s", stage, rank, failures[rank],
                                retries + 1, failure)
                    if failures[rank] > retries:
                        raise RuntimeError(f"stage {stage}: shard {rank} failed {failures[rank]} time(s): {failure}")
        idle = [rank for rank in range(shards) if rank not in running and not files.answered(stage, rank)]
        if idle:
            running.update(zip(idle, backend.submit(task, str(files.folder), idle)))
        else:
            time.sleep(POLL_S)


def reduce_stage(files: RoundFiles, stage: int, shards: int) -> np.ndarray:
    """Sum the shards' contributions to `stage` in rank order and store the sum for the next run."""
    total = None
    for rank in range(shards):  # one part in memory at a time: each is a fixed-size count array
        part = np.load(files.part_path(stage, rank))
        if total is not None and (part.shape != total.shape or part.dtype != total.dtype):
            raise RuntimeError(f"stage {stage}: shard {rank} contributed {part.dtype}{list(part.shape)}, "
                               f"shard 0 {total.dtype}{list(total.shape)}")
        total = part.copy() if total is None else total + part
    write_atomically(files.reduced_path(stage), lambda file: np.save(file, total))
    return total


def collect(files: RoundFiles) -> Selection:
    """Every task's masks as one Selection over all tensors, as a world of one would have selected;
    read from the tasks' files in plan order, one mask at a time, and kept as a selection keeps them."""
    description = files.description()
    plan = description.plan()
    with contextlib.ExitStack() as stack:
        results = [stack.enter_context(files.result(rank)) for rank in range(description.shards)]
        agreed = {(facts["kept"], repr(facts["threshold"])) for facts, _ in results}
        if len(agreed) != 1:
            raise RuntimeError(f"{files.folder}: the shards disagree on the kept count and threshold: {agreed}")
        in_plan_order = (next(results[owner][1]) for owner in plan.owners)
        masks = store_masks(plan.tensors, in_plan_order)
    facts = results[0][0]
    return Selection(masks=masks, threshold=facts["threshold"], kept=int(facts["kept"]), total=plan.total,
                     shapes={spec.name: spec.shape for spec in plan.tensors})


# --- backends: where the tasks run --------------------------------------------------------------------


class Running(Protocol):
    """A task a backend started."""

    def done(self) -> bool:
        """Whether it ended, one way or another (cheap: called every poll)."""

    def failure(self) -> str | None:
        """Once done: None if it returned, else one line saying what went wrong."""

    def cancel(self) -> None:
        """Stop it if it still runs (the round failed)."""


@dataclass
class Ended:
    """A task that ran to its end before `submit` returned."""

    failure_line: str | None = None

    def done(self) -> bool:
        return True

    def failure(self) -> str | None:
        return self.failure_line

    def cancel(self) -> None:
        pass


class Backend(abc.ABC):
    """Starts tasks somewhere: the one hook of a backend is `submit`."""

    side_by_side: bool = True
    """Whether the tasks of one submit run at the same time, so a task may wait for the others' sums."""

    @abc.abstractmethod
    def submit(self, task: Task, folder: str, ranks: list[int]) -> list[Running]:
        """Start task(folder, rank) for every rank (as one batch: one job array) and return at once.

        Failures are not raised: the coordinator reads the answers from the round's files and
        starts again the tasks that ended without one.
        """

    def close(self) -> None:
        """Release what the backend started (workers, clusters)."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class InlineBackend(Backend):
    """The tasks one after another in this process: the staged protocol without a cluster (debugging)."""

    side_by_side = False

    def __init__(self, config: FanoutConfig, logs: Path):
        pass

    def submit(self, task: Task, folder: str, ranks: list[int]) -> list[Running]:
        ended = []
        for rank in ranks:
            try:
                task(folder, rank)
                ended.append(Ended())
            except Exception as error:  # noqa: BLE001  (reported, and the task is started again)
                ended.append(Ended(f"{type(error).__name__}: {error}"))
        return ended


def open_backend(config: FanoutConfig, logs: Path) -> Backend:
    module, _, attribute = registry.FANOUT_BACKENDS[config.backend][0].partition(":")
    return getattr(importlib.import_module(module), attribute)(config, logs)


# --- the pipeline's entry point -----------------------------------------------------------------------


def select_fanned_out(job, round_index: int, target: float) -> Selection:
    """This round's selection, fanned out by rank 0 to `fanout.shards` tasks on `fanout.backend` (see
    the top). Every rank gets every tensor's mask, each broadcast once from rank 0, so the ranks of a
    run that fine-tunes (`hpcprune submit --tasks-per-node N`) go on to train together."""
    world = job.world
    if world.size > 1 and job.model is None:
        raise UsageError(f"fanout.backend={job.config.fanout.backend} under {world.size} ranks: a masks-only run "
                         f"has nothing to train, run its coordinator as one process")
    selection = _fan_out(job, round_index, target) if world.is_root else None
    if world.size == 1:
        return selection
    facts = json.dumps([selection.kept, selection.threshold]).encode() if world.is_root else None
    kept, threshold = json.loads(world.broadcast_bytes(facts))
    masks = share_masks(selection.masks if world.is_root else {}, job.plan, world, holder=lambda spec, owner: 0)
    return Selection(masks=masks, threshold=threshold, kept=kept, total=job.plan.total,
                     shapes={spec.name: spec.shape for spec in job.plan.tensors})


def _fan_out(job, round_index: int, target: float) -> Selection:
    config = job.config
    files = RoundFiles(fanout_folder(job.path) / f"round-{round_index:04d}")
    shutil.rmtree(files.folder, ignore_errors=True)  # a round is fanned out whole, never half reused
    with open_backend(config.fanout, fanout_folder(job.path) / "logs") as backend:
        linger_s = config.fanout.linger_s if backend.side_by_side else 0.0
        files.describe(_describe_round(job, files.folder, target, linger_s))
        run_stages(backend, files, shards=config.fanout.shards, retries=config.fanout.retries)
    selection = collect(files)
    shutil.rmtree(files.folder)
    with contextlib.suppress(OSError):  # only when no backend left logs in it
        files.folder.parent.rmdir()
    return selection


def _describe_round(job, folder: Path, target: float, linger_s: float) -> RoundDescription:
    """The round for the tasks; a model in memory first leaves its prunable tensors (and masks) on
    disk, one tensor at a time."""
    config = job.config
    if job.model is None:
        weights = str(Path(config.model.checkpoint).resolve())
    else:
        weights = str(folder / "weights.safetensors")
        tensors = [job.weights.get(spec.name) for spec in job.plan.tensors]  # views of the parameters, no copies
        specs = [StreamedTensor(spec.name, tensor.dtype, tuple(tensor.shape)) for spec, tensor in zip(job.plan.tensors, tensors)]
        del tensors
        write_streamed(weights, specs, lambda streamed: job.weights.get(streamed.name), metadata={"format": "pt"})
    previous = None
    if job.masks:
        previous = str(folder / "previous.masks")
        specs = [spec for spec in job.plan.tensors if spec.name in job.masks]
        write_atomically(Path(previous), lambda file: write_masks(file, job.masks, specs))
    return RoundDescription(config=config.to_yaml(), target=target, shards=config.fanout.shards,
                            tensors=[(spec.name, spec.shape) for spec in job.plan.tensors], weights=weights,
                            previous=previous, linger_s=linger_s)
