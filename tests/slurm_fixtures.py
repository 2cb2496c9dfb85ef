"""The local SLURM for the tests (slurm/local.sh), and small helpers to drive real jobs.

`local_slurm` (session) starts the daemons unless they already answer, and stops them at the end
only if it started them. In CI (CI=true) a SLURM that does not start fails the tests.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOCAL_SLURM = ROOT / "slurm" / "local.sh"
JOB_TIMEOUT = 600  # seconds a test waits for one job state; the machine may be busy


def _node_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30).stdout.split()
    return any(state.rstrip("*~#") in ("idle", "mixed", "allocated") for state in states)


@pytest.fixture(scope="session")
def local_slurm() -> None:
    """A single-node SLURM answering sbatch, srun, scontrol and sacct."""
    from tests.conftest import missing  # here: conftest imports this module

    already_running = _node_answers()
    if not already_running:
        if os.geteuid() != 0:
            missing("SLURM", "run as root so that `bash slurm/local.sh start` can install and start it")
        started = subprocess.run(["bash", str(LOCAL_SLURM), "start"], capture_output=True, text=True, timeout=600)
        if started.returncode != 0:
            missing("SLURM", f"bash slurm/local.sh start failed:\n{(started.stdout + started.stderr)[-3000:]}")
    yield
    if not already_running:
        subprocess.run(["bash", str(LOCAL_SLURM), "stop"], capture_output=True, timeout=120)


# --- driving jobs ---------------------------------------------------------------------------------


def sbatch(*args: str, cwd: Path = ROOT, wait: bool = False) -> tuple[str, subprocess.CompletedProcess]:
    """Submit (with --parsable); returns the job id and the finished sbatch."""
    command = ["sbatch", "--parsable", *(["--wait"] if wait else []), *args]
    done = subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=JOB_TIMEOUT)
    job = done.stdout.strip().split(";")[0]
    assert job.isdigit(), f"sbatch gave no job id: {done.stdout}{done.stderr}"
    return job, done


def job_fields(job: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Reason, Restarts, ExitCode...)."""
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", shown))


def wait_for(predicate, what: str, timeout: float = JOB_TIMEOUT, every: float = 0.3):
    """Poll `predicate` until it returns something true; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out waiting for {what}")


def wait_for_text(path: Path, text: str, job: str) -> None:
    """Wait until the job's log shows `text` (fails early if the job ended without it)."""
    def seen():
        if path.exists() and text in path.read_text(errors="replace"):
            return True
        if job_fields(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            pytest.fail(f"job {job} ended before its log showed {text!r}:\n{path.read_text(errors='replace')[-3000:]}")
        return False

    wait_for(seen, f"{text!r} in {path}", every=0.2)


def release_requeued(job: str) -> None:
    """A requeued job waits about 2 minutes (Reason=BeginTime): start it now."""
    wait_for(lambda: job_fields(job).get("Reason") == "BeginTime", f"job {job} to be requeued")
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True, timeout=30)


def wait_until_finished(job: str) -> dict[str, str]:
    fields = wait_for(lambda: (f := job_fields(job)).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED") and f,
                      f"job {job} to finish")
    return fields
