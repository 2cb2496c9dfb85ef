"""Which launcher started this process, and the World it gives.

    mpirun -n 4 hpcprune prune ...    -> MpiWorld
    torchrun --nproc_per_node 2 ...   -> TorchWorld (env://)
    srun --ntasks 4 hpcprune prune    -> TorchWorld (tcp:// on the step's first node)
    hpcprune prune ...                -> SingleWorld

Detectors are tried most specific first; each returns a World when its launcher's variables are
there, else None. They live here, above the backends, so `hpcprune.dist.world` (the interface)
imports none of them.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from hpcprune.dist import mpi, torch_dist
from hpcprune.dist.world import SingleWorld, World

# A detector returns a World when the process was started by its launcher, else None.
DETECTORS: tuple[Callable[[], World | None], ...] = (torch_dist.from_torchrun, mpi.from_mpi_launcher, torch_dist.from_srun)

# Rank variables of the launchers, in the order detection trusts them.
RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")


def detect_world() -> World:
    """The World this process was started in: the first detector that recognises it, else single."""
    for detector in DETECTORS:
        world = detector()
        if world is not None:
            return world
    return SingleWorld()


def launcher_rank() -> int:
    """This process's rank as the launcher announced it, before any World exists (0 if none)."""
    for variable in RANK_VARIABLES:
        if variable in os.environ:
            return int(os.environ[variable])
    return 0
