"""Preemption without SLURM: the ranks' stop agreement under mpirun, and a plain `hpcprune prune`
stopped by SIGUSR1 mid-fine-tuning that `--resume` brings to the uninterrupted result."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import h5py
import pytest

from hpcprune.preempt import PREEMPTED_EXIT
from tests.conftest import missing
from tests.helpers import CONFIGS, ROOT, run_cli
from tests.resume_checks import EPOCH_MARKER, EPOCHS, INTERRUPTIBLE, assert_same_run, events

MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
# Outside SLURM whatever the test runner's environment: no requeue is attempted.
PLAIN_ENV = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_point(tmp_path):
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        missing("mpirun", "apt-get install openmpi-bin libopenmpi-dev")
    finished = subprocess.run([mpirun, "-n", "2", sys.executable, "-m", "tests.preempt_driver", str(tmp_path)],
                              capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, **MPI_ENV})
    assert finished.returncode == 0, finished.stderr
    facts = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, seen in enumerate(facts):
        assert seen["before"] is None, f"rank {rank} saw a stop before any signal"
        assert seen["after"] == "SIGUSR1 on 1 rank(s)", f"rank {rank}"
        assert seen["stopped"] == "stopped at the test's safe point on SIGUSR1 on 1 rank(s)", f"rank {rank}"
    assert [seen["saved_on"] for seen in facts] == [[0], []], "rank 0 alone writes the checkpoint"


def prune(out, *extra: str) -> list[str]:
    return [sys.executable, "-m", "hpcprune", "prune", "--config", str(CONFIGS / "smoke.yaml"), "--out", str(out),
            *INTERRUPTIBLE, *extra]


def test_sigusr1_mid_fine_tuning_then_resume_gives_the_uninterrupted_run(tmp_path):
    uninterrupted = subprocess.Popen(prune(tmp_path / "uninterrupted.h5"), cwd=ROOT, env=PLAIN_ENV,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    interrupted = subprocess.Popen(prune(tmp_path / "resumed.h5"), cwd=ROOT, env=PLAIN_ENV,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = []
    for line in interrupted.stderr:
        log.append(line)
        if EPOCH_MARKER in line:
            interrupted.send_signal(signal.SIGUSR1)
    assert interrupted.wait(timeout=300) == PREEMPTED_EXIT, "".join(log)

    with h5py.File(tmp_path / "resumed.h5", "r") as archive:
        checkpoint = dict(archive["checkpoint"].attrs) if "checkpoint" in archive else {}
    assert checkpoint.get("training_stage") == 1 and 1 <= checkpoint["training_epoch"] < EPOCHS, checkpoint
    for key in ("training_model_file", "training_state_file"):
        assert (tmp_path / checkpoint[key]).is_file(), key
    assert [kind for kind, _ in events(tmp_path / "resumed.h5")] == ["start", "interrupt"]

    resumed = run_cli("prune", "--config", str(CONFIGS / "smoke.yaml"), "--out", str(tmp_path / "resumed.h5"),
                      *INTERRUPTIBLE, "--resume", env=PLAIN_ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert f"continuing after epoch {checkpoint['training_epoch']} of {EPOCHS}" in resumed.stderr
    assert uninterrupted.wait(timeout=300) == 0, uninterrupted.stderr.read()
    assert [kind for kind, _ in events(tmp_path / "resumed.h5")] == ["start", "interrupt", "resume", "finish"]
    assert_same_run(tmp_path / "resumed.h5", tmp_path / "uninterrupted.h5")
