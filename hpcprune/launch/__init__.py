"""Launchers: how ranks were started (mpirun, srun, torchrun) and the World each one gives.

Importing this package registers the detectors in `hpcprune.world.DETECTORS`, most specific first.
"""

from hpcprune.launch import mpi, torch_dist  # noqa: F401  (registration side effect)
from hpcprune.world import DETECTORS

DETECTORS[:] = [torch_dist.from_torchrun, mpi.from_mpi_launcher, torch_dist.from_srun]
