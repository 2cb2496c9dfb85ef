"""The dense pass's statistics: calibration windows in groups (a group sits whole on one rank and is
one term of the exact sums), and a forward that stops once every layer has read its input.

    python -m pytest -q tests/test_window_groups.py

The bits of the totals under several ranks are compared under real launchers in
tests/test_sequential_ranks.py (case llama-sparsegpt-grouped); here: which rank gets which window,
the default group size, and that a group's windows enter the exact sum as one float64 sum.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hpcprune.dist.exact_sum import ExactSum, reduce_exactly
from hpcprune.dist.world import SingleWorld
from hpcprune.prune.plan import TensorSpec
from hpcprune.prune.sequential.gram import add_gram, packed, unpacked
from hpcprune.prune.sequential.input_statistics import AllInputsSeen, InputStatistics, windows_per_term
from hpcprune.prune.sequential.layers import BlockLayer
from hpcprune.run.sequential_streams import TextWindows


@pytest.mark.parametrize("group", [1, 2, 3])
@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_each_group_goes_whole_to_rank_group_mod_world_size(group, ranks):
    text = TextWindows(torch.zeros(11, 4, dtype=torch.int64), group=group)
    shares = [text.mine(SimpleNamespace(rank=rank, size=ranks)) for rank in range(ranks)]
    assert sorted(window for share in shares for window in share) == list(range(11))
    for rank, share in enumerate(shares):
        assert share == sorted(share)
        assert all((window // group) % ranks == rank for window in share)


@pytest.mark.parametrize(("windows", "configured", "expected"),
                         [(7, None, 1), (31, None, 1), (32, None, 2), (63, None, 3), (64, None, 4), (4096, None, 4),
                          (7, 2, 2), (64, 1, 1)])
def test_the_default_group_leaves_at_least_16_groups_and_holds_at_most_4_windows(windows, configured, expected):
    assert windows_per_term(windows, configured) == expected


def _statistics(windows: list[torch.Tensor], group: int, indices: list[int] | None = None) -> dict:
    """The reduced Hessian of one Linear layer that reads `windows` (at `indices` among 7 windows)."""
    layer = nn.Linear(5, 3, bias=False)
    statistics = InputStatistics([BlockLayer(TensorSpec(0, "only", (3, 5)), layer)], ("hessian",), 7,
                                 torch.device("cpu"), group=group)
    with torch.no_grad(), statistics:
        for position, hidden in enumerate(windows):
            with statistics.window(None, None if indices is None else indices[position]):
                layer(hidden)
    (sum_,) = statistics.sums.values()
    return {"terms": sum_.terms, "total": statistics.reduce(SingleWorld())["only"]["hessian"]}


def _exact(terms: list[torch.Tensor], count: int) -> torch.Tensor:
    """The exact sum of `terms` as terms, divided by the 7 windows (H = 2/N·ΣXᵀX)."""
    total = ExactSum.of((5, 5), count)
    for term in terms:
        total.add(term)
    return reduce_exactly([total], SingleWorld())[0] / 7


def _float64_sum(windows: list[torch.Tensor]) -> torch.Tensor:
    """2XᵀX of windows added one by one into one float64 sum, as a group adds them."""
    total = None
    for hidden in windows:
        total = add_gram(total, hidden[0])
    return unpacked(packed(total), windows[0].shape[-1]).mul_(2.0)


def _window_terms(windows: list[torch.Tensor]) -> list[torch.Tensor]:
    return [_float64_sum([hidden]) for hidden in windows]


def test_a_group_is_one_term_the_float64_sum_of_its_windows_in_order():
    generator = torch.Generator().manual_seed(3)
    # Windows of different scales, so that adding them one by one as exact terms and adding each
    # group in float64 first give different bits: the test can tell which happened.
    windows = [torch.randn(1, 6, 5, generator=generator) * (1.0, 3.0, 7.0)[window % 3] for window in range(7)]
    terms = _window_terms(windows)
    grouped = _statistics(windows, group=3)
    assert grouped["terms"] == 3
    expected = _exact([_float64_sum(windows[first:first + 3]) for first in range(0, 7, 3)], 3)
    assert torch.equal(grouped["total"], expected)
    assert not torch.equal(expected, _exact(terms, 7))  # the grouping shows in the bits
    assert torch.equal(_statistics(windows, group=1)["total"], _exact(terms, 7))


def test_a_rank_holding_a_group_apart_from_the_one_before_it_starts_a_new_term():
    """Rank 1 of 2 with groups of 2 holds windows 2, 3 and 6: two groups, not one run of three."""
    generator = torch.Generator().manual_seed(4)
    windows = [torch.randn(1, 4, 5, generator=generator) * scale for scale in (1.0, 5.0, 0.3)]
    terms = _window_terms(windows)
    measured = _statistics(windows, group=2, indices=[2, 3, 6])["total"]
    assert torch.equal(measured, _exact([_float64_sum(windows[:2]), terms[2]], 4))
    assert not torch.equal(measured, _exact([_float64_sum(windows)], 4))


def test_a_forward_stopped_once_every_layer_has_read_its_input_gives_the_same_statistics():
    """The last layer's product is what the stop saves: it never runs, and the sums do not change."""
    generator = torch.Generator().manual_seed(5)
    block = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    windows = [torch.randn(1, 6, 5, generator=generator) for _ in range(5)]
    last_ran = []
    block[2].register_forward_hook(lambda *_: last_ran.append(True))
    totals = {}
    for stop in (False, True):
        last_ran.clear()
        layers = [BlockLayer(TensorSpec(0, "first", (4, 5)), block[0]), BlockLayer(TensorSpec(1, "last", (3, 4)), block[2])]
        statistics = InputStatistics(layers, ("hessian", "input_squares"), 5, torch.device("cpu"), group=2,
                                     stop_early=stop)
        with torch.no_grad(), statistics:
            for index, hidden in enumerate(windows):
                with statistics.window(None, index):
                    try:
                        block(hidden)
                    except AllInputsSeen:
                        assert stop
        assert len(last_ran) == (0 if stop else len(windows))
        totals[stop] = statistics.reduce(SingleWorld())
    for name in ("first", "last"):
        for kind in ("hessian", "input_squares"):
            assert torch.equal(totals[True][name][kind], totals[False][name][kind])
