"""Step 2 — world: who am I (rank, size) and the few collectives the pipeline needs.

    hpcprune prune ...              -> SingleWorld (rank 0 of 1)

Everything above this module is written once against `World`; the backends (`hpcprune.dist.mpi`,
`hpcprune.dist.torch_dist`) implement it, and `hpcprune.dist.detect` picks the one that launched us.
Collectives move only small numpy arrays and byte strings: histograms, counts, packed masks.
"""

from __future__ import annotations

import abc

import numpy as np


class PeerLost(RuntimeError):
    """A collective failed because another rank is gone: that rank reports the cause, not this one."""


class CollectiveTimeout(RuntimeError):
    """A collective waited its whole timeout for a rank that did not come: it hangs, is far slower, or
    runs another collective. No other rank reports this, so this rank says it."""


class CollectiveMismatch(RuntimeError):
    """The ranks ran different collectives at the same step: a bug, reported with its traceback."""


# What gloo says when the rank at the other end of a connection died (DDP's gradient allreduce
# reaches gloo directly, not through a World collective, so its errors arrive unwrapped).
PEER_GONE_MESSAGES = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")


def is_peer_loss(error: BaseException) -> bool:
    """True when `error` says another rank is gone rather than that this rank failed."""
    return isinstance(error, PeerLost) or (isinstance(error, RuntimeError) and any(
        message in str(error) for message in PEER_GONE_MESSAGES))


class World(abc.ABC):
    """One process's view of the job."""

    name: str = "abstract"
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    restarts_failed_ranks: bool = False
    """True where a rank that fails is started again alone (fan-out tasks): its failures are then
    not shared with the other ranks (hpcprune.dist.failures), except refusals a restart would repeat."""

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @abc.abstractmethod
    def allreduce_sum(self, array: np.ndarray) -> np.ndarray:
        """Element-wise sum of `array` over all ranks; every rank gets the result (a new array)."""

    @abc.abstractmethod
    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        """`root`'s bytes on every rank (other ranks pass None)."""

    @abc.abstractmethod
    def gather_bytes(self, data: bytes, root: int = 0) -> list[bytes] | None:
        """Every rank's bytes, in rank order, on `root`; None elsewhere."""

    @abc.abstractmethod
    def barrier(self) -> None:
        """Wait until every rank got here."""

    def abort(self, exit_code: int) -> None:
        """End every rank now (a failure on one rank must not leave the others waiting)."""
        raise SystemExit(exit_code)

    def close(self) -> None:
        """Release the backend at the end of a run."""


class SingleWorld(World):
    """A plain process: rank 0 of 1, every collective is the identity."""

    name = "single"

    def allreduce_sum(self, array: np.ndarray) -> np.ndarray:
        return np.array(array, copy=True)

    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        assert data is not None, "the root of a broadcast must pass its bytes"
        return data

    def gather_bytes(self, data: bytes, root: int = 0) -> list[bytes] | None:
        return [data]

    def barrier(self) -> None:
        pass
