"""Step 7 — select: the decision rule that turns scores into packed masks (True = keep).

    hpcprune prune --config configs/quickstart.yaml --set prune.rule=global --set prune.sparsity=0.9

Rules live in `RULES` (name -> function with the signature of `select` minus the name); adding a
rule touches only that registry. A rule sees only this rank's scores and talks to the other ranks
through `World.allreduce_sum`, so the same code is the single-process case and the cluster case.

Scores may be lazy: `scores[name]` may compute a tensor's scores afresh on every access, as the
pipeline's scoring does, so selection reads each tensor at most once per pass and lets go of it
(views included) before it reads the next: only one tensor's scores are alive at a time. Each
mask is built packed, chunk by chunk (`np.packbits`, big bit order: `hpcprune.masks.pack_mask`'s
bytes), so memory follows the largest tensor plus numel/8 bytes of masks, not the model's scores.

The global rule finds the exact k-th smallest score of all ranks without gathering any score. Each
float32 score maps to an int32 key that sorts like the float (sign-magnitude bits to two's
complement: -0.0 and +0.0 share key 0, -inf is the lowest key). Two radix passes of 16-bit digits
find the boundary key T, each streaming fixed-size chunks and summing a 65536-bin histogram over the
ranks with one allreduce:

  pass 1  histogram of the high digit (plus NaN and -inf counts): the bin that holds T;
  pass 2  the final mask bits of every element outside that bin, and the low digits of the few
          elements inside it, kept with their positions (up to RETAIN_LIMIT per rank).

T and the per-tensor counts of elements equal to T (summed over ranks in one allreduce) then decide
the kept elements without reading any score again: below T pruned, above kept, equal to T pruned
earliest first in the global order (tensor index, then flat index). A rank whose bin holds more
than RETAIN_LIMIT elements reads the tensors that have some once more, once T is known (pass 3),
keeping the positions of the elements equal to T; only if those too are more than RETAIN_LIMIT
does it read the tensors that keep some of them a last time (pass 4). So memory stays bounded
whatever the model, and the masks are the same for every world size and owner assignment.

Chunk kernels are numpy on host arrays that share memory with the tensors (on CPU its compare,
select and count kernels are several times faster than torch's), spread over worker threads that
pull the chunks of the tensor being read one at a time. Scores on another device are copied to the
host a chunk at a time.
"""

from __future__ import annotations

import math
import operator
import struct
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial, reduce
from typing import NamedTuple

import numpy as np
import torch

from hpcprune.plan import Plan, TensorSpec
from hpcprune.world import SingleWorld, World

CHUNK = 1 << 18
"""Elements per streamed chunk, rounded up to a multiple of 8 so that every chunk fills whole mask
bytes; bounds the temporary memory of selection (tests shrink it)."""

DIGIT_BITS = 16
BINS = 1 << DIGIT_BITS
HALF = BINS // 2  # bin index of key 0's high digit: negative keys fill the lower half
INF_KEY = 0x7F800000  # key of +inf; -inf is -INF_KEY; every key beyond these is a NaN
RETAIN_LIMIT = 1 << 20
"""Most elements a rank keeps (6 bytes each) between passes instead of reading the scores again."""

# tensor name -> float32 scores, for this rank's tensors; may be lazy (computed on each access, never
# cached), but every access must give the same values
Scores = Mapping[str, torch.Tensor]


@dataclass
class Selection:
    masks: dict[str, np.ndarray]  # this rank's tensors (plan.local(rank)): packed bits of the flat mask, True = keep
    threshold: float | None  # boundary score T: < T pruned, > T kept, == T by position; None: none pruned / n.a.
    kept: int  # kept elements over all prunable tensors of all ranks
    total: int  # plan.total
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # shape of each mask (for unpack_mask)


