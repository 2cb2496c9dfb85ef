"""Exact k smallest scores over all ranks: streaming radix selection on the float bit patterns.

    hpcprune prune --config configs/quickstart.yaml   # prune.rule: global (and layer) use it

The global rule finds the exact k-th smallest score of all ranks without gathering any score. Each
float32 score maps to an int32 key that sorts like the float (sign-magnitude bits to two's
complement: -0.0 and +0.0 share key 0, -inf is the lowest key). Two radix passes of 16-bit digits
find the boundary key T, each streaming fixed-size chunks and summing a 65536-bin histogram over the
ranks with one allreduce:

  pass 1  histogram of the high digit (plus NaN and -inf counts): the bin that holds T;
  pass 2  the final mask bits of every element outside that bin, and the low digits of the
          elements inside it, kept with their positions: up to RETAIN_LIMIT per rank in memory,
          then in a spill file (hpcprune.prune.spill) up to SPILL_SHARE of the rank's elements.

T and the per-tensor counts of elements equal to T (summed over ranks in one allreduce) then decide
the kept elements without reading any score again: below T pruned, above kept, equal to T pruned
earliest first in the global order (tensor index, then flat index). A rank whose bin holds more
elements than it may keep reads the tensors that have some once more, once T is known (pass 3),
keeping the positions of the elements equal to T; only if those are more than RETAIN_LIMIT does
it read the tensors that keep some of them a last time (pass 4). So memory stays bounded whatever
the model, a checkpoint larger than memory is read from disk twice, not three times (the bin of
a large model holds millions of elements), and the masks are the same for every world size and
owner assignment.

Chunk kernels are numpy on host arrays that share memory with the tensors (on CPU its compare,
select and count kernels are several times faster than torch's), spread over worker threads that
pull the chunks of the tensor being read one at a time. Scores on another device are copied to the
host a chunk at a time.
"""

from __future__ import annotations

import operator
import struct
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from hpcprune.dist.failures import outcome, shared
from hpcprune.dist.world import World
from hpcprune.prune.mask_store import MaskStore
from hpcprune.prune.streaming import (
    BINS,
    DIGIT_BITS,
    HALF,
    INF_KEY,
    Budget,
    Chunk,
    Counts,
    HighCounts,
    Streamer,
    Tensors,
    as_failure,
    nan_message,
    raise_if_failed,
    unpack,
    write_bits,
)

RETAIN_LIMIT = 1 << 20
"""Most elements a rank keeps in memory (6 bytes each) between passes instead of reading the scores again."""

SPILL_SHARE = 1 / 8
"""Most elements pass 2 writes to its spill file beyond RETAIN_LIMIT, as a share of the rank's
elements: 6 bytes each written and read back, against 4 bytes of every score read again by pass 3."""


# --- exact k smallest by radix selection ------------------------------------------------------------


@dataclass
class _Chosen:
    masks: MaskStore  # packed, per tensor position
    kept: int  # kept elements of this rank
    boundary: float | None  # T, or None when nothing is pruned


def smallest(tensors: Tensors, k: int, world: World, stream: Streamer, *, slots: list[int], slot_count: int):
    """Masks pruning the k smallest scores of all ranks, ties at the boundary earliest first.

    Ties are ordered by slot (spec.index in the global order, or 0 for a tensor selected on its own)
    and then by flat index. -inf scores are always pruned, even when there are more than k of them.
    """
    high, neginf = _reduce_high_histogram(tensors, world, stream)
    k = max(k, neginf)
    masks = tensors.empty_masks()
    if k == 0:
        for position, spec in enumerate(tensors.specs):
            _keep_all(masks[position], spec.numel)
        return _Chosen(masks, sum(s.numel for s in tensors.specs), None)
    high_digit, below_high = _digit_at_rank(high, k)
    spill_limit = int(SPILL_SHARE * sum(spec.numel for spec in tensors.specs))
    with Budget(RETAIN_LIMIT, spill_limit) as budget:
        counts = _split_high_bin(tensors, high_digit, masks, stream, budget)
        low_digit, below_low = _digit_at_rank(world.allreduce_sum(counts.histogram), k - below_high)
        if counts.retained is not None:
            ties, tie_offsets, chunk_ties = _decide_retained(counts, low_digit, masks)
    boundary = _float_of_key(((high_digit - HALF) << DIGIT_BITS) | low_digit)
    if counts.retained is None:  # pass 3: read again the tensors with elements in the bin, now that T is known
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


