"""Selection fanned out in stages (hpcprune.run.fanout): inline, on a real local SLURM job array, on dask.

Every fanned-out run is compared bit for bit with the same config selected in one process, and the
SLURM array's with an `mpirun -n 2` run too (tests/test_distributed.py shows one process equal to
mpirun and torchrun worlds of every size).
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpcprune import registry
from hpcprune.config import FanoutConfig, load_config
from hpcprune.dist.world import SingleWorld
from hpcprune.errors import UsageError
from hpcprune.models.builders import save_checkpoint
from hpcprune.models.weights import CheckpointWeights
from hpcprune.prune.plan import make_plan
from hpcprune.prune.rules import select
from hpcprune.prune.scoring import CRITERIA, LazyScores, ScoreContext
from hpcprune.run.fanout import (
    InlineBackend,
    ReplayWorld,
    StageReached,
    collect,
    reduce_stage,
    run_shard,
    run_stages,
)
from hpcprune.run.fanout_files import RoundDescription, RoundFiles
from hpcprune.run.pipeline import run
from tests.conftest import require_module
from tests.fanout_tasks import killed_once, raises_once
from tests.fixture_models import tied_mlp
from tests.helpers import CONFIGS, ROOT, assert_same_masks, driver, launch, run_cli

REFERENCE = CONFIGS / "oneshot_global.yaml"
TIED = "model.name=tests.fixture_models:tied_mlp"
CASES = {  # name -> overrides of oneshot_global.yaml
    "global": [],
    "tied-global": [TIED],
    "tied-layer": [TIED, "prune.rule=layer"],
    "relative-threshold": ["prune.criterion=relative", "prune.rule=threshold", "prune.threshold=0.002"],
    "random-global": ["prune.criterion=random"],
    "excluded": ["prune.exclude=[conv1.weight, fc3.weight]", "prune.sparsity=0.9"],
    "iterative": ["schedule.kind=iterative", "schedule.rounds=2"],  # round 2 scores earlier masks as -inf
    "tied-row": [TIED, "prune.rule=row"],
    "tied-nm": [TIED, "prune.rule=nm", "prune.sparsity=0.5"],
    "min-density": ["prune.min_density=0.15"],
}


def single_process_run(out: Path, name: str, *extra: str) -> Path:
    path = out / f"{name}.h5"
    run(load_config(REFERENCE, [*CASES[name], *extra, f"output.path={path}", "progress=false"]), SingleWorld(),
        force=True)
    return path


def fanned_out_runs(out: Path, names: list[str], *fanout: str, timeout: float = 600) -> None:
    """The CLI's pipeline in a fresh process (tests.drivers), each case with the `fanout` overrides."""
    cases = [f"{name}:" + ";".join([*CASES[name], *fanout]) for name in names]
    finished = subprocess.run(driver("masks", str(out), *cases), cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert finished.returncode == 0, finished.stderr[-3000:]


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    for name in CASES:
        single_process_run(out, name)
    return out


# --- the stage protocol, without a cluster ---------------------------------------------------------------


def test_replay_world_answers_from_stored_sums_then_stops_at_the_first_missing_one(tmp_path):
    files = RoundFiles(tmp_path)
    first, second = np.arange(5, dtype=np.int64), np.array([7, 1], dtype=np.int64)
    files.write_part(1, 1, first)
    np.save(files.reduced_path(1), first * 3)
    world = ReplayWorld(files, rank=1, size=3)

    assert np.array_equal(world.allreduce_sum(first), first * 3)
    with pytest.raises(StageReached) as reached:
        world.allreduce_sum(second)
    assert reached.value.stage == 2
    assert np.array_equal(np.load(files.part_path(2, 1)), second)
    assert files.answered(2, 1) and not files.answered(2, 0)


def test_replay_world_refuses_a_contribution_that_changed(tmp_path):
    files = RoundFiles(tmp_path)
    files.write_part(1, 0, np.array([1, 2], dtype=np.int64))
    np.save(files.reduced_path(1), np.array([3, 4], dtype=np.int64))
    with pytest.raises(RuntimeError, match="not deterministic"):
        ReplayWorld(files, rank=0, size=2).allreduce_sum(np.array([1, 3], dtype=np.int64))


def test_a_waiting_task_goes_on_with_a_sum_stored_while_it_waits(tmp_path):
    files = RoundFiles(tmp_path)
    contribution = np.array([2, 5], dtype=np.int64)
    files.reduced_path(1).parent.mkdir(parents=True)

    def store_sum() -> None:  # as the coordinator does: written aside, then renamed
        np.save(tmp_path / "sum.npy", contribution * 2)
        os.replace(tmp_path / "sum.npy", files.reduced_path(1))

    later = threading.Timer(0.3, store_sum)
    later.start()
    try:
        assert np.array_equal(ReplayWorld(files, rank=0, size=2, linger_s=60).allreduce_sum(contribution),
                              contribution * 2)
    finally:
        later.cancel()
    assert np.array_equal(np.load(files.part_path(1, 0)), contribution), "it wrote its part before waiting"


def test_reduce_stage_gives_what_an_allreduce_gives(tmp_path):
    files = RoundFiles(tmp_path)
    parts = [np.random.default_rng(rank).integers(0, 1 << 40, size=65537, dtype=np.int64) for rank in range(4)]
    for rank, part in enumerate(parts):
        files.write_part(3, rank, part)
    reduced = reduce_stage(files, 3, 4)
    assert reduced.dtype == np.int64 and np.array_equal(reduced, np.sum(parts, axis=0))
    assert np.array_equal(files.reduced(3), reduced)

    files.write_part(4, 0, parts[0])
    files.write_part(4, 1, parts[1][:10])
    with pytest.raises(RuntimeError, match="shard 1 contributed"):
        reduce_stage(files, 4, 2)


def test_inline_fanout_gives_the_single_process_masks_for_every_rule(references, tmp_path):
    for name in CASES:
        mine = single_process_run(tmp_path, name, "fanout.backend=inline", "fanout.shards=3")
        assert_same_masks(mine, references / f"{name}.h5")
        assert not (tmp_path / f"{name}.h5.fanout").exists(), "a collected round leaves no files behind"
    # More shards than the tied model has tensors: the shards without one still take part in every sum.
    mine = single_process_run(tmp_path / "many", "tied-global", "fanout.backend=inline", "fanout.shards=7")
    assert_same_masks(mine, references / "tied-global.h5")


def test_nan_scores_end_the_round_naming_the_shard_and_the_cause(tmp_path, monkeypatch):
    monkeypatch.setitem(CRITERIA, "nan", lambda spec, weight, context, out=None: weight.detach() * np.float32("nan"))
    monkeypatch.setitem(registry.CRITERIA, "weight", (*registry.CRITERIA["weight"], "nan"))
    with pytest.raises(ValueError, match=r"shard \d: scores\['.*'\] contain NaN"):
        single_process_run(tmp_path, "global", "prune.criterion=nan", "fanout.backend=inline", "fanout.shards=2")


@pytest.mark.parametrize("overrides, message", [
    (["fanout.backend=nope"], "fanout.backend: unknown backend 'nope'"),
    (["prune.criterion=wanda"], "criterion 'wanda' needs calibration data"),
    (["prune.granularity=channel", "prune.criterion=l1"], "selects single weights"),
    (["fanout.backend=dask", "fanout.dask.cluster=slurm"], "needs fanout.slurm.mem_gb"),
    (["schedule.kind=gradual", "finetune.epochs=1"], "gradual selects again and again"),
])
def test_configs_the_tasks_cannot_run_are_refused_naming_the_key(overrides, message):
    with pytest.raises(UsageError, match=message):
        load_config(REFERENCE, ["fanout.backend=inline", *overrides])


# --- a round set up by hand: the tied model as a checkpoint, split into shards ----------------------------


def tied_round(folder: Path, shards: int, rule: str = "global", sparsity: float = 0.8, linger_s: float = 0.0):
    """A round description for the tied model, and the masks one process selects for it."""
    checkpoint = folder / "tied.safetensors"
    save_checkpoint(tied_mlp(), checkpoint)
    weights = CheckpointWeights(checkpoint)
    single = make_plan(weights.prunable(), load_config(None).prune, 1)
    reference = select(rule, LazyScores("magnitude", single.local(0), weights, ScoreContext(0)), single,
                       SingleWorld(), sparsity=sparsity)
    config = load_config(None, ["prune.criterion=magnitude", f"prune.rule={rule}"])
    files = RoundFiles(folder / "round")
    files.describe(RoundDescription(config.to_yaml(), sparsity, shards, weights.prunable(), str(checkpoint),
                                    linger_s=linger_s))
    return files, reference


def assert_same_selection(files: RoundFiles, reference) -> None:
    selection = collect(files)
    assert (selection.kept, selection.threshold) == (reference.kept, reference.threshold)
    assert list(selection.masks) == list(reference.masks)
    for name, mask in reference.masks.items():
        assert np.array_equal(selection.masks[name], mask), name


def calls_of(folder: Path) -> Counter:
    return Counter(tuple(int(part) for part in path.name.split("-")[:2]) for path in (folder / "calls").iterdir())


def expected_calls(files: RoundFiles, shards: int, again: tuple[int, int]) -> Counter:
    """One call per shard and stage (the reduced stages, then the one that writes masks), plus `again`."""
    stages = len(list(files.folder.glob("stage-*/reduced.npy"))) + 1
    return Counter({(rank, stage): 1 for rank in range(shards) for stage in range(1, stages + 1)}) + Counter([again])


def test_a_failed_task_is_run_again_alone(tmp_path):
    files, reference = tied_round(tmp_path, shards=3)
    run_stages(InlineBackend(FanoutConfig(), tmp_path), files, shards=3, retries=1, task=raises_once)
    assert_same_selection(files, reference)
    assert reference.threshold is not None and len(list(files.folder.glob("stage-*"))) == 4
    assert calls_of(tmp_path) == expected_calls(files, 3, again=(1, 2))


def test_a_task_that_keeps_failing_ends_the_round_naming_it(tmp_path):
    files, _ = tied_round(tmp_path, shards=2)

    def always_lost(folder: str, rank: int) -> str:
        if rank == 1:
            raise RuntimeError("node lost")
        return run_shard(folder, rank)

    with pytest.raises(RuntimeError, match=r"stage 1: shard 1 failed 3 time\(s\): RuntimeError: node lost"):
        run_stages(InlineBackend(FanoutConfig(), tmp_path), files, shards=2, retries=2, task=always_lost)


# --- a real SLURM job array (submitit) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm(local_slurm, submitit) -> None:
    """The project's local SLURM (tests/slurm_fixtures.py), and submitit to submit to it (tests/conftest.py)."""


@pytest.fixture(scope="module")
def mpirun_masks(mpirun, tmp_path_factory) -> Path:
    """The MPI path: the same cases under `mpirun -n 2`, selection in a world of two ranks."""
    out = tmp_path_factory.mktemp("mpirun")
    cases = [f"{name}:" + ";".join(CASES[name]) for name in ("global", "tied-layer")]
    finished = launch([mpirun, "-n", "2", *driver("masks", str(out), *cases)], timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    with h5py.File(out / "global.h5", "r") as stored:
        assert (int(stored.attrs["world_size"]), stored.attrs["backend"]) == (2, "mpi")
    return out


def test_slurm_array_masks_equal_the_mpi_and_single_process_masks(slurm, mpirun_masks, references, tmp_path):
    names = ["global", "tied-layer"]
    fanned_out_runs(tmp_path, names, "fanout.backend=slurm-array", "fanout.shards=2")
    for name in names:
        assert_same_masks(tmp_path / f"{name}.h5", mpirun_masks / f"{name}.h5")
        assert_same_masks(tmp_path / f"{name}.h5", references / f"{name}.h5")
        logs = list((tmp_path / f"{name}.h5.fanout" / "logs").iterdir())
        assert any("_" in log.name for log in logs), "the tasks ran as array jobs"


def test_an_array_sbatch_refuses_ends_the_run_with_one_line(slurm, tmp_path):
    done = run_cli("prune", "--config", str(REFERENCE), "--out", str(tmp_path / "refused.h5"),
                   "--set", "fanout.backend=slurm-array", "--set", "fanout.slurm.partition=no-such-partition")
    assert done.returncode == 2, done.stderr
    assert "hpcprune: error: fanout.backend slurm-array: sbatch refused the array" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_killed_array_task_is_run_again_alone(slurm, tmp_path, monkeypatch):
    from hpcprune.run.slurm_array import SlurmArray

    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the array tasks import tests.fanout_tasks
    # Shard 0 waits for the sums long enough for shard 1 to be found dead and started again.
    files, reference = tied_round(tmp_path, shards=2, linger_s=600)
    backend = SlurmArray(FanoutConfig(backend="slurm-array", shards=2), tmp_path / "logs")
    run_stages(backend, files, shards=2, retries=2, task=killed_once)
    assert (tmp_path / "killed").exists()
    assert_same_selection(files, reference)
    calls = calls_of(tmp_path)
    # Shard 0 ran once, through every stage, waiting for the sums; shard 1 was started again,
    # alone, at the stage it died in: the summed stage 1 was replayed from its files, not redone.
    assert sorted(rank for rank, _ in calls.elements()) == [0, 1, 1]
    assert max(stage for rank, stage in calls if rank == 1) >= 2
    assert len(list(files.folder.glob("stage-*/reduced.npy"))) == 4


def test_submit_scores_on_a_job_array_then_its_ranks_fine_tune_together(slurm, references, tmp_path):
    archive = tmp_path / "submitted.h5"
    done = run_cli("submit", "--config", str(REFERENCE), "--out", str(archive), "--tasks-per-node", "2",
                   "--cluster", "slurm", "--time", "10", "--wait", "--set", "fanout.backend=slurm-array",
                   "--set", "fanout.shards=2", "--set", "finetune.epochs=1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert_same_masks(archive, references / "global.h5")  # selected before fine-tuning: the same masks
    with h5py.File(archive, "r") as stored:
        assert int(stored.attrs["world_size"]) == 2, "the submitted job's two tasks are the ranks"
        assert len(stored["rounds/0001/history"]) == 1, "they fine-tuned the masked model for the one epoch"
    assert any("_" in log.name for log in (tmp_path / "submitted.h5.fanout" / "logs").iterdir()), "scored as an array"


# --- dask -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dask_distributed() -> None:
    require_module("distributed", "dask.distributed", "pip install -e '.[dask]'")


def test_dask_local_cluster_masks_equal_the_single_process_masks(dask_distributed, references, tmp_path):
    fanned_out_runs(tmp_path, ["global"], "fanout.backend=dask", "fanout.dask.workers=2", "fanout.shards=3")
    assert_same_masks(tmp_path / "global.h5", references / "global.h5")


def test_a_scheduler_address_where_nothing_answers_ends_the_run_with_one_line(dask_distributed, tmp_path):
    done = run_cli("prune", "--config", str(REFERENCE), "--out", str(tmp_path / "nobody.h5"),
                   "--set", "fanout.backend=dask", "--set", "fanout.dask.address=tcp://127.0.0.1:9",
                   env={"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"})
    assert done.returncode == 2, done.stderr
    assert "hpcprune: error: fanout.dask.address tcp://127.0.0.1:9: no dask scheduler answers" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def dask_scheduler(dask_distributed) -> str:
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=2, processes=True, dashboard_address=":0") as cluster:
        yield cluster.scheduler_address


def test_dask_scheduler_address_masks_equal_the_single_process_masks(dask_scheduler, references, tmp_path):
    names = ["tied-global", "tied-layer"]
    fanned_out_runs(tmp_path, names, "fanout.backend=dask", f"fanout.dask.address={dask_scheduler}",
                    "fanout.shards=3")
    for name in names:
        assert_same_masks(tmp_path / f"{name}.h5", references / f"{name}.h5")


def test_dask_jobqueue_slurm_workers_give_the_same_masks(dask_distributed, local_slurm, references, tmp_path):
    require_module("dask_jobqueue", "dask-jobqueue", "pip install -e '.[dask]'")
    fanned_out_runs(tmp_path, ["global"], "fanout.backend=dask", "fanout.dask.cluster=slurm", "fanout.slurm.mem_gb=1",
                    "fanout.dask.workers=2", "fanout.shards=2")
    assert_same_masks(tmp_path / "global.h5", references / "global.h5")
    assert list((tmp_path / "global.h5.fanout" / "logs").glob("hpcprune-dask-*.err")), "the workers ran as SLURM jobs"