def prune_count(sparsity: float, total: int) -> int:
    """Number of elements to prune, rounded as torch.nn.utils.prune does (Python's round)."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    return round(sparsity * total)


def select(
    rule: str,
    scores: Scores,
    plan: Plan,
    world: World,
    *,
    sparsity: float,
    threshold: float | None = None,
) -> Selection:
    """Masks for this rank's tensors under `rule` (a key of RULES)."""
    if rule not in RULES:
        raise ValueError(f"unknown selection rule {rule!r}; known: {', '.join(sorted(RULES))}")
    return RULES[rule](scores, plan, world, sparsity=sparsity, threshold=threshold)


# --- rules -----------------------------------------------------------------------------------------


def select_global(
    scores: Scores, plan: Plan, world: World, *, sparsity: float, threshold: float | None = None
) -> Selection:
    """Prune the prune_count(sparsity, plan.total) smallest scores over all tensors of all ranks."""
    tensors = _Tensors.of(scores, plan, world)
    k = prune_count(sparsity, plan.total)
    with _Streamer() as stream:
        chosen = _smallest(tensors, k, world, stream, slots=[spec.index for spec in tensors.specs],
                           slot_count=len(plan.tensors))
    return _finish(tensors, chosen.masks, chosen.kept, chosen.boundary, plan, world, problem=None)


def select_layer(
    scores: Scores, plan: Plan, world: World, *, sparsity: float, threshold: float | None = None
) -> Selection:
    """Prune the same fraction of every tensor: its prune_count(sparsity, numel) smallest scores."""
    tensors = _Tensors.of(scores, plan, world)
    masks, kept, problem = [], 0, tensors.problem
    with _Streamer() as stream:
        for position, spec in enumerate(tensors.specs if problem is None else []):
            try:  # a bad tensor must still let this rank reach the collective in _finish
                # One read per tensor: its passes run over the held scores, nobody else's.
                alone = _Tensors.holding(spec, tensors.read(position))
                chosen = _smallest(alone, prune_count(sparsity, spec.numel), SingleWorld(), stream,
                                   slots=[0], slot_count=1)
                del alone
            except ValueError as error:
                problem = str(error)
                break
            masks += chosen.masks
            kept += chosen.kept
    return _finish(tensors, masks, kept, None, plan, world, problem=problem)


def select_threshold(
    scores: Scores, plan: Plan, world: World, *, sparsity: float, threshold: float | None = None
) -> Selection:
    """Prune every element whose score is <= threshold."""
    if threshold is None or math.isnan(threshold):
        raise ValueError("rule 'threshold' needs a threshold (prune.threshold)")
    tensors = _Tensors.of(scores, plan, world)
    masks = tensors.empty_masks()
    counts = _Counts.zero(len(tensors.specs))
    counts.problem = tensors.problem
    if counts.problem is None:
        work = partial(_mask_above, masks=masks, boundary=np.float32(threshold), check_nan=True)
        try:  # a bad tensor must still let this rank reach the collective in _finish
            with _Streamer() as stream:
                counts = stream.run(tensors, range(len(tensors.specs)), work, partial(_Counts.zero, len(tensors.specs)))
        except _BadScores as error:
            counts.problem = str(error)
    return _finish(tensors, masks, int(counts.kept.sum()), float(threshold), plan, world, problem=counts.problem)


RULES: dict[str, Callable[..., Selection]] = {
    "global": select_global,
    "layer": select_layer,
    "threshold": select_threshold,
}


# --- this rank's tensors, read one at a time ---------------------------------------------------------


class _BadScores(ValueError):
    """A score tensor of the wrong dtype or shape."""


