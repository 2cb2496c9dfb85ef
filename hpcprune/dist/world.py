"""Step 2 — world: who am I (rank, size) and the few collectives the pipeline needs.

    hpcprune prune ...              -> SingleWorld (rank 0 of 1)

Everything above this module is written once against `World`; the backends (`hpcprune.dist.mpi`,
`hpcprune.dist.torch_dist`) implement it, and `hpcprune.dist.detect` picks the one that launched us.
Collectives move only small numpy arrays and byte strings: histograms, counts, packed masks.
Byte messages travel one rank to another (`send_bytes`), so masks go tensor by tensor to where they
are needed instead of in one gather; every byte message is cut into pieces (`hpcprune.dist.pieces`)
that no backend's count can overflow, and a gather moves each rank's bytes alone, unpadded.
"""

from __future__ import annotations

import abc

import numpy as np

from hpcprune.dist.pieces import pieces


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

    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        """`root`'s bytes on every rank (other ranks pass None)."""
        length = np.array([len(data) if self.rank == root else 0], dtype=np.int64)
        self._broadcast_array(length, root)
        if self.rank == root:
            view = np.frombuffer(data, dtype=np.uint8)
            for piece in pieces(view.size):
                self._broadcast_array(view[piece], root)  # read-only here: the root only sends
            return bytes(data)
        buffer = np.empty(int(length[0]), dtype=np.uint8)
        for piece in pieces(buffer.size):
            self._broadcast_array(buffer[piece], root)
        return buffer.tobytes()

    def send_bytes(self, data: bytes, dest: int) -> None:
        """Send `data` to rank `dest`, which takes it with `recv_bytes(source=self.rank)`.

        Messages from one rank to another arrive in the order they were sent.
        """
        view = np.frombuffer(data, dtype=np.uint8)
        self._send_array(np.array([view.size], dtype=np.int64), dest)
        for piece in pieces(view.size):
            self._send_array(view[piece], dest)

    def recv_bytes(self, source: int) -> bytes:
        """The next bytes rank `source` sent to this rank."""
        length = np.zeros(1, dtype=np.int64)
        self._recv_array(length, source)
        buffer = np.empty(int(length[0]), dtype=np.uint8)
        for piece in pieces(buffer.size):
            self._recv_array(buffer[piece], source)
        return buffer.tobytes()

    def gather_bytes(self, data: bytes, root: int = 0) -> list[bytes] | None:
        """Every rank's bytes, in rank order, on `root`; None elsewhere.

        Each rank's bytes travel alone, so no message is padded to the longest and the root holds
        the messages themselves, nothing more.
        """
        if self.rank != root:
            self.send_bytes(data, root)
            return None
        return [bytes(data) if rank == root else self.recv_bytes(rank) for rank in range(self.size)]

    # The backends' primitives: one contiguous uint8 or int64 array, in one call that fits its counts.
    # An array the sender passes may be read-only (a view of bytes).

    def _send_array(self, array: np.ndarray, dest: int) -> None:
        raise NotImplementedError(f"a {self.name} world has no other rank to send to")

    def _recv_array(self, array: np.ndarray, source: int) -> None:
        raise NotImplementedError(f"a {self.name} world has no other rank to receive from")

    def _broadcast_array(self, array: np.ndarray, root: int) -> None:
        raise NotImplementedError(f"a {self.name} world has no other rank to broadcast to")

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

    def barrier(self) -> None:
        pass
