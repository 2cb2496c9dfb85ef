"""What launched a rank, and where the ranks meet: detection from the launchers' own variables, and
rendezvous ports that two runs started at once cannot share.

The launches are real: srun on the local SLURM (slurm/local.sh) with each MPI plugin, mpirun, and
plain sockets for the rendezvous protocol itself.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from hpcprune.dist.detect import launched_by, speaks
from hpcprune.dist.rendezvous import Announcer, candidate_ports, find_announced
from tests import test_slurm
from tests.helpers import CONFIGS, ROOT, assert_same_masks, mpi_env
from tests.slurm_fixtures import JOB_TIMEOUT, sbatch

ONESHOT = CONFIGS / "oneshot_global.yaml"
HANG_LIMIT = 60

# --- which launcher: from the variables it alone sets ------------------------------------------------

SRUN = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}


@pytest.mark.parametrize("env, launcher", [
    ({}, "none"),
    ({"TORCHELASTIC_RUN_ID": "x", "RANK": "1", "WORLD_SIZE": "2"}, "torchrun"),
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}, "openmpi"),
    ({**SRUN, "OMPI_COMM_WORLD_SIZE": "2"}, "openmpi"),  # mpirun inside a job starts its daemons with srun
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "PMI_FD": "5"}, "pmi"),  # MPICH's mpiexec
    ({"PMIX_RANK": "1", "PMIX_NAMESPACE": "prterun-1"}, "pmix"),  # prterun
    (SRUN, "srun"),
    ({**SRUN, "SLURM_MPI_TYPE": "none"}, "srun"),
    # MpiDefault=pmix (or --mpi=pmix): PMIx variables in every task, MPI program or not
    ({**SRUN, "SLURM_MPI_TYPE": "pmix", "PMIX_RANK": "1"}, "srun-pmix"),
    ({**SRUN, "SLURM_MPI_TYPE": "pmix_v4", "PMIX_RANK": "1"}, "srun-pmix"),
    ({**SRUN, "SLURM_MPI_TYPE": "pmi2", "PMI_RANK": "1", "PMI_SIZE": "2", "PMI_FD": "11"}, "srun-pmi2"),
])
def test_the_launcher_is_told_by_its_own_variables(env, launcher):
    assert launched_by(env) == launcher


@pytest.mark.parametrize("interface, version, expected", [
    ("pmix", "Open MPI v4.1.4, package: Debian OpenMPI, ident: 4.1.4", True),
    ("pmix", "Open MPI v1.10.7", False),
    ("pmix", "MPICH Version: 4.2.0 MPICH Configure: --with-device=ch4:ofi", False),
    ("pmix", "MPICH Version: 4.2.0 MPICH Configure: --with-pmix=/usr", True),
    ("pmi2", "Open MPI v4.1.4, package: Debian OpenMPI", False),
    ("pmi2", "MPICH Version: 4.2.0", True),
])
def test_an_mpi_library_is_used_under_srun_only_with_the_plugins_interface(interface, version, expected):
    assert speaks(interface, version) is expected


# --- the rendezvous protocol, on real sockets -------------------------------------------------------


def test_candidate_ports_are_the_same_for_every_rank_and_step_of_a_job():
    ports = candidate_ports("1234")
    assert ports == candidate_ports("1234") and len(set(ports)) == len(ports)
    assert ports[0] != candidate_ports("1235")[0] and all(20000 <= port < 40000 for port in ports)


def test_each_step_finds_its_own_store_past_a_silent_port_and_another_steps_announcer():
    """A program that holds the first candidate and answers nothing, then two steps of one job."""
    candidates = candidate_ports(str(int(time.time())))
    silent = socket.create_server(("", candidates[0]))  # accepts (the kernel does), never speaks
    first, second = Announcer("slurm-9.0", 1111, candidates), Announcer("slurm-9.1", 2222, candidates)
    try:
        assert (first.port, second.port) == (candidates[1], candidates[2])  # the held port was skipped
        deadline = time.monotonic() + 30
        assert find_announced("127.0.0.1", "slurm-9.1", candidates, deadline) == 2222
        assert find_announced("127.0.0.1", "slurm-9.0", candidates, deadline) == 1111
        with pytest.raises(RuntimeError, match="rank 0 of slurm-9.2 did not announce"):
            find_announced("127.0.0.1", "slurm-9.2", candidates[:3], time.monotonic() + 1)
    finally:
        first.close(), second.close(), silent.close()


# --- real launches ---------------------------------------------------------------------------------


single_process = test_slurm.single_process  # configs/oneshot_global.yaml in one plain process


def srun(*args: str, env: dict | None = None, timeout: float = JOB_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(["srun", "--ntasks=2", "--cpus-per-task=1", *args], capture_output=True, text=True, cwd=ROOT,
                          env=mpi_env(**(env or {})), timeout=timeout)


def backend_of(path: Path) -> tuple[str, int]:
    with h5py.File(path, "r") as archive:
        return str(archive.attrs["backend"]), int(archive.attrs["world_size"])


@pytest.mark.parametrize("plugin, backend", [("none", "torch"), ("pmix", "mpi"), ("pmi2", "torch")])
def test_srun_with_each_mpi_plugin_gives_the_single_process_masks(local_slurm, mpi4py, single_process, tmp_path,
                                                                  plugin, backend):
    """Debian's Open MPI speaks PMIx but not SLURM's PMI-2: under pmi2 the ranks use torch.distributed."""
    out = tmp_path / "run.h5"
    finished = srun(f"--mpi={plugin}", sys.executable, "-m", "hpcprune", "prune", "--config", str(ONESHOT), "--out",
                    str(out), "-q")
    assert finished.returncode == 0, finished.stderr
    assert backend_of(out) == (backend, 2)
    assert_same_masks(out, single_process, rounds=(1,))


def test_srun_with_pmix_but_without_mpi4py_uses_torch_distributed(local_slurm, single_process, tmp_path):
    """A cluster whose MpiDefault is pmix, a Python without mpi4py: plain srun must still work."""
    hidden = tmp_path / "no-mpi4py" / "mpi4py"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('mpi4py is not installed here')\n")
    out = tmp_path / "run.h5"
    finished = srun("--mpi=pmix", sys.executable, "-m", "hpcprune", "prune", "--config", str(ONESHOT), "--out", str(out),
                    "-q", env={"PYTHONPATH": f"{hidden.parent}:{ROOT}"})
    assert finished.returncode == 0, finished.stderr
    assert backend_of(out) == ("torch", 2)
    assert_same_masks(out, single_process, rounds=(1,))


def test_two_srun_steps_started_at_once_past_a_held_port_both_finish(local_slurm, single_process, tmp_path):
    """One job, a program holding the job's first rendezvous port, and two two-rank steps at once:
    each step's rank 0 binds the next free candidate and each rank finds its own step's store."""
    script = tmp_path / "two-steps.sh"
    script.write_text(f"""#!/bin/bash
