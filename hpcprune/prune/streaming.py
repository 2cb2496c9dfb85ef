"""Streaming this rank's scores: one read of a tensor per pass, its chunks spread over threads.

    hpcprune prune --config configs/quickstart.yaml   # selection reads scores through this

A lazy scores mapping may compute a tensor's scores on every access, so a pass reads each tensor once,
splits its flat scores into fixed-size chunks that worker threads pull one at a time, and merges the
per-chunk accumulators; memory is a few chunks per thread plus the one tensor being read.
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import reduce
from typing import NamedTuple

import numpy as np
import torch

from hpcprune.dist.failures import raise_if_any
from hpcprune.dist.world import World
from hpcprune.prune.mask_store import MaskStore, packed_size
from hpcprune.prune.plan import Plan, TensorSpec
from hpcprune.prune.spill import Spill, Spilled

CHUNK = 1 << 18
"""Elements per streamed chunk, rounded up to a multiple of 8 so that every chunk fills whole mask
bytes; bounds the temporary memory of selection (tests shrink it)."""

DIGIT_BITS = 16
BINS = 1 << DIGIT_BITS
HALF = BINS // 2  # bin index of key 0's high digit: negative keys fill the lower half
INF_KEY = 0x7F800000  # key of +inf; -inf is -INF_KEY; every key beyond these is a NaN

# tensor name -> float32 scores, for this rank's tensors; may be lazy (computed on each access, never
# cached), but every access must give the same values
Scores = Mapping[str, torch.Tensor]


# --- this rank's tensors, read one at a time ---------------------------------------------------------


class BadScores(ValueError):
    """A score tensor of the wrong dtype or shape."""


class Tensors:
    """This rank's tensors in global order, and one read of a tensor's flat scores per call."""

    def __init__(self, specs: list[TensorSpec], read: Callable[[TensorSpec], torch.Tensor], problem: str | None):
        self.specs, self._read, self.problem = specs, read, problem

    @classmethod
    def of(cls, scores: Scores, plan: Plan, world: World) -> Tensors:
        specs = plan.local(world.rank)
        expected, given = {spec.name for spec in specs}, set(scores)  # names only: nothing is scored here
        problem = None
        if given != expected:
            missing, extra = sorted(expected - given), sorted(given - expected)
            problem = f"rank {world.rank}: scores do not match the plan (missing {missing}, unexpected {extra})"
        return cls(specs, lambda spec: scores[spec.name], problem)

    @classmethod
    def holding(cls, spec: TensorSpec, flat: torch.Tensor) -> Tensors:
        """One tensor's scores, already read: its passes cost no further read of the scores mapping."""
        return cls([spec], lambda _: flat.view(spec.shape), None)

    def read(self, position: int) -> torch.Tensor:
        """The flat scores of tensor `position` (a view where possible); a lazy mapping computes them now."""
        spec = self.specs[position]
        score = self._read(spec)
        if score.dtype != torch.float32 or tuple(score.shape) != spec.shape:
            raise BadScores(
                f"scores[{spec.name!r}] must be float32 of shape {spec.shape}, got {score.dtype} {tuple(score.shape)}"
            )
        return score.detach().reshape(-1)

    def empty_masks(self) -> MaskStore:
        """Room for these tensors' packed masks, in memory or on disk (`hpcprune.prune.mask_store`)."""
        return MaskStore.for_specs(self.specs)


def nan_message(spec: TensorSpec) -> str:
    return f"scores[{spec.name!r}] contain NaN"


# --- streaming: one read per tensor, its chunks spread over threads ----------------------------------


class Chunk(NamedTuple):
    position: int  # in this rank's list of tensors
    spec: TensorSpec
    start: int  # flat index of the chunk's first element (a multiple of 8)
    values: np.ndarray  # float32 host array of the chunk's scores