class _Tensors:
    """This rank's tensors in global order, and one read of a tensor's flat scores per call."""

    def __init__(self, specs: list[TensorSpec], read: Callable[[TensorSpec], torch.Tensor], problem: str | None):
        self.specs, self._read, self.problem = specs, read, problem

    @classmethod
    def of(cls, scores: Scores, plan: Plan, world: World) -> _Tensors:
        specs = plan.local(world.rank)
        expected, given = {spec.name for spec in specs}, set(scores)  # names only: nothing is scored here
        problem = None
        if given != expected:
            missing, extra = sorted(expected - given), sorted(given - expected)
            problem = f"rank {world.rank}: scores do not match the plan (missing {missing}, unexpected {extra})"
        return cls(specs, lambda spec: scores[spec.name], problem)

    @classmethod
    def holding(cls, spec: TensorSpec, flat: torch.Tensor) -> _Tensors:
        """One tensor's scores, already read: its passes cost no further read of the scores mapping."""
        return cls([spec], lambda _: flat.view(spec.shape), None)

    def read(self, position: int) -> torch.Tensor:
        """The flat scores of tensor `position` (a view where possible); a lazy mapping computes them now."""
        spec = self.specs[position]
        score = self._read(spec)
        if score.dtype != torch.float32 or tuple(score.shape) != spec.shape:
            raise _BadScores(
                f"scores[{spec.name!r}] must be float32 of shape {spec.shape}, got {score.dtype} {tuple(score.shape)}"
            )
        return score.detach().reshape(-1)

    def empty_masks(self) -> list[np.ndarray]:
        # np.empty touches no page: each chunk's bytes are written (and become resident) as it is masked.
        return [np.empty(_packed_size(spec.numel), dtype=np.uint8) for spec in self.specs]


def _packed_size(numel: int) -> int:
    return (numel + 7) // 8


def _finish(tensors: _Tensors, masks, kept: int, boundary, plan: Plan, world: World, *, problem) -> Selection:
    """Sum kept counts over ranks with one allreduce that also tells every rank about any failure."""
    kept_total, failures = world.allreduce_sum(np.array([kept, problem is not None], dtype=np.int64))
    _raise_if_failed(problem, int(failures))
    return Selection(masks={spec.name: mask for spec, mask in zip(tensors.specs, masks)}, threshold=boundary,
                     kept=int(kept_total), total=plan.total, shapes={spec.name: spec.shape for spec in tensors.specs})


def _raise_if_failed(problem: str | None, failures: int) -> None:
    # Every rank raises together, so none is left waiting in a later collective.
    if problem is not None:
        raise ValueError(problem)
    if failures:
        raise ValueError("scores contain NaN or do not match the plan on another rank")


def _nan_message(spec: TensorSpec) -> str:
    return f"scores[{spec.name!r}] contain NaN"


# --- streaming: one read per tensor, its chunks spread over threads ----------------------------------


class _Chunk(NamedTuple):
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


def _write_bits(mask: np.ndarray, start: int, keep: np.ndarray) -> None:
    """Pack a chunk's bool mask into its bytes of the tensor's packed mask (chunks start on a byte)."""
    mask[start // 8 : start // 8 + _packed_size(keep.size)] = np.packbits(keep, bitorder="big")


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
            chunk = _Chunk(self.position, self.spec, start, _host_chunk(flat, host, start))
            del flat, host
            self.partials[slot] = self.work(chunk, self.partials[slot])


class _Streamer:
    """Runs passes: each reads every listed tensor once and folds work(chunk, partial) over its chunks.

    Worker threads, as many as torch had threads, pull one chunk at a time, so a busy core simply
    does fewer. Meanwhile torch is single-threaded (a process-wide setting, restored on the way out):
    its kernels on a chunk (bincount, aminmax) then start no intra-op pool, and a lazy mapping's
    scoring leaves no OpenMP team spinning for milliseconds after each tensor, taking a core from
    the workers (scoring on the CPU runs on one thread; the chunks of its result on all of them).
    """

    def __init__(self):
        self._threads = torch.get_num_threads()
        self.workers = max(1, self._threads)
        self._pool = ThreadPoolExecutor(self.workers) if self.workers > 1 else None

    def __enter__(self) -> _Streamer:
        torch.set_num_threads(1)
        return self

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self._threads)
        if self._pool is not None:
            self._pool.shutdown()

    def run(self, tensors: _Tensors, positions, work: Callable, zero: Callable):
        partials = [zero() for _ in range(self.workers)]
        for position in positions:
            self._stream(tensors, position, work, partials)
        return reduce(operator.add, partials)

    def _stream(self, tensors: _Tensors, position: int, work: Callable, partials: list) -> None:
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


