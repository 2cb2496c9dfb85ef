"""Step 7 — select: the decision rule that turns scores into masks (bool, True = keep).

    hpcprune prune --config configs/quickstart.yaml --set prune.rule=global --set prune.sparsity=0.9

Rules live in `RULES` (name -> function with the signature of `select` minus the name); adding a
rule touches only that registry. A rule sees only this rank's scores and talks to the other ranks
through `World.allreduce_sum`, so the same code is the single-process case and the cluster case.

The global rule finds the exact k-th smallest score of all ranks without gathering any score. Each
float32 score maps to an int32 key that sorts like the float (sign-magnitude bits to two's
complement: -0.0 and +0.0 share key 0, -inf is the lowest key). Two radix passes of 16-bit digits find
the boundary key T: each pass streams over fixed-size chunks, histograms one digit and sums the
65536 counts over the ranks with one allreduce. One more allreduce of per-tensor tie counts decides
which elements equal to T are pruned: the earliest in the global order (tensor index, then flat
index). Extra memory is a few chunks and histograms per thread, whatever the model size, and the
masks are the same for every world size and owner assignment.

Chunk kernels are numpy on host arrays that share memory with the tensors (on CPU its compare,
select and count kernels are several times faster than torch's), spread over worker threads that
pull chunks one at a time. Scores on another device are copied to the host a chunk at a time and
their masks moved back at the end.
"""

from __future__ import annotations

import math
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial, reduce

import numpy as np
import torch

from hpcprune.plan import Plan, TensorSpec
from hpcprune.world import SingleWorld, World

CHUNK = 1 << 20
"""Elements per streamed chunk; bounds the temporary memory of selection (tests shrink it)."""

DIGIT_BITS = 16
BINS = 1 << DIGIT_BITS
HALF = BINS // 2  # bin index of key 0's high digit: negative keys fill the lower half
INF_KEY = 0x7F800000  # key of +inf; -inf is -INF_KEY; every key beyond these is a NaN
RETAIN_LIMIT = 1 << 21
"""Most low digits a worker keeps between pass 2 and tie counting; past it, ties are recounted."""

Scores = dict[str, torch.Tensor]  # tensor name -> float32 scores, for this rank's tensors
Local = list[tuple[TensorSpec, torch.Tensor]]  # this rank's (spec, flat scores), in global order


@dataclass
class Selection:
    masks: dict[str, torch.Tensor]  # this rank's tensors only (plan.local(rank)), bool, True = keep
    threshold: float | None  # boundary score T: < T pruned, > T kept, == T by position; None: none pruned / n.a.
    kept: int  # kept elements over all prunable tensors of all ranks
    total: int  # plan.total


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
    local = _local_scores(scores, plan, world)
    k = prune_count(sparsity, plan.total)
    masks, kept, boundary = _smallest(local, k, world, slots=len(plan.tensors))
    return _finish(local, masks, kept, boundary, plan, world, problem=None)


def select_layer(
    scores: Scores, plan: Plan, world: World, *, sparsity: float, threshold: float | None = None
) -> Selection:
    """Prune the same fraction of every tensor: its prune_count(sparsity, numel) smallest scores."""
    local = _local_scores(scores, plan, world)
    masks, kept, problem = [], 0, None
    for spec, flat in local:
        try:  # a bad tensor must still let this rank reach the collective in _finish
            tensor_masks, tensor_kept, _ = _smallest(
                [(spec, flat)], prune_count(sparsity, spec.numel), SingleWorld(), slots=1, slot=0
            )
        except ValueError as error:
            problem = str(error)
            break
        masks += tensor_masks
        kept += tensor_kept
    return _finish(local, masks, kept, None, plan, world, problem=problem)


def select_threshold(
    scores: Scores, plan: Plan, world: World, *, sparsity: float, threshold: float | None = None
) -> Selection:
    """Prune every element whose score is <= threshold."""
    if threshold is None or math.isnan(threshold):
        raise ValueError("rule 'threshold' needs a threshold (prune.threshold)")
    local = _local_scores(scores, plan, world)
    masks, counts = _masks_above(local, float(threshold), check_nan=True)
    return _finish(local, masks, counts.kept, float(threshold), plan, world, problem=counts.problem)


