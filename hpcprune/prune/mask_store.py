"""This rank's packed masks, held in memory while they are small and in a temporary file beyond.

    HPCPRUNE_MASK_MEMORY_BYTES=0 hpcprune prune --config configs/quickstart.yaml   # every mask on disk

A selection cannot finish any tensor's mask before it has seen every tensor (the global threshold,
and the ties at it, depend on all of them), so the masks of this rank's tensors must be kept
somewhere until the selection ends: numel/8 bytes, which grow with the model (562 MiB per rank
for 9e9 weights on two ranks). `MaskStore` keeps them in memory up to $HPCPRUNE_MASK_MEMORY_BYTES
(32 MiB) in all; past that, in an unnamed temporary file in $TMPDIR (deleted by the system when
the process ends, even if killed), with only the tensor being written in memory. The passes of a
selection write one tensor after another (all worker threads on the same tensor), so a tensor is
written back when the next one is first touched. Readers get one tensor's bits at a time.

Hand-written rather than `np.memmap`: a mapped file's written pages count in the process's
resident memory until the kernel writes them back, which is the growth this module exists to stop.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from hpcprune.prune.plan import TensorSpec

MEMORY_VARIABLE = "HPCPRUNE_MASK_MEMORY_BYTES"
DEFAULT_MEMORY_BYTES = 32 << 20


def memory_budget() -> int:
    """Packed mask bytes a rank keeps in memory before it keeps them on disk."""
    return int(os.environ.get(MEMORY_VARIABLE, DEFAULT_MEMORY_BYTES))


def packed_size(numel: int) -> int:
    return (numel + 7) // 8


class MaskStore(Sequence[np.ndarray]):
    """One packed mask per tensor position; `store[position]` is that tensor's writable bits.

    On disk, the array `store[position]` returns is valid until another position is touched: use it
    at once (as the chunk kernels do), never keep it across tensors.
    """

    def __init__(self, sizes: Sequence[int]):
        self._sizes = list(sizes)
        self._offsets = np.concatenate([[0], np.cumsum(self._sizes, dtype=np.int64)]).tolist()
        self._lock = threading.Lock()
        self._file = tempfile.TemporaryFile(prefix="hpcprune-masks-") if self._offsets[-1] > memory_budget() else None
        self._arrays: list[np.ndarray | None] = [None] * len(self._sizes)  # in memory: every mask; on disk: none
        self._written = [False] * len(self._sizes)  # on disk: whether the file holds this position's bits
        self._active: tuple[int, np.ndarray] | None = None  # on disk: the one tensor in memory

    @classmethod
    def for_specs(cls, specs: Sequence[TensorSpec]) -> MaskStore:
        return cls([packed_size(spec.numel) for spec in specs])

    @property
    def on_disk(self) -> bool:
        return self._file is not None

    def __len__(self) -> int:
        return len(self._sizes)

    def __getitem__(self, position: int) -> np.ndarray:
        with self._lock:
            if self._file is None:
                if self._arrays[position] is None:
                    # np.empty touches no page: each chunk's bytes become resident as they are written.
                    self._arrays[position] = np.empty(self._sizes[position], dtype=np.uint8)
                return self._arrays[position]
            if self._active is None or self._active[0] != position:
                self._settle()
                self._active = (position, self._load(position))
            return self._active[1]

    def packed(self, position: int) -> np.ndarray:
        """The tensor's bits: the array itself where it is in memory, else a fresh read from the file."""
        if self._file is None:
            return self[position]
        with self._lock:
            if self._active is not None and self._active[0] == position:
                return self._active[1]
            return self._load(position)

    def named(self, specs: Sequence[TensorSpec]) -> StoredMasks:
        """The masks by tensor name (specs in the store's positions)."""
        return StoredMasks(self, {spec.name: position for position, spec in enumerate(specs)})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    # --- the file -----------------------------------------------------------------------------------

    def _settle(self) -> None:
        """Write the tensor in memory back to the file and let it go."""
        if self._active is None:
            return
        position, array = self._active
        write_at(self._file.fileno(), array, self._offsets[position])
        self._written[position] = True
        self._active = None

    def _load(self, position: int) -> np.ndarray:
        array = np.empty(self._sizes[position], dtype=np.uint8)
        if self._written[position]:
            read_at(self._file.fileno(), array, self._offsets[position])
        return array


class StoredMasks(Mapping[str, np.ndarray]):
    """A MaskStore read by tensor name, one mask at a time (what a Selection hands on)."""

    def __init__(self, store: MaskStore, positions: dict[str, int]):
        self.store, self._positions = store, positions

    def __getitem__(self, name: str) -> np.ndarray:
        return self.store.packed(self._positions[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._positions)

    def __len__(self) -> int:
        return len(self._positions)


def store_masks(specs: Sequence[TensorSpec], masks: Mapping[str, np.ndarray] | Iterator[tuple[str, np.ndarray]]) -> StoredMasks:
    """Masks of `specs`, given by name or as (name, bits) pairs one at a time, kept as a MaskStore keeps them."""
    store = MaskStore.for_specs(specs)
    positions = {spec.name: position for position, spec in enumerate(specs)}
    for name, bits in (masks.items() if isinstance(masks, Mapping) else masks):
        store[positions[name]][:] = bits
    return store.named(specs)


def write_at(fd: int, array: np.ndarray, offset: int) -> None:
    """All of `array`'s bytes into the file at `offset`."""
    view = memoryview(array).cast("B")
    while view:  # a single pwrite moves at most about 2 GiB on Linux
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def read_at(fd: int, array: np.ndarray, offset: int) -> None:
    """`array` filled from the file's bytes at `offset`."""
    view = memoryview(array).cast("B")
    while view:
        read = os.preadv(fd, [view], offset)
        if read == 0:
            raise OSError(f"mask file ended {len(view)} bytes early at offset {offset}")
        view, offset = view[read:], offset + read
