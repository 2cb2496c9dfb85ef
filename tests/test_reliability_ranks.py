"""No hangs: a rank that dies or fails while the others wait in a collective ends the whole run.

The kill is a real SIGKILL (no exception, no MPI_Abort from the dying rank) delivered by
`tests.crash_points` as rank 1 enters an allreduce, or sends a mask, that rank 0 is already waiting for;
the failures are exceptions raised on rank 1 alone by the same driver (a MemoryError in selection)
or met by it alone (a checkpoint cut inside its tensors). Each launch must end on its own, well
inside the 60 seconds a stuck allocation would be noticed in; the subprocess timeout is that bound,
so a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hpcprune.config import ModelConfig, load_config
from hpcprune.models.builders import build_model, save_checkpoint
from hpcprune.models.weights import CheckpointWeights
from hpcprune.prune.plan import make_plan
from tests.helpers import CONFIGS, launch, torchrun

ENV = {"HPCPRUNE_TEST_KILL_RANK": "1"}  # on top of tests.helpers.MPI_ENV
HANG_LIMIT = 60


def killed_run(launcher: list[str], point: str, out) -> subprocess.CompletedProcess:
    command = [*launcher, sys.executable, "-m", "tests.crash_points", "prune", "--config", str(CONFIGS / "oneshot_global.yaml"),
               "--out", str(out), "-q"]
    try:
        return launch(command, timeout=HANG_LIMIT, env={**ENV, "HPCPRUNE_TEST_KILL": point})
    except subprocess.TimeoutExpired:
        pytest.fail(f"{point}: the run was still running {HANG_LIMIT} s after rank 1 was killed")


@pytest.mark.parametrize("point", ["allreduce:2", "send:1"])
def test_a_rank_killed_in_a_collective_ends_mpirun(mpirun, tmp_path, point):
    finished = killed_run([mpirun, "-n", "2"], point, tmp_path / "run.h5")
    assert finished.returncode != 0
    output = finished.stdout + finished.stderr
    assert re.search(r"rank 1 .*(signal 9|Killed)", output), output


@pytest.mark.parametrize("point", ["allreduce:2", "send:1"])
def test_a_rank_killed_in_a_collective_ends_torchrun(tmp_path, point):
    finished = killed_run(torchrun(2, "--no-python"), point, tmp_path / "run.h5")
    assert finished.returncode != 0
    output = finished.stdout + finished.stderr
    assert re.search(r"rank\s*:\s*1 .*\n.*exitcode\s*:\s*-9", output), output


def test_a_rank_killed_mid_training_is_named_by_mpirun(mpirun, tmp_path):
    """During DDP the survivor learns of the death from gloo first ("connection reset"); it must leave
    the report to the launcher, which knows which rank died and how, instead of aborting in its name."""
    command = [mpirun, "-n", "2", sys.executable, "-m", "tests.crash_points", "prune", "--config",
               str(CONFIGS / "smoke.yaml"), "--out", str(tmp_path / "run.h5"), "-q", "--set", "progress=false"]
    try:
        finished = launch(command, timeout=HANG_LIMIT, env={**ENV, "HPCPRUNE_TEST_KILL": "batch:5"})
    except subprocess.TimeoutExpired:
        pytest.fail(f"the run was still running {HANG_LIMIT} s after rank 1 was killed mid-training")
    assert finished.returncode != 0
    output = finished.stdout + finished.stderr
    assert re.search(r"rank 1 .*(signal 9|Killed)", output), output
    assert "Traceback" not in output  # the survivor says it stops, once, without a second story


# --- an exception on one rank: every rank ends, the failing rank's message once -----------------------

LAUNCHERS = {
    "mpirun": lambda mpirun: [mpirun, "-n", "2"],
    "torchrun": lambda mpirun: torchrun(2, "--no-python"),
}


def truncated_inside_rank_1s_tensors(folder: Path) -> Path:
    """LeNet-5 weights cut inside a tensor that rank 1 of 2 scores: every byte rank 0 reads is there."""
    torch.manual_seed(0)
    whole, cut = folder / "lenet5.safetensors", folder / "cut.safetensors"
    save_checkpoint(build_model(ModelConfig(name="lenet5")), whole)
    weights = CheckpointWeights(whole)
    plan = make_plan(weights.prunable(), load_config(CONFIGS / "oneshot_global.yaml").prune, 2)
    offsets = {name: weights._offsets[name] for name in weights.shapes}
    last = max(offsets, key=lambda name: offsets[name][1])
    assert last in {spec.name for spec in plan.local(1)}, "the file's last tensor must be rank 1's"
    start, end = offsets[last]
    cut.write_bytes(whole.read_bytes()[: weights._data_start + (start + end) // 2])
    return cut


FAULTS = {
    # name: (prune arguments, environment, the failing rank's message)
    "MemoryError in the first selection pass": ((), {"HPCPRUNE_TEST_RAISE": "select:1:MemoryError"},
                                                "MemoryError: injected at select:1 on rank 1"),
    "MemoryError in a later selection pass": ((), {"HPCPRUNE_TEST_RAISE": "select:2:MemoryError"},
                                              "MemoryError: injected at select:2 on rank 1"),
    "checkpoint truncated inside rank 1's tensors": (("--set", "model.name=checkpoint", "--set", "model.checkpoint={cut}"),
                                                     {}, "is truncated"),
}


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("fault", FAULTS)
def test_an_exception_on_one_rank_ends_every_rank_and_is_reported_once(mpirun, mpi4py, tmp_path, launcher, fault):
    args, env, message = FAULTS[fault]
    args = [arg.format(cut=truncated_inside_rank_1s_tensors(tmp_path)) for arg in args]
    command = [*LAUNCHERS[launcher](mpirun), sys.executable, "-m", "tests.crash_points", "prune", "--config",
               str(CONFIGS / "oneshot_global.yaml"), "--out", str(tmp_path / "run.h5"), "-q", *args]
    try:
        finished = launch(command, timeout=HANG_LIMIT, env={"HPCPRUNE_TEST_RAISE_RANK": "1", **env})
    except subprocess.TimeoutExpired:
        pytest.fail(f"{fault}: a rank was still running {HANG_LIMIT} s after rank 1 failed")
    assert finished.returncode != 0
    output = finished.stdout + finished.stderr
    assert output.count(message) == 1, output


# --- torch.distributed failures say what happened ---------------------------------------------------


def torchrun_with(out: Path, env: dict[str, str]) -> str:
    command = [*torchrun(2, "--no-python"), sys.executable, "-m", "tests.crash_points", "prune", "--config",
               str(CONFIGS / "oneshot_global.yaml"), "--out", str(out), "-q"]
    try:
        finished = launch(command, timeout=HANG_LIMIT, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the run was still running {HANG_LIMIT} s later")
    assert finished.returncode != 0
    return finished.stdout + finished.stderr


def test_a_collective_that_times_out_says_so(tmp_path):
    """Rank 1 hangs for 12 s before an allreduce; rank 0 waits the 5 s timeout and says that it timed
    out, not that another rank is gone (rank 1, once it wakes, does find rank 0 gone)."""
    output = torchrun_with(tmp_path / "run.h5", {"HPCPRUNE_COLLECTIVE_TIMEOUT": "5", "HPCPRUNE_TEST_HANG": "allreduce:2:12",
                            "HPCPRUNE_TEST_HANG_RANK": "1"})
    assert re.search(r"\[rank 0\] stopping: a collective waited 5 s \(HPCPRUNE_COLLECTIVE_TIMEOUT\) for a rank that "
                     r"never came", output), output
    assert "[rank 0] stopping: another rank is gone" not in output


def test_ranks_that_run_different_collectives_are_told_so_with_the_traceback(tmp_path):
    """TORCH_DISTRIBUTED_DEBUG=DETAIL compares the ranks' collectives: a mismatch is a bug, not a lost peer."""
    output = torchrun_with(tmp_path / "run.h5", {"TORCH_DISTRIBUTED_DEBUG": "DETAIL", "HPCPRUNE_TEST_MISMATCH": "broadcast:1",
                            "HPCPRUNE_TEST_MISMATCH_RANK": "1"})
    assert output.count("CollectiveMismatch: the ranks ran different collectives at the same step") >= 1, output
    assert "Traceback" in output and "another rank is gone" not in output