class _Budget:
    """How many more elements this rank may keep between passes; once overdrawn, nothing more."""

    def __init__(self, limit: int):
        self.left: int | None = limit
        self.lock = threading.Lock()

    @property
    def overdrawn(self) -> bool:
        return self.left is None

    def take(self, count: int) -> bool:
        with self.lock:
            if self.left is None or count > self.left:
                self.left = None
                return False
            self.left -= count
            return True


# (tensor position, chunk start, offsets in the chunk, low digits or None), one entry per chunk
Retained = list[tuple[int, int, np.ndarray, np.ndarray | None]]


@dataclass
class _Counts:
    """What one thread adds up over its chunks in a pass that writes mask bits (passes 2 to 4)."""

    kept: np.ndarray  # mask bits set, per tensor position
    inside: np.ndarray  # elements inside the boundary's high-digit bin, per tensor position (pass 2)
    histogram: np.ndarray  # their low digits (pass 2)
    problem: str | None = None
    retained: Retained | None = field(default_factory=list)  # None: the budget ran out
    chunk_ties: dict[tuple[int, int], int] = field(default_factory=dict)  # (position, start) -> elements == T

    @classmethod
    def zero(cls, tensors: int) -> _Counts:
        return cls(np.zeros(tensors, dtype=np.int64), np.zeros(tensors, dtype=np.int64), np.zeros(BINS, dtype=np.int64))

    def __add__(self, other: _Counts) -> _Counts:
        retained = None if self.retained is None or other.retained is None else self.retained + other.retained
        return _Counts(self.kept + other.kept, self.inside + other.inside, self.histogram + other.histogram,
                       self.problem or other.problem, retained, {**self.chunk_ties, **other.chunk_ties})

    def retain(self, budget: _Budget, position: int, start: int, offsets: np.ndarray, digits=None) -> None:
        if budget.take(offsets.size):
            self.retained.append((position, start, offsets.astype(np.uint32), digits))
        else:
            self.retained.clear()  # free it now: a later pass finds these elements again


@dataclass
class _HighCounts:
    """Pass-1 accumulator: high-digit histogram, number of -inf, first NaN found."""

    histogram: np.ndarray = field(default_factory=lambda: np.zeros(BINS, dtype=np.int64))
    neginf: int = 0
    problem: str | None = None

    def __add__(self, other: _HighCounts) -> _HighCounts:
        return _HighCounts(self.histogram + other.histogram, self.neginf + other.neginf, self.problem or other.problem)


# --- exact k smallest by radix selection ------------------------------------------------------------


@dataclass
class _Chosen:
    masks: list[np.ndarray]  # packed, per tensor position
    kept: int  # kept elements of this rank
    boundary: float | None  # T, or None when nothing is pruned


