"""World over MPI (mpi4py): ranks started by `mpirun`/`mpiexec` (Open MPI, MPICH) or `srun --mpi=pmix`.

    mpirun -n 4 hpcprune prune --config configs/oneshot_global.yaml

Collectives use mpi4py's buffer interface (upper-case methods): numpy arrays and raw bytes, no
pickling. An MPI launch without mpi4py installed is an error, not a silent single process: four
independent copies writing one archive would be worse than stopping.
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

    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        length = np.array([len(data) if self.rank == root else 0], dtype=np.int64)
        self.comm.Bcast(length, root=root)
        buffer = np.frombuffer(data, dtype=np.uint8).copy() if self.rank == root else np.empty(int(length[0]), np.uint8)
        self.comm.Bcast(buffer, root=root)
        return buffer.tobytes()

    def gather_bytes(self, data: bytes, root: int = 0) -> list[bytes] | None:
        lengths = np.zeros(self.size, dtype=np.int64)
        self.comm.Gather(np.array([len(data)], dtype=np.int64), lengths, root=root)
        mine = np.frombuffer(data, dtype=np.uint8)
        if self.rank != root:
            self.comm.Gatherv(mine, None, root=root)
            return None
        buffer = np.empty(int(lengths.sum()), dtype=np.uint8)
        self.comm.Gatherv(mine, (buffer, lengths), root=root)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        return [buffer[offsets[i]:offsets[i + 1]].tobytes() for i in range(self.size)]

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
