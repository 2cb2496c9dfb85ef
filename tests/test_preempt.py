"""Preemption without SLURM: the ranks' stop agreement under mpirun, and a plain `hpcprune prune`
stopped by SIGUSR1 mid-fine-tuning that `--resume` brings to the uninterrupted result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import h5py
import numpy as np

from hpcprune.dist.signals import INTERRUPTED_EXIT, PREEMPTED_EXIT
from tests.helpers import (
    CONFIGS,
    ROOT,
    assert_same_masks,
    complete_rounds,
    driver,
    launch,
    run_cli,
)
from tests.resume_checks import (
    EPOCH_MARKER,
    EPOCHS,
    INTERRUPTIBLE,
    assert_same_run,
    events,
)

# Outside SLURM whatever the test runner's environment (no requeue is attempted), one thread per
# process: two runs side by side on two cores must not fight over threads.
PLAIN_ENV = {**{key: value for key, value in os.environ.items() if not key.startswith("SLURM_")},
             "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_point(mpirun, tmp_path):
    finished = launch([mpirun, "-n", "2", sys.executable, "-m", "tests.preempt_driver", str(tmp_path)], timeout=300)
    assert finished.returncode == 0, finished.stderr
    facts = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, seen in enumerate(facts):
        assert seen["before"] is None, f"rank {rank} saw a stop before any signal"
        assert seen["after"] == "SIGUSR1 on 1 rank(s)", f"rank {rank}"
        assert seen["stopped"] == "stopped at the test's safe point on SIGUSR1 on 1 rank(s)", f"rank {rank}"
    assert [seen["saved_on"] for seen in facts] == [[0], []], "rank 0 alone writes the checkpoint"


def prune_args(out, *extra: str) -> list[str]:
    return ["prune", "--config", str(CONFIGS / "smoke.yaml"), "--out", str(out), *INTERRUPTIBLE, *extra]


def prune(out, *extra: str) -> list[str]:
    return [sys.executable, "-m", "hpcprune", *prune_args(out, *extra)]


def interrupt_on(marker: str, command: list[str], signal_number: int, env: dict = PLAIN_ENV) -> tuple[int, str]:
    """Start `command`, send the signal once its log shows `marker`; its exit status and log."""
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    log = []
    for line in process.stderr:
        log.append(line)
        if marker in line:
            process.send_signal(signal_number)
    return process.wait(timeout=300), "".join(log)


def test_sigusr1_mid_fine_tuning_then_resume_gives_the_uninterrupted_run(tmp_path):
    uninterrupted = subprocess.Popen(prune(tmp_path / "uninterrupted.h5"), cwd=ROOT, env=PLAIN_ENV,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    status, log = interrupt_on(EPOCH_MARKER, prune(tmp_path / "resumed.h5"), signal.SIGUSR1)
    assert status == PREEMPTED_EXIT, log

    with h5py.File(tmp_path / "resumed.h5", "r") as archive:
        checkpoint = dict(archive["checkpoint"].attrs) if "checkpoint" in archive else {}
    assert checkpoint.get("training_stage") == 1 and 1 <= checkpoint["training_epoch"] < EPOCHS, checkpoint
    for key in ("training_model_file", "training_state_file"):
        assert (tmp_path / checkpoint[key]).is_file(), key
    assert [kind for kind, _ in events(tmp_path / "resumed.h5")] == ["start", "interrupt"]

    resumed = run_cli(*prune_args(tmp_path / "resumed.h5", "--resume"), env=PLAIN_ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert f"continuing after epoch {checkpoint['training_epoch']} of {EPOCHS}" in resumed.stderr
    assert uninterrupted.wait(timeout=300) == 0, uninterrupted.stderr.read()
    assert [kind for kind, _ in events(tmp_path / "resumed.h5")] == ["start", "interrupt", "resume", "finish"]
    assert_same_run(tmp_path / "resumed.h5", tmp_path / "uninterrupted.h5")


def test_sigterm_between_rounds_stops_before_the_next_round_and_resume_gives_the_same_masks(tmp_path):
    """No fine-tuning: the safe point is the start of a round; each round's masks grow from the last."""
    rounds = ("--set", "finetune.epochs=0", "--set", "pretrain.epochs=0", "--set", "schedule.rounds=8")
    uninterrupted = run_cli(*prune_args(tmp_path / "uninterrupted.h5", *rounds), env=PLAIN_ENV)
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    status, log = interrupt_on("round 1/8: pruning", prune(tmp_path / "resumed.h5", *rounds), signal.SIGTERM)
    assert status == PREEMPTED_EXIT, log
    stopped = complete_rounds(tmp_path / "resumed.h5")
    assert 1 <= len(stopped) < 8 and events(tmp_path / "resumed.h5")[-1] == (
        "interrupt", f"stopped before round {len(stopped) + 1} on SIGTERM on 1 rank(s)")

    resumed = run_cli(*prune_args(tmp_path / "resumed.h5", *rounds, "--resume"), env=PLAIN_ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert complete_rounds(tmp_path / "resumed.h5") == list(range(1, 9))
    assert_same_masks(tmp_path / "resumed.h5", tmp_path / "uninterrupted.h5", rounds=range(1, 9))


def test_a_gradual_round_stopped_mid_fine_tuning_is_redone_whole_to_the_same_masks(tmp_path):
    """A gradual round's masks move with the optimizer steps: it saves no mid-round state, and the
    resumed run redoes the round from its start, ending where the uninterrupted run ends."""
    gradual = ("--set", "schedule={kind: gradual, rounds: 1, initial_sparsity: 0.3, start_step: 0, interval: 20, updates: 8}",
               "--set", "data.synthetic_size=4096", "--set", "pretrain.epochs=0", "--set", f"finetune.epochs={EPOCHS}",
               "--set", "progress=false")
    uninterrupted = run_cli(*prune_args(tmp_path / "uninterrupted.h5", *gradual), env=PLAIN_ENV)
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    status, log = interrupt_on(EPOCH_MARKER, prune(tmp_path / "resumed.h5", *gradual), signal.SIGUSR1)
    assert status == PREEMPTED_EXIT, log
    with h5py.File(tmp_path / "resumed.h5", "r") as archive:
        assert "training_stage" not in (archive["checkpoint"].attrs if "checkpoint" in archive else {})

    resumed = run_cli(*prune_args(tmp_path / "resumed.h5", *gradual, "--resume"), env=PLAIN_ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert "continuing after epoch" not in resumed.stderr
    assert_same_masks(tmp_path / "resumed.h5", tmp_path / "uninterrupted.h5", rounds=(1,))
    with h5py.File(tmp_path / "resumed.h5", "r") as a, h5py.File(tmp_path / "uninterrupted.h5", "r") as b:
        assert np.array_equal(a["rounds/0001/history"][()], b["rounds/0001/history"][()])
        assert a["rounds/0001"].attrs["accuracy"] == b["rounds/0001"].attrs["accuracy"]


def test_sigint_mid_fine_tuning_records_an_interrupt_and_stops_without_a_requeue(tmp_path):
    """Ctrl-C stops like SIGTERM (same safe point, checkpoint, "interrupt" event) but is nobody's
    preemption: no requeue is tried, even under SLURM, and the status is 130; --resume continues."""
    env = {**PLAIN_ENV, "SLURM_JOB_ID": "999999999"}  # a requeue would be tried, and fail, for this job
    status, log = interrupt_on(EPOCH_MARKER, prune(tmp_path / "run.h5"), signal.SIGINT, env=env)
    assert status == INTERRUPTED_EXIT, log
    assert "could not requeue" not in log
    kinds = events(tmp_path / "run.h5")
    assert [kind for kind, _ in kinds] == ["start", "interrupt"] and kinds[1][1].endswith("on SIGINT on 1 rank(s)")
    resumed = run_cli(*prune_args(tmp_path / "run.h5", "--resume"), env=PLAIN_ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert [kind for kind, _ in events(tmp_path / "run.h5")] == ["start", "interrupt", "resume", "finish"]


def test_each_rank_restores_its_own_generators_not_rank_0s(mpirun, mpi4py, tmp_path):
    """The training checkpoint keeps every rank's RNG state (CPU, and its own GPU's where there is one)."""
    finished = launch([mpirun, "-n", "2", *driver("rng", str(tmp_path))], timeout=300)
    assert finished.returncode == 0, finished.stderr
    drawn = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert drawn[0]["expected"] != drawn[1]["expected"]  # the ranks' generators really differ
    for rank, seen in enumerate(drawn):
        assert seen["restored"] == seen["expected"], f"rank {rank}"