def _keep_all(mask: np.ndarray, numel: int) -> None:
    """Write np.packbits of `numel` True values into `mask`, without making them: 0xFF bytes, zero padding bits."""
    mask.fill(0xFF)
    if numel % 8:
        mask[-1] = (0xFF << (8 - numel % 8)) & 0xFF


def _reduce_high_histogram(tensors: Tensors, world: World, stream: Streamer) -> tuple[np.ndarray, int]:
    """Pass 1: histogram of the high key digit over all ranks, and the number of -inf; raises on NaN anywhere."""
    counts = HighCounts(problem=tensors.problem)
    if counts.problem is None:
        try:  # the pass that reads (and scores) every tensor first: whatever fails, every rank must hear of it
            counts = stream.run(tensors, range(len(tensors.specs)), _count_high, HighCounts)
        except Exception as error:
            counts = HighCounts(problem=shared(world, error))
    failure = as_failure(counts.problem)
    reduced = world.allreduce_sum(np.concatenate([counts.histogram, [counts.neginf], outcome(world, failure)]))
    raise_if_failed(world, failure, reduced[BINS + 1:])
    return reduced[:BINS], int(reduced[BINS])


def _count_high(chunk: Chunk, counts: HighCounts) -> HighCounts:
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
        counts.problem = counts.problem or nan_message(chunk.spec)
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


def _split_high_bin(tensors: Tensors, high_digit: int, masks, stream: Streamer, budget: Budget) -> Counts:
    """Pass 2: mask bits of the elements outside the high digit's bin, low digits of those inside.

    The bin's bounds are two floats, since float order is key order: elements above it are kept,
    below it pruned; those inside are counted by low digit and retained while the budget lasts.
    """
    first = (high_digit - HALF) << DIGIT_BITS
    floor = np.float32(_float_of_key(max(first, -INF_KEY)))
    ceiling = np.float32(_float_of_key(min(first + BINS - 1, INF_KEY)))
    work = partial(_split_chunk, floor=floor, ceiling=ceiling, masks=masks, budget=budget)
    counts = stream.run(tensors, range(len(tensors.specs)), work, partial(Counts.zero, len(tensors.specs)))
    if budget.overdrawn:
        counts.retained = None  # incomplete: pass 3 finds these elements again
    return counts


def _split_chunk(chunk: Chunk, counts: Counts, *, floor, ceiling, masks, budget: Budget) -> Counts:
    above = chunk.values > ceiling
    at_least = chunk.values >= floor
    write_bits(masks[chunk.position], chunk.start, above)
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


def _decide_retained(counts: Counts, low_digit: int, masks):
    """Set the bits of retained elements above T. Of those equal to T: the number per tensor, the
    number per chunk (for pass 4), and the flat indices per tensor while they fit in RETAIN_LIMIT
    (None beyond: spilled elements can hold more ties than memory may)."""
    ties = np.zeros(counts.kept.size, dtype=np.int64)
    chunk_ties: dict[tuple[int, int], int] = {}
    pieces: dict[int, list[tuple[int, np.ndarray]]] | None = {}
    held = 0  # flat indices of ties in pieces
    # Tensor by tensor: a mask kept on disk is then read back once, not once per chunk.
    for position, start, kept in sorted(counts.retained, key=operator.itemgetter(0, 1)):
        offsets, digits = unpack(kept)
        flat = start + offsets.astype(np.int64)
        above = digits > low_digit
        _set_bits(masks[position], flat[above])
        counts.kept[position] += int(np.count_nonzero(above))
        equal = flat[digits == low_digit]
        if not equal.size:
            continue
        ties[position] += equal.size
        chunk_ties[(position, start)] = equal.size
        held += equal.size
        if pieces is not None and held <= RETAIN_LIMIT:
            pieces.setdefault(position, []).append((start, equal))
        else:
            pieces = None  # too many to hold: pass 4 finds the late ones again
    return ties, None if pieces is None else _in_flat_order(pieces), chunk_ties


