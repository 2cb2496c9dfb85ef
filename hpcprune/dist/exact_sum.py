"""Sums over ranks that give the same bits for any world size and any grouping of the terms.

    mpirun -n 3 hpcprune prune --config configs/llm_wanda.yaml   # same statistics as one process

Floating-point addition is not associative: a float64 allreduce of per-rank sums changes in its
last bits when the terms are split over ranks differently, and a mask decided on those sums can
flip. Here each term (one calibration window's or batch's statistic, computed the same way on
whichever rank holds it) is rounded once, to `mantissa_bits` significant bits at its own
power-of-two scale, and the rounded terms are added as int64 fixed-point numbers. Integer addition
is associative, so the total is the same integer for any order, grouping or number of ranks; it is
turned back into float64 once, at the end. Hand-written because no library offers an
order-independent reduction over MPI and gloo alike.

Precision: a term keeps `mantissa_bits` bits relative to its own largest element (47 for 64 terms;
at least 30 for a million terms, far above the float32 the criteria read). Headroom: a term's
integers are at most 2^mantissa_bits units of its own scale; once every term is expressed in the
finest scale among them (the global base), the total of W terms fits in int64 as long as the terms'
largest elements lie within 2^SPREAD_BITS of each other, since mantissa_bits + log2(W) +
SPREAD_BITS <= 62. `mantissa_bits` leaves that room; a wider spread
is found the same way on every rank (the ranks agree on the largest and smallest exponents before
they add) and raises `SpreadTooWide`, whose `mantissa_bits` a caller may retry with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hpcprune.dist.world import World

SPREAD_BITS = 8
"""Room for terms whose largest elements differ by up to 2^8 (one window's statistic against another's)."""

INT_BITS = 62  # int64 less the sign bit and one bit of slack
# frexp exponents of float64 lie in [-1073, 1024] and a unit lies up to 52 bits below its term's
# exponent (further, after a retry with few bits): index = exponent + OFFSET.
EXPONENTS = 2400
OFFSET = 1200


class SpreadTooWide(ValueError):
    """The terms' scales differ more than the integers have room for; `mantissa_bits` would do."""

    def __init__(self, spread: int, terms: int, mantissa_bits: int):
        self.spread, self.mantissa_bits = spread, mantissa_bits_for(terms, spread)
        super().__init__(f"the terms' largest elements differ by 2^{spread}, more than {mantissa_bits}-bit "
                         f"fixed point holds for {terms} terms; {self.mantissa_bits} bits would")


def mantissa_bits_for(terms: int, spread_bits: int = SPREAD_BITS) -> int:
    """Significant bits a term keeps when `terms` terms are added, leaving room for `spread_bits`."""
    bits = INT_BITS - count_bits(terms) - spread_bits
    return min(bits, 52)  # float64 holds 53 significant bits: more would round back anyway


def count_bits(terms: int) -> int:
    """Bits that a sum of `terms` integers needs beyond the bits of one of them."""
    return math.ceil(math.log2(max(terms, 1) + 1))


@dataclass
class ExactSum:
    """Σ of terms of one shape; `add` each term on the rank that holds it, then `reduce_exactly`."""

    shape: tuple[int, ...]
    terms: int  # most terms over all ranks
    mantissa_bits: int
    device: torch.device | str = "cpu"
    integers: torch.Tensor | None = None  # int64: the terms so far, in units of 2^base
    base: int | None = None  # exponent of the unit (the finest scale among this rank's terms)
    top: int | None = None  # largest frexp exponent of any term's elements on this rank
    finest: int | None = None  # finest scale of any term seen, added or refused (what the ranks agree on)
    problem: str | None = None  # a non-finite term: every rank learns of it in the reduction

    @classmethod
    def of(cls, shape: Sequence[int], terms: int, device: torch.device | str = "cpu") -> ExactSum:
        """A sum of at most `terms` terms over all ranks (the count sets the precision)."""
        return cls(tuple(shape), terms, mantissa_bits_for(terms), device)

    def add(self, term: torch.Tensor, consume: bool = False) -> None:
        """Add one term; `consume`: the caller has no further use for it, so its memory is worked in."""
        term = torch.as_tensor(term).to(device=self.device, dtype=torch.float64)
        if tuple(term.shape) != self.shape:
            raise ValueError(f"term of shape {tuple(term.shape)} added to a sum of shape {self.shape}")
        if not term.numel():
            return
        # One pass for both checks: aminmax gives NaN when any element is NaN, ±inf when one is infinite.
        low, high = (float(end) for end in torch.aminmax(term))
        if not (math.isfinite(low) and math.isfinite(high)):
            self.problem = self.problem or "a statistic is NaN or infinite (non-finite activations or weights)"
            return
        largest = max(-low, high)
        if largest == 0.0:
            return
        exponent = math.frexp(largest)[1]  # largest < 2^exponent
        scale = exponent - self.mantissa_bits
        # The scales of every term, even one refused below, so that the agreement sees the same
        # spread whatever order the terms came in.
        self.top = exponent if self.top is None else max(self.top, exponent)
        self.finest = scale if self.finest is None else min(self.finest, scale)
        if self.problem:
            return
        integers = scaled(term, -scale, in_place=consume).round_().to(torch.int64)
        if self.base is None:
            self.integers, self.base = integers, scale
            return
        if self._spread_exceeded(min(self.base, scale)):
            return
        if scale < self.base:  # in place, as below: the sums of a Hessian are tens of MB
            self.integers <<= self.base - scale
            self.base = scale
        elif scale > self.base:
            integers <<= scale - self.base
        self.integers += integers

    def _spread_exceeded(self, base: int) -> bool:
        """Stop adding (the reduction then raises SpreadTooWide everywhere) before int64 could wrap."""
        if self.top - base + count_bits(self.terms) > INT_BITS:
            self.problem = self.problem or "spread"
            return True
        return False

    def state(self) -> tuple[np.ndarray, np.ndarray]:
        """(exponent histograms, flags) this rank contributes to the agreement on scales."""
        histograms = np.zeros((2, EXPONENTS), dtype=np.int64)
        if self.finest is not None:
            histograms[0, self.finest + OFFSET] = 1
            histograms[1, self.top + OFFSET] = 1
        flags = np.array([self.problem not in (None, "spread"), self.problem == "spread"], dtype=np.int64)
        return histograms, flags

    def at_base(self, base: int) -> np.ndarray:
        """This rank's integers in units of 2^base (base <= self.base: an exact left shift)."""
        if self.integers is None:
            return np.zeros(self.shape, dtype=np.int64)
        return (self.integers << (self.base - base)).cpu().numpy()