def _smallest(tensors: _Tensors, k: int, world: World, stream: _Streamer, *, slots: list[int], slot_count: int):
    """Masks pruning the k smallest scores of all ranks, ties at the boundary earliest first.

    Ties are ordered by slot (spec.index in the global order, or 0 for a tensor selected on its own)
    and then by flat index. -inf scores are always pruned, even when there are more than k of them.
    """
    high, neginf = _reduce_high_histogram(tensors, world, stream)
    k = max(k, neginf)
    if k == 0:
        return _Chosen([_all_kept(spec.numel) for spec in tensors.specs], sum(s.numel for s in tensors.specs), None)
    high_digit, below_high = _digit_at_rank(high, k)
    masks = tensors.empty_masks()
    counts = _split_high_bin(tensors, high_digit, masks, stream)
    low_digit, below_low = _digit_at_rank(world.allreduce_sum(counts.histogram), k - below_high)
    boundary = _float_of_key(((high_digit - HALF) << DIGIT_BITS) | low_digit)
    chunk_ties: dict[tuple[int, int], int] = {}
    if counts.retained is not None:
        ties, tie_offsets = _decide_retained(counts, low_digit, masks)
    else:  # pass 3: read again the tensors with elements in the bin, now that T is known
        inside = [position for position in range(len(tensors.specs)) if counts.inside[position]]
        again = _split_at_boundary(tensors, inside, boundary, masks, stream)
        counts.kept[inside] = again.kept[inside]
        ties, tie_offsets = _ties_found(again, len(tensors.specs))
        chunk_ties = again.chunk_ties
    # Ties are pruned earliest first in the global order: a tensor prunes its first `pruned_here`.
    global_ties = np.zeros(slot_count, dtype=np.int64)
    np.add.at(global_ties, slots, ties)
    global_ties = world.allreduce_sum(global_ties)
    ties_before = (np.cumsum(global_ties) - global_ties)[slots]
    pruned_here = np.clip(k - below_high - below_low - ties_before, 0, ties).astype(np.int64)
    counts.kept += ties - pruned_here
    if tie_offsets is not None:
        for position, offsets in tie_offsets.items():
            _set_bits(masks[position], offsets[pruned_here[position] :])
    else:  # pass 4: more ties than the budget; read again the tensors that keep some of theirs
        keeping = [position for position in range(len(tensors.specs)) if pruned_here[position] < ties[position]]
        _keep_late_ties(tensors, keeping, boundary, pruned_here, chunk_ties, masks, stream)
    return _Chosen(masks, int(counts.kept.sum()), boundary)


def _all_kept(numel: int) -> np.ndarray:
    """np.packbits of `numel` True values, without making them: 0xFF bytes, zero padding bits."""
    packed = np.full(_packed_size(numel), 0xFF, dtype=np.uint8)
    if numel % 8:
        packed[-1] = (0xFF << (8 - numel % 8)) & 0xFF
    return packed


def _reduce_high_histogram(tensors: _Tensors, world: World, stream: _Streamer) -> tuple[np.ndarray, int]:
    """Pass 1: histogram of the high key digit over all ranks, and the number of -inf; raises on NaN anywhere."""
    counts = _HighCounts(problem=tensors.problem)
    if counts.problem is None:
        try:
            counts = stream.run(tensors, range(len(tensors.specs)), _count_high, _HighCounts)
        except _BadScores as error:
            counts = _HighCounts(problem=str(error))
    reduced = world.allreduce_sum(np.concatenate([counts.histogram, [counts.neginf, counts.problem is not None]]))
    _raise_if_failed(counts.problem, int(reduced[-1]))
    return reduced[:BINS], int(reduced[BINS])


def _count_high(chunk: _Chunk, counts: _HighCounts) -> _HighCounts:
    bits = chunk.values.view(np.int32)
    low, high = _min_max(bits)
    if low >= 0 and high <= INF_KEY:
        # No sign bit and no NaN: the bits already are the keys (the common case, |w|), and the
        # histogram only needs adding up to the highest digit present.
        found = _bincount(bits >> DIGIT_BITS, 0)
        counts.histogram[HALF : HALF + found.size] += found
        return counts
    keys = _keys(bits)
    low, high = _min_max(keys)
    if low < -INF_KEY or high > INF_KEY:
        counts.problem = counts.problem or _nan_message(chunk.spec)
        return counts
    if low == -INF_KEY:
        counts.neginf += int(np.count_nonzero(keys == low))
    counts.histogram += _bincount((keys >> DIGIT_BITS) + HALF, BINS)
    return counts


def _min_max(values: np.ndarray) -> tuple[int, int]:
    low, high = torch.aminmax(torch.from_numpy(values))  # one pass instead of numpy's two
    return int(low), int(high)