def _in_flat_order(pieces: dict[int, list[tuple[int, np.ndarray]]]) -> dict[int, np.ndarray]:
    # Threads finish chunks in any order; each chunk's offsets are already ascending.
    return {position: np.concatenate([flat for _, flat in sorted(chunks, key=operator.itemgetter(0))])
            for position, chunks in pieces.items()}


def _set_bits(mask: np.ndarray, flat: np.ndarray) -> None:
    """Set the packed bits of the given flat indices (first element in the highest bit)."""
    if flat.size:
        np.bitwise_or.at(mask, flat >> 3, (0x80 >> (flat & 7)).astype(np.uint8))


def _split_at_boundary(tensors: Tensors, positions: list[int], boundary: float, masks, stream: Streamer) -> Counts:
    """Pass 3: rewrite the masks of these tensors as score > T, and find the elements equal to T."""
    budget = Budget(RETAIN_LIMIT)
    work = partial(_split_chunk_at, boundary=np.float32(boundary), masks=masks, budget=budget)
    counts = stream.run(tensors, positions, work, partial(Counts.zero, len(tensors.specs)))
    if budget.overdrawn:
        counts.retained = None
    return counts


def _split_chunk_at(chunk: Chunk, counts: Counts, *, boundary, masks, budget: Budget) -> Counts:
    counts = mask_above(chunk, counts, masks=masks, boundary=boundary)
    equal = np.flatnonzero(chunk.values == boundary)
    if equal.size:
        counts.chunk_ties[(chunk.position, chunk.start)] = equal.size
        counts.retain(budget, chunk.position, chunk.start, equal)
    return counts


def _ties_found(counts: Counts, tensors: int) -> tuple[np.ndarray, dict[int, np.ndarray] | None]:
    """Per tensor: elements equal to T, and their flat indices (None: too many to keep)."""
    ties = np.zeros(tensors, dtype=np.int64)
    for (position, _), count in counts.chunk_ties.items():
        ties[position] += count
    if counts.retained is None:
        return ties, None
    pieces: dict[int, list[tuple[int, np.ndarray]]] = {}
    for position, start, kept in counts.retained:
        offsets, _ = unpack(kept)
        pieces.setdefault(position, []).append((start, start + offsets.astype(np.int64)))
    return ties, _in_flat_order(pieces)


def mask_above(chunk: Chunk, counts: Counts, *, masks, boundary: np.float32, check_nan: bool = False) -> Counts:
    """Mask bits score > boundary (-0.0 == +0.0, as for the keys), counting the kept elements."""
    if check_nan and np.isnan(chunk.values).any():
        counts.problem = counts.problem or nan_message(chunk.spec)
    keep = chunk.values > boundary
    write_bits(masks[chunk.position], chunk.start, keep)
    counts.kept[chunk.position] += int(np.count_nonzero(keep))
    return counts


def _keep_late_ties(tensors: Tensors, positions: list[int], boundary: float, pruned_here: np.ndarray,
                    chunk_ties: dict[tuple[int, int], int], masks, stream: Streamer) -> None:
    """Pass 4: in these tensors, set the bits of the elements equal to T after the first pruned_here."""
    before: dict[tuple[int, int], int] = {}  # ties in earlier chunks of the same tensor
    seen: dict[int, int] = {}
    for position, start in sorted(chunk_ties):
        before[(position, start)] = seen.get(position, 0)
        seen[position] = seen.get(position, 0) + chunk_ties[(position, start)]
    work = partial(_keep_late_ties_chunk, boundary=np.float32(boundary), pruned_here=pruned_here, before=before,
                   masks=masks)
    stream.run(tensors, positions, work, partial(Counts.zero, len(tensors.specs)))


def _keep_late_ties_chunk(chunk: Chunk, counts: Counts, *, boundary, pruned_here, before, masks) -> Counts:
    if (chunk.position, chunk.start) not in before:
        return counts  # no tie in this chunk: its bits are final
    equal = np.flatnonzero(chunk.values == boundary)
    skip = min(max(int(pruned_here[chunk.position]) - before[(chunk.position, chunk.start)], 0), equal.size)
    keep = chunk.values > boundary
    keep[equal[skip:]] = True
    write_bits(masks[chunk.position], chunk.start, keep)
    return counts