def agree_on_scales(sums: Sequence[ExactSum], world: World) -> list[tuple[int | None, int | None]]:
    """(global base, global top) of each sum, from one allreduce; raises what any rank found."""
    states = [total.state() for total in sums]
    histograms = np.stack([h for h, _ in states]) if states else np.zeros((0, 2, EXPONENTS), dtype=np.int64)
    flags = np.stack([f for _, f in states]) if states else np.zeros((0, 2), dtype=np.int64)
    packed = world.allreduce_sum(np.concatenate([histograms.reshape(-1), flags.reshape(-1)]))
    histograms = packed[: histograms.size].reshape(histograms.shape)
    flags = packed[histograms.size:].reshape(flags.shape)
    scales = []
    for total, (bases, tops), (non_finite, _) in zip(sums, histograms, flags):
        if non_finite:
            raise ValueError(f"exact sum: {total.problem or 'another rank found a non-finite statistic'}")
        present = np.flatnonzero(bases)
        if not len(present):
            scales.append((None, None))
            continue
        base, top = int(present[0]) - OFFSET, int(np.flatnonzero(tops)[-1]) - OFFSET
        if top - base + count_bits(total.terms) > INT_BITS:  # W terms of at most 2^(top - base) units each
            raise SpreadTooWide(top - base - total.mantissa_bits, total.terms, total.mantissa_bits)
        scales.append((base, top))
    return scales


def reduce_exactly(sums: Sequence[ExactSum], world: World) -> list[torch.Tensor]:
    """Each sum's total over all ranks, float64 on its device: the same bits for any world size.

    Every rank must call this with the same sums in the same order (one allreduce for the scales,
    then one per sum for the integers)."""
    totals = []
    for total, (base, _) in zip(sums, agree_on_scales(sums, world)):
        if base is None:
            totals.append(torch.zeros(total.shape, dtype=torch.float64, device=total.device))
            continue
        integers = world.allreduce_sum(total.at_base(base))
        value = torch.from_numpy(integers).to(torch.float64)  # rounds once, to nearest
        totals.append(scaled(value, base).to(total.device))
    return totals


def scaled(values: torch.Tensor, exponent: int, in_place: bool = False) -> torch.Tensor:
    """values * 2^exponent (a new tensor; where `in_place`, `values` may be worked in), exact while the
    results are normal floats. One multiply where 2^exponent is a normal float; past that, two half
    steps (2^exponent alone would overflow or lose bits even where the product would not)."""
    if -1022 <= exponent <= 1023:
        return values.mul_(math.ldexp(1.0, exponent)) if in_place else values * math.ldexp(1.0, exponent)
    half = exponent // 2
    for step in (half, exponent - half):
        values = torch.ldexp(values, torch.tensor(step, dtype=torch.float64, device=values.device))
    return values


def sum_kept_terms(terms: Sequence[torch.Tensor], shape: Sequence[int], count: int, world: World,
                   retries: int = 3) -> torch.Tensor:
    """Σ over all ranks of this rank's `terms` (at most `count` terms over all ranks), float64.

    For terms small enough to keep until the reduction: a spread too wide for the default precision
    is retried from them with the bits `SpreadTooWide` names (every rank raises it alike, so every
    rank retries together)."""
    bits = mantissa_bits_for(count)
    for _ in range(retries):
        total = ExactSum(tuple(shape), count, bits)
        for term in terms:
            total.add(term)
        try:
            return reduce_exactly([total], world)[0]
        except SpreadTooWide as refused:
            bits = min(bits, refused.mantissa_bits)
    raise RuntimeError(f"exact sum: the terms' scales still differ too much after {retries} passes")