RULES: dict[str, Callable[..., Selection]] = {
    "global": select_global,
    "layer": select_layer,
    "threshold": select_threshold,
}


# --- shared plumbing ---------------------------------------------------------------------------------


def _local_scores(scores: Scores, plan: Plan, world: World) -> Local:
    """This rank's scores in global order, flattened (views: no copy of contiguous tensors)."""
    specs = plan.local(world.rank)
    expected = {spec.name for spec in specs}
    if set(scores) != expected:
        missing, extra = sorted(expected - set(scores)), sorted(set(scores) - expected)
        raise ValueError(f"rank {world.rank}: scores do not match the plan (missing {missing}, unexpected {extra})")
    local = []
    for spec in specs:
        score = scores[spec.name]
        if score.dtype != torch.float32 or tuple(score.shape) != spec.shape:
            raise ValueError(
                f"scores[{spec.name!r}] must be float32 of shape {spec.shape}, got {score.dtype} {tuple(score.shape)}"
            )
        local.append((spec, score.detach().reshape(-1)))
    return local


def _finish(local: Local, masks, kept: int, boundary, plan: Plan, world: World, *, problem) -> Selection:
    """Sum kept counts over ranks with one allreduce that also tells every rank about any failure."""
    kept_total, failures = world.allreduce_sum(np.array([kept, problem is not None], dtype=np.int64))
    _raise_if_failed(problem, int(failures))
    named = {spec.name: mask.view(spec.shape).to(flat.device) for (spec, flat), mask in zip(local, masks)}
    return Selection(masks=named, threshold=boundary, kept=int(kept_total), total=plan.total)


def _raise_if_failed(problem: str | None, failures: int) -> None:
    # Every rank raises together, so none is left waiting in a later collective.
    if problem is not None:
        raise ValueError(problem)
    if failures:
        raise ValueError("scores contain NaN on another rank")


def _nan_message(spec: TensorSpec) -> str:
    return f"scores[{spec.name!r}] contain NaN"


def _host_chunk(flat: torch.Tensor, start: int) -> np.ndarray:
    """Elements [start, start + CHUNK) as a float32 array (a view for CPU tensors)."""
    piece = flat[start : start + CHUNK]
    return piece.numpy() if piece.device.type == "cpu" else piece.cpu().numpy()


def _chunk_jobs(local: Local) -> list[tuple[int, TensorSpec, torch.Tensor, int]]:
    """(position in local, spec, flat, start) for every chunk of this rank's tensors."""
    return [(i, spec, flat, start) for i, (spec, flat) in enumerate(local) for start in range(0, flat.numel(), CHUNK)]


def _parallel_sum(work: Callable, jobs: list, zero: Callable):
    """Sum over threads of work(job, total) accumulated over the jobs each thread pulled.

    Threads pull one job at a time, so a busy core simply does fewer; torch runs single-threaded
    meanwhile (a process-wide setting, restored on the way out), so its kernels (bincount, aminmax)
    do not start an intra-op pool that competes with these threads for the cores.
    """
    threads = torch.get_num_threads()
    workers = min(threads, len(jobs))
    pending, lock = iter(jobs), threading.Lock()

    def drain():
        total = zero()
        while True:
            with lock:
                job = next(pending, None)
            if job is None:
                return total
            total = work(job, total)

    if workers <= 1:
        return drain()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            parts = [future.result() for future in [pool.submit(drain) for _ in range(workers)]]
    finally:
        torch.set_num_threads(threads)
    return reduce(lambda a, b: a + b, parts)


@dataclass
class _MaskCounts:
    kept: int = 0
    problem: str | None = None

    def __add__(self, other: _MaskCounts) -> _MaskCounts:
        return _MaskCounts(self.kept + other.kept, self.problem or other.problem)


