"""Layer protection: a minimum density per tensor under the global rule, so no layer collapses.

    hpcprune prune --config configs/fmnist_lenet5_protected.yaml      # prune.min_density: 0.05

A global threshold on magnitudes can empty a small layer whose weights happen to be small. With
`prune.min_density: d`, every tensor first sets aside its ceil(d * numel) highest scores (ties:
the later positions, mirroring the rule that prunes the earlier ones first) by giving them the score
+inf, and the exact global selection then never reaches them. Each tensor decides its protected set
alone, so the masks stay independent of the world size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch

from hpcprune.archive.codec import unpack_mask
from hpcprune.dist.world import SingleWorld
from hpcprune.errors import UsageError
from hpcprune.prune.plan import Plan
from hpcprune.prune.radix import smallest
from hpcprune.prune.selection import prune_count
from hpcprune.prune.streaming import Scores, Streamer, Tensors


def protected_count(numel: int, min_density: float) -> int:
    return math.ceil(min_density * numel)


class ProtectedScores(Mapping[str, torch.Tensor]):
    """`scores` with each tensor's ceil(min_density * numel) highest scores raised to +inf."""

    def __init__(self, scores: Scores, plan: Plan, min_density: float):
        self._scores, self._specs, self._min_density = scores, {spec.name: spec for spec in plan.tensors}, min_density

    def __getitem__(self, name: str) -> torch.Tensor:
        spec = self._specs[name]
        scores = self._scores[name]
        keep = protected_count(spec.numel, self._min_density)
        with Streamer() as stream:
            chosen = smallest(Tensors.holding(spec, scores.reshape(-1)), spec.numel - keep, SingleWorld(), stream,
                              slots=[0], slot_count=1)
        return scores.masked_fill(unpack_mask(chosen.masks[0], spec.shape).to(scores.device), math.inf)

    def __iter__(self) -> Iterator[str]:
        return iter(self._scores)

    def __len__(self) -> int:
        return len(self._scores)


def protect_layers(scores: Scores, plan: Plan, min_density: float, sparsity: float) -> Scores:
    """`scores` as the global rule should see them under `prune.min_density`."""
    if min_density <= 0:
        return scores
    protected = sum(protected_count(spec.numel, min_density) for spec in plan.tensors)
    if protected > plan.total - prune_count(sparsity, plan.total):
        most = 1 - protected / plan.total
        raise UsageError(f"prune.min_density={min_density} keeps {protected} weights: the sparsity can be at most "
                         f"{most:.4f}, not {sparsity}")
    return ProtectedScores(scores, plan, min_density)
