"""Which launcher started this process, and the World it gives.

    mpirun -n 4 hpcprune prune ...         -> MpiWorld    (Open MPI: OMPI_COMM_WORLD_*)
    mpiexec -n 4 hpcprune prune ...        -> MpiWorld    (MPICH, Intel MPI: PMI_*; PRRTE: PMIX_*)
    torchrun --nproc_per_node 2 ...        -> TorchWorld  (env://)
    srun --ntasks 4 hpcprune prune         -> TorchWorld  (ranks from SLURM_*)
    srun --mpi=pmix --ntasks 4 ...         -> MpiWorld when mpi4py's MPI speaks PMIx, else TorchWorld
    hpcprune prune ...                     -> SingleWorld

The launcher is told by what it alone sets. srun's MPI plugins (`--mpi=pmix`, `--mpi=pmi2`, or the
cluster's MpiDefault) put PMIx or PMI variables into every task whether or not the program uses
MPI, so under srun they do not mean an MPI launch: mpi4py is used only when it is installed and
its MPI library speaks that plugin's interface, which is asked of the library without initialising
it (initialising MPI in a probe process was tried: the PMIx server then refuses the rank's own
MPI_Init). Otherwise the ranks form a torch.distributed world from SLURM_*. They live here,
above the backends, so `hpcprune.dist.world` (the interface) imports none of them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Mapping

from hpcprune.dist import mpi
from hpcprune.dist.world import SingleWorld, World

# Rank variables of the launchers, in the order detection trusts them.
RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")

# What asks mpi4py's MPI library for its version string without MPI_Init.
LIBRARY_VERSION = ("import mpi4py; mpi4py.rc.initialize = mpi4py.rc.finalize = False; "
                   "from mpi4py import MPI; print(MPI.Get_library_version())")


def launched_by(env: Mapping[str, str]) -> str:
    """What started this process, from the variables that launcher alone sets."""
    plugin = env.get("SLURM_MPI_TYPE", "none") if "SLURM_STEP_ID" in env else "none"
    if "TORCHELASTIC_RUN_ID" in env or {"RANK", "WORLD_SIZE", "MASTER_ADDR"} <= env.keys():
        return "torchrun"
    if "OMPI_COMM_WORLD_SIZE" in env:
        return "openmpi"  # Open MPI's mpirun (also inside a SLURM job: it starts its daemons with srun)
    if plugin.startswith("pmix") and "PMIX_RANK" in env:
        return "srun-pmix"
    if plugin.startswith("pmi2") and "PMI_RANK" in env:
        return "srun-pmi2"
    if "PMI_SIZE" in env or "PMI_RANK" in env or "MPI_LOCALNRANKS" in env:
        return "pmi"  # MPICH's or Intel MPI's mpiexec (Hydra)
    if "PMIX_RANK" in env:
        return "pmix"  # PRRTE's prterun, Open MPI 5's mpirun
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        return "srun"
    return "none"


def speaks(interface: str, library_version: str) -> bool:
    """Whether an MPI library (its MPI_Get_library_version) can start under srun's `interface` plugin."""
    if interface == "pmix":
        openmpi = re.search(r"Open MPI v(\d+)", library_version)
        return bool(openmpi and int(openmpi.group(1)) >= 2) or ("MPICH" in library_version and "pmix" in library_version.lower())
    return "MPICH" in library_version or "Intel" in library_version  # pmi2: Open MPI needs a build with SLURM's PMI


def mpi_library_version() -> str | None:
    """mpi4py's MPI library version string, or None without a usable mpi4py (asked in a child process,
    so that nothing in this one touches MPI before it is meant to)."""
    try:
        asked = subprocess.run([sys.executable, "-c", LIBRARY_VERSION], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return asked.stdout.strip() if asked.returncode == 0 else None


def _torch_dist():
    """hpcprune.dist.torch_dist, imported on first use: torch takes seconds to import, and the command
    line reads launcher_rank to refuse a bad config at once, with no world to make."""
    from hpcprune.dist import torch_dist

    return torch_dist


def _mpi_if_it_speaks(interface: str) -> Callable[[], World | None]:
    def world() -> World | None:
        version = mpi_library_version()
        return mpi.mpi_world() if version is not None and speaks(interface, version) else _torch_dist().from_srun()
    return world


# Launcher -> the World it gives (None: fewer than two ranks, a plain process after all).
WORLDS: dict[str, Callable[[], World | None]] = {
    "torchrun": lambda: _torch_dist().from_torchrun(),
    "openmpi": mpi.mpi_world,
    "pmi": mpi.mpi_world,
    "pmix": mpi.mpi_world,
    "srun-pmix": _mpi_if_it_speaks("pmix"),
    "srun-pmi2": _mpi_if_it_speaks("pmi2"),
    "srun": lambda: _torch_dist().from_srun(),
    "none": lambda: None,
}


def detect_world() -> World:
    """The World this process was started in."""
    return WORLDS[launched_by(os.environ)]() or SingleWorld()


def launcher_rank() -> int:
    """This process's rank as the launcher announced it, before any World exists (0 if none)."""
    for variable in RANK_VARIABLES:
        if variable in os.environ:
            return int(os.environ[variable])
    return 0