def _masks_above(local: Local, boundary: float, *, check_nan: bool = False) -> tuple[list[torch.Tensor], _MaskCounts]:
    """Host bool masks score > boundary (-0.0 == +0.0, as for the keys), and how many are True."""
    masks = [torch.empty(flat.numel(), dtype=torch.bool) for _, flat in local]
    outs = [mask.numpy() for mask in masks]
    bound = np.float32(boundary)

    def work(job, counts: _MaskCounts) -> _MaskCounts:
        position, spec, flat, start = job
        chunk = _host_chunk(flat, start)
        if check_nan and np.isnan(chunk).any():
            counts.problem = counts.problem or _nan_message(spec)
        out = outs[position][start : start + chunk.size]
        np.greater(chunk, bound, out=out)
        counts.kept += int(np.count_nonzero(out))
        return counts

    return masks, _parallel_sum(work, _chunk_jobs(local), _MaskCounts)


# --- exact k smallest by radix selection ------------------------------------------------------------


def _smallest(local: Local, k: int, world: World, *, slots: int, slot: int | None = None):
    """Masks pruning the k smallest scores of all ranks, ties at the boundary earliest first.

    Ties are counted per slot: spec.index in the global order, or the fixed `slot` when one tensor
    is selected on its own. -inf scores are always pruned, even when there are more than k of them.
    Returns (masks, kept elements of this rank, boundary score or None if nothing is pruned).
    """
    high, neginf = _reduce_high_histogram(local, world)
    k = max(k, neginf)
    if k == 0:
        return [torch.ones(flat.numel(), dtype=torch.bool) for _, flat in local], sum(f.numel() for _, f in local), None
    high_digit, below_high = _digit_at_rank(high, k)
    low = _low_histogram(local, high_digit)
    low_digit, below_low = _digit_at_rank(world.allreduce_sum(low.histogram), k - below_high)
    boundary = _float_of_key(((high_digit - HALF) << DIGIT_BITS) | low_digit)
    positions = [spec.index if slot is None else slot for spec, _ in local]
    ties = _reduce_ties(local, positions, slots, low, low_digit, boundary, world)
    masks, kept = _masks_with_ties(local, positions, ties, k - below_high - below_low, boundary)
    return masks, kept, boundary


@dataclass
class _HighCounts:
    """Pass-1 accumulator: high-digit histogram, number of -inf, first NaN found."""

    histogram: np.ndarray = field(default_factory=lambda: np.zeros(BINS, dtype=np.int64))
    neginf: int = 0
    problem: str | None = None

    def __add__(self, other: _HighCounts) -> _HighCounts:
        return _HighCounts(self.histogram + other.histogram, self.neginf + other.neginf, self.problem or other.problem)


def _reduce_high_histogram(local: Local, world: World) -> tuple[np.ndarray, int]:
    """Histogram of the high key digit over all ranks, and the number of -inf; raises on NaN anywhere."""
    counts = _parallel_sum(_count_high, _chunk_jobs(local), _HighCounts)
    reduced = world.allreduce_sum(np.concatenate([counts.histogram, [counts.neginf, counts.problem is not None]]))
    _raise_if_failed(counts.problem, int(reduced[-1]))
    return reduced[:BINS], int(reduced[BINS])


def _count_high(job, counts: _HighCounts) -> _HighCounts:
    _, spec, flat, start = job
    bits = _host_chunk(flat, start).view(np.int32)
    low, high = _min_max(bits)
    if low >= 0 and high <= INF_KEY:
        # No sign bit and no NaN: the bits already are the keys (the common case, |w|).
        counts.histogram[HALF:] += _bincount(bits >> DIGIT_BITS, HALF)
        return counts
    keys = _keys(bits)
    low, high = _min_max(keys)
    if low < -INF_KEY or high > INF_KEY:
        counts.problem = counts.problem or _nan_message(spec)
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


