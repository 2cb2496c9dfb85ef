"""World over MPI (mpi4py): ranks started by `mpirun`/`mpiexec` (Open MPI, MPICH) or `srun --mpi=pmix`.

    mpirun -n 4 hpcprune prune --config configs/oneshot_global.yaml

Collectives use mpi4py's buffer interface (upper-case methods): numpy arrays and raw bytes, no
pickling; byte messages travel in pieces that fit MPI's int counts (`hpcprune.dist.pieces`). An MPI
launch without mpi4py installed is an error, not a silent single process: four independent copies
writing one archive would be worse than stopping.
"""

from __future__ import annotations

import numpy as np

from hpcprune.errors import UsageError
from hpcprune.dist.world import World

class MpiWorld(World):
    name = "mpi"

    def __init__(self) -> None:
        from mpi4py import MPI

        self._mpi = MPI
        self.comm = MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.local_rank = self.comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()

    def allreduce_sum(self, array: np.ndarray) -> np.ndarray:
        source = np.ascontiguousarray(array)
        result = np.empty_like(source)
        self.comm.Allreduce(source, result, op=self._mpi.SUM)
        return result

    def _send_array(self, array: np.ndarray, dest: int) -> None:
        self.comm.Send(array, dest=dest)

    def _recv_array(self, array: np.ndarray, source: int) -> None:
        self.comm.Recv(array, source=source)

    def _broadcast_array(self, array: np.ndarray, root: int) -> None:
        self.comm.Bcast(array, root=root)

    def barrier(self) -> None:
        self.comm.Barrier()

    def close(self) -> None:
        from hpcprune.dist.ddp import shutdown_process_group  # late: torch only if DDP ran

        shutdown_process_group()

    def abort(self, exit_code: int) -> None:
        # MPI_Abort ends every rank of the job, including those blocked in a collective.
        self.comm.Abort(exit_code)


def mpi_world() -> World:
    """The World of ranks an MPI launcher started (hpcprune.dist.detect tells which launcher it was)."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        raise UsageError("started by an MPI launcher but mpi4py is not installed: pip install 'hpcprune[mpi]'") from None
    return MpiWorld()
