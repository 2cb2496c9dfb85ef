"""Elements a selection keeps between passes beyond its memory budget, in an unnamed temporary file.

    HPCPRUNE_MASK_MEMORY_BYTES=0 hpcprune prune --config configs/quickstart.yaml   # same $TMPDIR as the masks

Pass 2 of the global selection (hpcprune.prune.radix) keeps the flat offsets and low digits of the
elements inside the boundary's high-digit bin, so that T can decide them without another read of
the scores. That bin grows with the model (about 0.35 % of 9e9 weights at 80 % sparsity, 30 M
elements), past what a rank may hold in memory. Read again, the scores would cost 4 bytes per
weight, the whole checkpoint from disk when it is larger than memory; kept here, 6 bytes per
element of the bin, written once and read back once. The file lives in $TMPDIR like the mask
store's, and the system deletes it when the process ends, even if killed. If it cannot be
written ($TMPDIR full), the selection gives it up and reads the scores a third time instead.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import numpy as np

from hpcprune.prune.mask_store import read_at, write_at


class Spill:
    """An append-only file of chunks' (offsets, digits). Not thread-safe: callers serialise appends
    (a chunk's bin is a few kilobytes; the lock costs nothing beside the chunk's compare)."""

    def __init__(self):
        self._file = tempfile.TemporaryFile(prefix="hpcprune-retained-")
        self._end = 0

    def append(self, offsets: np.ndarray, digits: np.ndarray | None) -> Spilled:
        offsets = np.ascontiguousarray(offsets, dtype=np.uint32)
        record = Spilled(self, self._end, offsets.size, digits is not None)
        write_at(self._file.fileno(), offsets, self._end)
        self._end += offsets.nbytes
        if digits is not None:
            digits = np.ascontiguousarray(digits, dtype=np.uint16)
            write_at(self._file.fileno(), digits, self._end)
            self._end += digits.nbytes
        return record

    def read(self, record: Spilled) -> tuple[np.ndarray, np.ndarray | None]:
        offsets = np.empty(record.count, dtype=np.uint32)
        read_at(self._file.fileno(), offsets, record.place)
        if not record.with_digits:
            return offsets, None
        digits = np.empty(record.count, dtype=np.uint16)
        read_at(self._file.fileno(), digits, record.place + offsets.nbytes)
        return offsets, digits

    @property
    def bytes(self) -> int:
        return self._end

    def close(self) -> None:
        self._file.close()


@dataclass(frozen=True)
class Spilled:
    """One chunk's elements in a Spill."""

    spill: Spill
    place: int
    count: int
    with_digits: bool

    def load(self) -> tuple[np.ndarray, np.ndarray | None]:
        return self.spill.read(self)