@dataclass
class _LowCounts:
    """Pass-2 accumulator: low-digit histogram of the candidates, and their digits per tensor while few."""

    histogram: np.ndarray = field(default_factory=lambda: np.zeros(BINS, dtype=np.int64))
    digits: dict[int, list[np.ndarray]] | None = field(default_factory=dict)  # None: too many to keep
    retained: int = 0

    def __add__(self, other: _LowCounts) -> _LowCounts:
        merged = _LowCounts(self.histogram + other.histogram, None, self.retained + other.retained)
        if self.digits is not None and other.digits is not None and merged.retained <= RETAIN_LIMIT:
            merged.digits = {i: self.digits.get(i, []) + other.digits.get(i, []) for i in {*self.digits, *other.digits}}
        return merged


def _low_histogram(local: Local, high_digit: int) -> _LowCounts:
    """Histogram of the low digit over the candidates: elements whose high digit is `high_digit`.

    Candidates are found with two float comparisons, since float order is key order.
    """
    first = (high_digit - HALF) << DIGIT_BITS
    floor = np.float32(_float_of_key(max(first, -INF_KEY)))
    ceiling = np.float32(_float_of_key(min(first + BINS - 1, INF_KEY)))
    return _parallel_sum(partial(_count_low, floor=floor, ceiling=ceiling), _chunk_jobs(local), _LowCounts)


def _count_low(job, counts: _LowCounts, *, floor: np.float32, ceiling: np.float32) -> _LowCounts:
    position, _, flat, start = job
    chunk = _host_chunk(flat, start)
    inside = chunk[(chunk >= floor) & (chunk <= ceiling)]
    if inside.size == 0:
        return counts
    digits = _keys(inside.view(np.int32)) & (BINS - 1)
    counts.histogram += np.bincount(digits, minlength=BINS)  # few candidates: numpy's is cheaper here
    counts.retained += digits.size
    if counts.digits is not None and counts.retained <= RETAIN_LIMIT:
        counts.digits.setdefault(position, []).append(digits)
    else:
        counts.digits = None
    return counts


def _reduce_ties(local: Local, positions, slots: int, low: _LowCounts, low_digit: int, boundary, world) -> np.ndarray:
    """Number of elements equal to the boundary per slot, summed over ranks."""
    if low.digits is not None:
        kept_digits = [low.digits.get(position, []) for position in range(len(local))]
        local_ties = [sum(int(np.count_nonzero(d == low_digit)) for d in digits) for digits in kept_digits]
    else:
        local_ties = list(_count_equal(local, boundary))
    ties = np.zeros(slots, dtype=np.int64)
    np.add.at(ties, positions, local_ties)
    return world.allreduce_sum(ties)


def _count_equal(local: Local, boundary: float) -> np.ndarray:
    """Elements equal to `boundary` in each local tensor (a full pass; used when candidates were many)."""
    bound = np.float32(boundary)

    def work(job, counts: np.ndarray) -> np.ndarray:
        position, _, flat, start = job
        counts[position] += np.count_nonzero(_host_chunk(flat, start) == bound)
        return counts

    return _parallel_sum(work, _chunk_jobs(local), lambda: np.zeros(len(local), dtype=np.int64))


def _masks_with_ties(local: Local, positions, ties: np.ndarray, pruned_ties: int, boundary: float):
    """Keep scores above the boundary, and the ties after the first `pruned_ties` in global order."""
    masks, counts = _masks_above(local, boundary)
    kept = counts.kept
    ties_before = np.cumsum(ties) - ties
    for (_, flat), mask, position in zip(local, masks, positions):
        pruned_here = min(max(pruned_ties - int(ties_before[position]), 0), int(ties[position]))
        if pruned_here < ties[position]:
            kept += _keep_ties_after(mask.numpy(), flat, boundary, pruned_here)
    return masks, kept


def _keep_ties_after(mask: np.ndarray, flat: torch.Tensor, boundary: float, pruned: int) -> int:
    """Set mask True at the elements equal to the boundary after the first `pruned`; how many were set."""
    bound = np.float32(boundary)
    seen = kept = 0
    for start in range(0, flat.numel(), CHUNK):
        equal = _host_chunk(flat, start) == bound
        where = np.flatnonzero(equal)
        skip = min(max(pruned - seen, 0), where.size)
        mask[start + where[skip:]] = True
        seen += where.size
        kept += where.size - skip
    return kept