def _bincount(digits: np.ndarray, bins: int) -> np.ndarray:
    # torch's bincount takes int32 as it is and releases the GIL; numpy's first copies to int64.
    return torch.bincount(torch.from_numpy(digits), minlength=bins).numpy()


def _keys(bits: np.ndarray) -> np.ndarray:
    """Order-preserving int32 keys: sign-magnitude to two's complement (-0.0 and +0.0 both give 0)."""
    sign = bits >> 31  # 0 or -1
    return (bits ^ (sign & 0x7FFFFFFF)) - sign


def _float_of_key(key: int) -> float:
    bits = key if key >= 0 else (-key) | 0x80000000
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _digit_at_rank(histogram: np.ndarray, k: int) -> tuple[int, int]:
    """The bin holding the k-th smallest element (1-based), and how many elements lie in lower bins."""
    cumulative = np.cumsum(histogram)
    digit = int(np.searchsorted(cumulative, k))  # first bin whose cumulative count reaches k
    return digit, int(cumulative[digit - 1]) if digit else 0


def _split_high_bin(tensors: _Tensors, high_digit: int, masks, stream: _Streamer) -> _Counts:
    """Pass 2: mask bits of the elements outside the high digit's bin, low digits of those inside.

    The bin's bounds are two floats, since float order is key order: elements above it are kept,
    below it pruned; those inside are counted by low digit and retained while the budget lasts.
    """
    first = (high_digit - HALF) << DIGIT_BITS
    floor = np.float32(_float_of_key(max(first, -INF_KEY)))
    ceiling = np.float32(_float_of_key(min(first + BINS - 1, INF_KEY)))
    budget = _Budget(RETAIN_LIMIT)
    work = partial(_split_chunk, floor=floor, ceiling=ceiling, masks=masks, budget=budget)
    counts = stream.run(tensors, range(len(tensors.specs)), work, partial(_Counts.zero, len(tensors.specs)))
    if budget.overdrawn:
        counts.retained = None  # incomplete: pass 3 finds these elements again
    return counts


def _split_chunk(chunk: _Chunk, counts: _Counts, *, floor, ceiling, masks, budget: _Budget) -> _Counts:
    above = chunk.values > ceiling
    at_least = chunk.values >= floor
    _write_bits(masks[chunk.position], chunk.start, above)
    kept = int(np.count_nonzero(above))
    counts.kept[chunk.position] += kept
    if int(np.count_nonzero(at_least)) == kept:
        return counts
    offsets = np.flatnonzero(np.not_equal(above, at_least, out=at_least))  # at least floor, not above ceiling
    digits = (_keys(chunk.values[offsets].view(np.int32)) & (BINS - 1)).astype(np.uint16)
    counts.histogram += np.bincount(digits, minlength=BINS)  # few elements: numpy's is cheaper here
    counts.inside[chunk.position] += offsets.size
    counts.retain(budget, chunk.position, chunk.start, offsets, digits)
    return counts


