"""On the real local SLURM (slurm/local.sh): sbatch slurm/prune.sh, requeue mid-run, hpcprune submit.

Nothing is mocked: jobs go through slurmctld, ranks are started by srun, requeues and signals are
SLURM's own. Jobs ask for one CPU per task so that several fit on the node at once.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import h5py
import pytest

from tests.helpers import CONFIGS, assert_same_masks, run_cli
from tests.resume_checks import EPOCH_MARKER, INTERRUPTIBLE, assert_same_run, events
from tests.slurm_fixtures import (
    release_requeued,
    sbatch,
    wait_for_text,
    wait_until_finished,
)

pytestmark = pytest.mark.usefixtures("local_slurm")

ONESHOT = CONFIGS / "oneshot_global.yaml"


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> Path:
    """configs/oneshot_global.yaml in one plain process: the masks every launch must reproduce."""
    path = tmp_path_factory.mktemp("single") / "single.h5"
    finished = run_cli("prune", "--config", str(ONESHOT), "--out", str(path), "-q")
    assert finished.returncode == 0, finished.stderr
    return path


def world_size(path: Path) -> int:
    with h5py.File(path, "r") as archive:
        return int(archive.attrs["world_size"])


def test_sbatch_prune_sh_with_two_ranks_gives_the_single_process_masks(single_process, tmp_path):
    archive = tmp_path / "sbatch.h5"
    job, done = sbatch("--ntasks=2", f"--output={tmp_path}/%x-%j.out", "slurm/prune.sh", "configs/oneshot_global.yaml",
                       "--out", str(archive), wait=True)
    log = (tmp_path / f"hpcprune-{job}.out").read_text()
    assert done.returncode == 0, log
    assert world_size(archive) == 2, "two ranks started by srun"
    assert_same_masks(archive, single_process, rounds=(1,))


# --- preemption: requeued mid-fine-tuning, resumed, same result ---------------------------------------


INTERRUPTIONS = {
    # how the job is interrupted, and the signal its ranks receive
    "scontrol-requeue": (lambda job: ["scontrol", "requeue", job], "SIGTERM"),
    "scancel-usr1": (lambda job: ["scancel", "--signal=USR1", job], "SIGUSR1"),
}


@pytest.fixture(scope="module")
def requeue_runs(local_slurm, tmp_path_factory) -> tuple[Path, dict[str, dict[str, str]]]:
    """An uninterrupted job and one job per interruption, all of two ranks, run side by side."""
    folder = tmp_path_factory.mktemp("requeue")

    def submit(name: str) -> str:
        # --force: a restart must drop it (and resume) or the requeued attempt would refuse to start.
        # More data than the plain-process test: the signal travels through the log, scontrol and
        # slurmd, so epochs must last long enough for it to land before round 1's last one.
        return sbatch("--ntasks=2", "--cpus-per-task=1", f"--output={folder}/{name}.out", "slurm/prune.sh",
                      "configs/smoke.yaml", "--out", str(folder / f"{name}.h5"), "--force", *INTERRUPTIBLE,
                      "--set", "data.synthetic_size=16384")[0]

    jobs = {name: submit(name) for name in ["uninterrupted", *INTERRUPTIONS]}
    for name, (command, _) in INTERRUPTIONS.items():
        wait_for_text(folder / f"{name}.out", EPOCH_MARKER, jobs[name])  # mid-way through round 1's fine-tuning
        subprocess.run(command(jobs[name]), check=True, timeout=30)
    for name in INTERRUPTIONS:
        release_requeued(jobs[name])
    return folder, {name: wait_until_finished(job) for name, job in jobs.items()}


@pytest.mark.parametrize("interruption", INTERRUPTIONS)
def test_a_requeued_job_resumes_mid_fine_tuning_and_ends_like_an_uninterrupted_one(requeue_runs, interruption):
    folder, finished = requeue_runs
    log = (folder / f"{interruption}.out").read_text()
    assert finished["uninterrupted"]["JobState"] == "COMPLETED", (folder / "uninterrupted.out").read_text()
    assert finished[interruption]["JobState"] == "COMPLETED", log
    assert finished[interruption]["Restarts"] == "1", log
    # The ranks stop at a safe point and exit 75, unless SLURM, carrying out the requeue they asked
    # for, ends the step first (srun "forcing job termination"): either way the checkpoint is written.
    assert "stopped in round 1 after epoch" in log, "the ranks stopped at a safe point"
    assert "status 75" in log or "forcing job termination" in log, log

    recorded = events(folder / f"{interruption}.h5")
    assert [kind for kind, _ in recorded] == ["start", "interrupt", "requeue", "resume", "finish"], recorded
    interrupt, resume = recorded[1][1], recorded[3][1]
    assert "in round 1 after epoch" in interrupt and INTERRUPTIONS[interruption][1] in interrupt, interrupt
    assert "training stage 1" in resume, resume
    assert_same_run(folder / f"{interruption}.h5", folder / "uninterrupted.h5")


# --- hpcprune submit (submitit) ---------------------------------------------------------------------


def test_hpcprune_submit_wait_completes_a_run_on_slurm(single_process, submitit, tmp_path):
    archive = tmp_path / "submitted.h5"
    done = run_cli("submit", "--config", str(ONESHOT), "--out", str(archive), "--tasks-per-node", "2",
                   "--cluster", "slurm", "--time", "10", "--wait")
    assert done.returncode == 0, done.stdout + done.stderr
    job = done.stdout.split()[1]
    assert f"job {job} submitted" in done.stdout and f"archive {archive}" in done.stdout
    assert wait_until_finished(job)["JobState"] == "COMPLETED"  # submitit has the result before SLURM ends the job
    assert (tmp_path / "submitted.h5.logs" / job / f"{job}_0_log.out").exists(), "logs where the command said"
    assert world_size(archive) == 2, "each submitit task is a rank"
    assert [kind for kind, _ in events(archive)] == ["start", "finish"]
    assert_same_masks(archive, single_process, rounds=(1,))


def test_hpcprune_submit_to_an_unknown_partition_is_refused_in_one_line(tmp_path):
    done = run_cli("submit", "--config", str(ONESHOT), "--out", str(tmp_path / "run.h5"), "--cluster", "slurm",
                   "--partition", "no-such-partition")
    assert done.returncode == 2, done.stderr
    assert "hpcprune: error: cannot submit to slurm: " in done.stderr and "no-such-partition" in done.stderr
    assert not (tmp_path / "run.h5").exists()