def _step() -> int:
    return max(8, -(-CHUNK // 8) * 8)


def _host_chunk(flat: torch.Tensor, host: np.ndarray | None, start: int) -> np.ndarray:
    """Elements [start, start + step) as a float32 array: a view of `host` (CPU), else a copy."""
    stop = start + _step()
    return host[start:stop] if host is not None else flat[start:stop].cpu().numpy()


def write_bits(mask: np.ndarray, start: int, keep: np.ndarray) -> None:
    """Pack a chunk's bool mask into its bytes of the tensor's packed mask (chunks start on a byte)."""
    mask[start // 8 : start // 8 + packed_size(keep.size)] = np.packbits(keep, bitorder="big")


class _Reading:
    """The tensor being streamed, shared by the worker threads until the pass moves on.

    Workers reach the scores only through this object, which the reader clears when the tensor is
    done: no closure or finished work item keeps a tensor alive while the next one is computed.
    """

    def __init__(self, position: int, spec: TensorSpec, flat: torch.Tensor, work: Callable, partials: list):
        self.position, self.spec, self.work, self.partials = position, spec, work, partials
        self.flat, self.host = flat, flat.numpy() if flat.device.type == "cpu" else None
        self.starts, self.lock = iter(range(0, flat.numel(), _step())), threading.Lock()

    def release(self) -> None:
        self.flat = self.host = None  # the last references to this tensor's scores

    def drain(self, slot: int) -> None:
        """Process chunks until none is left, accumulating into partials[slot]."""
        while True:
            with self.lock:
                start = next(self.starts, None)
                flat, host = self.flat, self.host
            if start is None or flat is None:
                return
            chunk = Chunk(self.position, self.spec, start, _host_chunk(flat, host, start))
            del flat, host
            self.partials[slot] = self.work(chunk, self.partials[slot])


class Streamer:
    """Runs passes: each reads every listed tensor once and folds work(chunk, partial) over its chunks.

    Worker threads, as many as torch had threads, pull one chunk at a time, so a busy core simply
    does fewer. Meanwhile torch is single-threaded (a process-wide setting, restored on the way out):
    its kernels on a chunk (bincount, aminmax) then start no intra-op pool, and a lazy mapping's
    scoring leaves no OpenMP team spinning for milliseconds after each tensor, taking a core from
    the workers (scoring on the CPU runs on one thread; the chunks of its result on all of them).

    Passes alternate direction: forward, back, forward. A checkpoint larger than memory then finds
    the tensors the last pass read last still in the page cache; passes in one direction would find
    none, each read evicting what the next pass needs first. Nothing a pass adds up depends on the
    order it reads tensors in (counts add, bits have fixed places, retained elements are sorted).
    """

    def __init__(self):
        self._passes = 0
        self._threads = torch.get_num_threads()
        self.workers = max(1, self._threads)
        self._pool = ThreadPoolExecutor(self.workers) if self.workers > 1 else None

    def __enter__(self) -> Streamer:
        torch.set_num_threads(1)
        return self

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self._threads)
        if self._pool is not None:
            self._pool.shutdown()

    def run(self, tensors: Tensors, positions, work: Callable, zero: Callable):
        partials = [zero() for _ in range(self.workers)]
        positions = list(positions)
        if self._passes % 2:
            positions.reverse()
        self._passes += 1
        for position in positions:
            self._stream(tensors, position, work, partials)
        return reduce(operator.add, partials)

    def _stream(self, tensors: Tensors, position: int, work: Callable, partials: list) -> None:
        reading = _Reading(position, tensors.specs[position], tensors.read(position), work, partials)
        try:
            chunks = -(-reading.flat.numel() // _step())
            if self._pool is None or chunks <= 1:
                reading.drain(0)
                return
            for future in [self._pool.submit(reading.drain, slot) for slot in range(min(self.workers, chunks))]:
                future.result()
        finally:
            reading.release()


# --- per-pass accumulators -----------------------------------------------------------------------------


class Budget:
    """How many more elements this rank may keep between passes: up to `limit` in memory, then up to
    `spill_limit` more in a spill file (hpcprune.prune.spill); once both are spent, nothing more.
    Closing it (or leaving its `with`) deletes the spill file."""

    def __init__(self, limit: int, spill_limit: int = 0):
        self.left: int | None = limit
        self.spill_left = spill_limit
        self.spill: Spill | None = None
        self.lock = threading.Lock()

    def __enter__(self) -> Budget:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def overdrawn(self) -> bool:
        return self.left is None

    def keep(self, offsets: np.ndarray, digits: np.ndarray | None) -> Kept | None:
        """These elements, kept: as arrays in memory, as a record of the spill file, or None (overdrawn)."""
        with self.lock:
            if self.left is None:
                return None
            if offsets.size <= self.left:
                self.left -= offsets.size
            elif offsets.size <= self.spill_left:
                self.spill_left -= offsets.size
                try:
                    self.spill = self.spill or Spill()
                    return self.spill.append(offsets, digits)
                except OSError:  # $TMPDIR full or gone: a third read of the scores instead of a failed run
                    self._give_up()
                    return None
            else:
                self._give_up()
                return None
        return offsets.astype(np.uint32), digits

    def close(self) -> None:
        with self.lock:
            self._close_spill()

    def _give_up(self) -> None:
        self.left = None
        self._close_spill()

    def _close_spill(self) -> None:
        if self.spill is not None:
            self.spill.close()
            self.spill = None


# A chunk's retained elements: (offsets in the chunk, low digits or None) in memory, or in a spill file
Kept = tuple[np.ndarray, np.ndarray | None] | Spilled
# (tensor position, chunk start, its retained elements), one entry per chunk
Retained = list[tuple[int, int, Kept]]


def unpack(kept: Kept) -> tuple[np.ndarray, np.ndarray | None]:
    """A chunk's retained (offsets, digits), read back from the spill file if they went there."""
    return kept.load() if isinstance(kept, Spilled) else kept


@dataclass
class Counts:
    """What one thread adds up over its chunks in a pass that writes mask bits (passes 2 to 4)."""

    kept: np.ndarray  # mask bits set, per tensor position
    inside: np.ndarray  # elements inside the boundary's high-digit bin, per tensor position (pass 2)
    histogram: np.ndarray  # their low digits (pass 2)
    problem: str | BaseException | None = None
    retained: Retained | None = field(default_factory=list)  # None: the budget ran out
    chunk_ties: dict[tuple[int, int], int] = field(default_factory=dict)  # (position, start) -> elements == T

    @classmethod
    def zero(cls, tensors: int) -> Counts:
        return cls(np.zeros(tensors, dtype=np.int64), np.zeros(tensors, dtype=np.int64), np.zeros(BINS, dtype=np.int64))

    def __add__(self, other: Counts) -> Counts:
        retained = None if self.retained is None or other.retained is None else self.retained + other.retained
        return Counts(self.kept + other.kept, self.inside + other.inside, self.histogram + other.histogram,
                       self.problem or other.problem, retained, {**self.chunk_ties, **other.chunk_ties})

    def retain(self, budget: Budget, position: int, start: int, offsets: np.ndarray, digits=None) -> None:
        kept = budget.keep(offsets, digits)
        if kept is None:
            self.retained.clear()  # free it now: a later pass finds these elements again
        else:
            self.retained.append((position, start, kept))


@dataclass
class HighCounts:
    """Pass-1 accumulator: high-digit histogram, number of -inf, first NaN found."""

    histogram: np.ndarray = field(default_factory=lambda: np.zeros(BINS, dtype=np.int64))
    neginf: int = 0
    problem: str | BaseException | None = None

    def __add__(self, other: HighCounts) -> HighCounts:
        return HighCounts(self.histogram + other.histogram, self.neginf + other.neginf, self.problem or other.problem)




def as_failure(problem: str | BaseException | None) -> BaseException | None:
    """What a pass found wrong on this rank (a message, or what a read raised) as the exception to raise."""
    return ValueError(problem) if isinstance(problem, str) else problem


def raise_if_failed(world: World, problem: str | BaseException | None, outcomes: np.ndarray) -> None:
    """After the allreduce that carried every rank's `outcome`: every rank raises together if any failed,
    so none is left waiting in a later collective (hpcprune.dist.failures)."""
    raise_if_any(world, as_failure(problem), outcomes)