def _decide_retained(counts: _Counts, low_digit: int, masks) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Set the bits of retained elements above T; per tensor, the number and flat indices of those equal to T."""
    ties = np.zeros(counts.kept.size, dtype=np.int64)
    pieces: dict[int, list[tuple[int, np.ndarray]]] = {}
    for position, start, offsets, digits in counts.retained:
        flat = start + offsets.astype(np.int64)
        above = digits > low_digit
        _set_bits(masks[position], flat[above])
        counts.kept[position] += int(np.count_nonzero(above))
        equal = flat[digits == low_digit]
        ties[position] += equal.size
        pieces.setdefault(position, []).append((start, equal))
    return ties, _in_flat_order(pieces)


def _in_flat_order(pieces: dict[int, list[tuple[int, np.ndarray]]]) -> dict[int, np.ndarray]:
    # Threads finish chunks in any order; each chunk's offsets are already ascending.
    return {position: np.concatenate([flat for _, flat in sorted(chunks, key=operator.itemgetter(0))])
            for position, chunks in pieces.items()}


def _set_bits(mask: np.ndarray, flat: np.ndarray) -> None:
    """Set the packed bits of the given flat indices (first element in the highest bit)."""
    if flat.size:
        np.bitwise_or.at(mask, flat >> 3, (0x80 >> (flat & 7)).astype(np.uint8))


def _split_at_boundary(tensors: _Tensors, positions: list[int], boundary: float, masks, stream: _Streamer) -> _Counts:
    """Pass 3: rewrite the masks of these tensors as score > T, and find the elements equal to T."""
    budget = _Budget(RETAIN_LIMIT)
    work = partial(_split_chunk_at, boundary=np.float32(boundary), masks=masks, budget=budget)
    counts = stream.run(tensors, positions, work, partial(_Counts.zero, len(tensors.specs)))
    if budget.overdrawn:
        counts.retained = None
    return counts


def _split_chunk_at(chunk: _Chunk, counts: _Counts, *, boundary, masks, budget: _Budget) -> _Counts:
    counts = _mask_above(chunk, counts, masks=masks, boundary=boundary)
    equal = np.flatnonzero(chunk.values == boundary)
    if equal.size:
        counts.chunk_ties[(chunk.position, chunk.start)] = equal.size
        counts.retain(budget, chunk.position, chunk.start, equal)
    return counts


def _ties_found(counts: _Counts, tensors: int) -> tuple[np.ndarray, dict[int, np.ndarray] | None]:
    """Per tensor: elements equal to T, and their flat indices (None: too many to keep)."""
    ties = np.zeros(tensors, dtype=np.int64)
    for (position, _), count in counts.chunk_ties.items():
        ties[position] += count
    if counts.retained is None:
        return ties, None
    pieces: dict[int, list[tuple[int, np.ndarray]]] = {}
    for position, start, offsets, _ in counts.retained:
        pieces.setdefault(position, []).append((start, start + offsets.astype(np.int64)))
    return ties, _in_flat_order(pieces)


def _mask_above(chunk: _Chunk, counts: _Counts, *, masks, boundary: np.float32, check_nan: bool = False) -> _Counts:
    """Mask bits score > boundary (-0.0 == +0.0, as for the keys), counting the kept elements."""
    if check_nan and np.isnan(chunk.values).any():
        counts.problem = counts.problem or _nan_message(chunk.spec)
    keep = chunk.values > boundary
    _write_bits(masks[chunk.position], chunk.start, keep)
    counts.kept[chunk.position] += int(np.count_nonzero(keep))
    return counts


def _keep_late_ties(tensors: _Tensors, positions: list[int], boundary: float, pruned_here: np.ndarray,
                    chunk_ties: dict[tuple[int, int], int], masks, stream: _Streamer) -> None:
    """Pass 4: in these tensors, set the bits of the elements equal to T after the first pruned_here."""
    before: dict[tuple[int, int], int] = {}  # ties in earlier chunks of the same tensor
    seen: dict[int, int] = {}
    for position, start in sorted(chunk_ties):
        before[(position, start)] = seen.get(position, 0)
        seen[position] = seen.get(position, 0) + chunk_ties[(position, start)]
    work = partial(_keep_late_ties_chunk, boundary=np.float32(boundary), pruned_here=pruned_here, before=before,
                   masks=masks)
    stream.run(tensors, positions, work, partial(_Counts.zero, len(tensors.specs)))


def _keep_late_ties_chunk(chunk: _Chunk, counts: _Counts, *, boundary, pruned_here, before, masks) -> _Counts:
    if (chunk.position, chunk.start) not in before:
        return counts  # no tie in this chunk: its bits are final
    equal = np.flatnonzero(chunk.values == boundary)
    skip = min(max(int(pruned_here[chunk.position]) - before[(chunk.position, chunk.start)], 0), equal.size)
    keep = chunk.values > boundary
    keep[equal[skip:]] = True
    _write_bits(masks[chunk.position], chunk.start, keep)
    return counts