set -euo pipefail
cd {ROOT}
port=$({sys.executable} -c "from hpcprune.dist.rendezvous import candidate_ports; print(candidate_ports('$SLURM_JOB_ID')[0])")
{sys.executable} -c "import socket, time; s = socket.create_server(('', $port)); time.sleep(600)" &
holder=$!
step() {{ srun --ntasks=2 --cpus-per-task=1 --exact {sys.executable} -m hpcprune prune --config {ONESHOT} --out {tmp_path}/$1.h5 -q; }}
step a & a=$!
step b & b=$!
wait $a; wait $b
kill $holder
""")
    job, done = sbatch("--ntasks=4", "--cpus-per-task=1", f"--output={tmp_path}/job.out", str(script), wait=True)
    log = (tmp_path / "job.out").read_text()
    assert done.returncode == 0, log
    for name in ("a", "b"):
        assert backend_of(tmp_path / f"{name}.h5") == ("torch", 2)
        assert_same_masks(tmp_path / f"{name}.h5", single_process, rounds=(1,))


def test_two_mpirun_trainings_started_at_once_both_finish(mpirun, mpi4py, tmp_path):
    """DDP under mpirun: each rank 0 keeps the port its store got from the kernel; nothing is re-bound."""
    args = ["prune", "--config", str(CONFIGS / "smoke.yaml"), "-q", "--set", "schedule.rounds=1", "--set", "pretrain.epochs=0"]
    runs = [subprocess.Popen([mpirun, "-n", "2", sys.executable, "-m", "hpcprune", *args, "--out", str(tmp_path / f"{name}.h5")],
                             cwd=ROOT, env=mpi_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name in ("a", "b")]
    for run in runs:
        _, errors = run.communicate(timeout=600)
        assert run.returncode == 0, errors
    assert_same_masks(tmp_path / "a.h5", tmp_path / "b.h5", rounds=(1,))


def test_an_exception_on_one_rank_ends_every_srun_rank(local_slurm, tmp_path):
    """srun does not end the other tasks when one exits non-zero: the ranks must end each other."""
    command = [sys.executable, "-m", "tests.crash_points", "prune", "--config", str(ONESHOT), "--out", str(tmp_path / "run.h5"), "-q"]
    try:
        finished = srun(*command, env={"HPCPRUNE_TEST_RAISE": "select:2:MemoryError", "HPCPRUNE_TEST_RAISE_RANK": "1"},
                        timeout=HANG_LIMIT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a rank was still running {HANG_LIMIT} s after rank 1 failed")
    assert finished.returncode != 0
    assert (finished.stdout + finished.stderr).count("MemoryError: injected at select:2 on rank 1") == 1

