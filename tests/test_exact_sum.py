"""Exact sums over ranks (hpcprune.dist.exact_sum): the same bits for any grouping of the terms.

    python -m pytest tests/test_exact_sum.py

A rank's share of the terms is simulated by adding a subset of them to one ExactSum; the integers
of all "ranks" are then added as the allreduce adds them (`reduce_exactly` does that over a World;
the distributed tests run it under mpirun and torchrun).
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from hpcprune.dist.exact_sum import (
    ExactSum,
    SpreadTooWide,
    agree_on_scales,
    reduce_exactly,
)
from hpcprune.dist.world import SingleWorld


def shared_total(terms: list[torch.Tensor], groups: list[list[int]], mantissa_bits: int | None = None) -> np.ndarray:
    """What the ranks holding `groups` of the terms end with: integers added at the common base."""
    ranks = []
    for group in groups:
        total = ExactSum.of(terms[0].shape, len(terms))
        if mantissa_bits is not None:
            total.mantissa_bits = mantissa_bits
        for index in group:
            total.add(terms[index])
        assert total.problem is None
        ranks.append(total)
    base = min(rank.base for rank in ranks if rank.base is not None)
    return np.ldexp(sum(rank.at_base(base) for rank in ranks).astype(np.float64), base)


def random_terms(count: int, shape: tuple[int, ...], seed: int, decades: float = 1.0) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    return [torch.from_numpy(rng.standard_normal(shape) * 10 ** rng.uniform(-decades, decades)) for _ in range(count)]


@pytest.mark.parametrize("ranks", [2, 3, 4, 7, 64])
def test_any_split_of_the_terms_gives_the_same_bits(ranks):
    terms = random_terms(64, (6, 5), seed=ranks)
    alone = shared_total(terms, [list(range(64))])
    order = list(range(64))
    random.Random(ranks).shuffle(order)
    assert np.array_equal(shared_total(terms, [order[rank::ranks] for rank in range(ranks)]), alone)
    assert np.array_equal(shared_total(terms, [order[::-1]]), alone)


def test_the_total_is_the_true_sum_to_far_better_than_float32():
    terms = random_terms(64, (4, 4), seed=1)
    truth = np.array([[math.fsum(float(term[i, j]) for term in terms) for j in range(4)] for i in range(4)])
    total = shared_total(terms, [list(range(64))])
    assert np.max(np.abs(total - truth) / np.abs(truth).max()) < 1e-12


def test_a_float64_allreduce_would_not_give_the_same_bits():
    """Why the fixed point: summing the same float64 terms in another grouping changes last bits."""
    terms = random_terms(64, (50,), seed=2, decades=3)
    sequential = sum(term.numpy() for term in terms)
    grouped = sum(sum(term.numpy() for term in terms[rank::3]) for rank in range(3))
    assert not np.array_equal(sequential, grouped)
    exact_terms = random_terms(64, (50,), seed=2, decades=0.5)
    assert np.array_equal(shared_total(exact_terms, [list(range(64))]),
                          shared_total(exact_terms, [list(range(r, 64, 3)) for r in range(3)]))


def test_a_single_world_reduction_and_empty_sums():
    total = ExactSum.of((3,), 4)
    total.add(torch.tensor([1.0, 2.0, 3.0]))
    total.add(torch.tensor([0.5, 0.0, -3.0]))
    empty = ExactSum.of((2,), 4)
    got, nothing = reduce_exactly([total, empty], SingleWorld())
    assert got.tolist() == [1.5, 2.0, 0.0] and nothing.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("order", [1, -1], ids=["small-first", "large-first"])
def test_a_spread_too_wide_is_refused_with_the_bits_that_would_do(order):
    """Refused in either order: a finer term that arrives after a coarse one must not be dropped silently."""
    terms = [torch.tensor([1.0]), torch.tensor([2.0 ** 30])][::order]
    total = ExactSum.of((1,), 2)
    for term in terms:
        total.add(term)
    with pytest.raises(SpreadTooWide) as refused:
        reduce_exactly([total], SingleWorld())
    retried = ExactSum((1,), 2, refused.value.mantissa_bits)
    for term in terms:
        retried.add(term)
    assert reduce_exactly([retried], SingleWorld())[0].item() == 2.0 ** 30 + 1


def test_a_non_finite_term_is_reported_in_the_agreement():
    total = ExactSum.of((2,), 2)
    total.add(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="NaN or infinite"):
        agree_on_scales([total], SingleWorld())


def test_terms_near_the_smallest_float64_scales_stay_inside_the_exponent_table():
    total = ExactSum.of((2,), 3)
    total.add(torch.tensor([2.0 ** -1000, 0.0], dtype=torch.float64))
    total.add(torch.tensor([2.0 ** -999, 2.0 ** -1000], dtype=torch.float64))
    assert reduce_exactly([total], SingleWorld())[0].tolist() == [3 * 2.0 ** -1000, 2.0 ** -1000]
