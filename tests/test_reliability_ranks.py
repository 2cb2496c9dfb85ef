"""No hangs: a rank SIGKILLed while the others wait in a collective ends the whole run, naming the rank.

The kill is a real SIGKILL (no exception, no MPI_Abort from the dying rank) delivered by
`tests.crash_points` as rank 1 enters an allreduce or a gather that rank 0 is already waiting in.
Each launch must end on its own, well inside the 60 seconds a stuck allocation would be noticed in;
the subprocess timeout is that bound, so a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

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


@pytest.mark.parametrize("point", ["allreduce:2", "gather:1"])
def test_a_rank_killed_in_a_collective_ends_mpirun(mpirun, tmp_path, point):
    finished = killed_run([mpirun, "-n", "2"], point, tmp_path / "run.h5")
    assert finished.returncode != 0
    output = finished.stdout + finished.stderr
    assert re.search(r"rank 1 .*(signal 9|Killed)", output), output


@pytest.mark.parametrize("point", ["allreduce:2", "gather:1"])
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
