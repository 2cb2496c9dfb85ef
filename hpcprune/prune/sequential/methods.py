"""What a block-sequential method is: the statistics it reads, and one layer's decision from them.

    hpcprune prune --config configs/llm_wanda.yaml --set prune.criterion=magnitude

A method (`BlockMethod`) names the statistics of its layer's inputs it needs (kinds of
hpcprune.prune.sequential.input_statistics.STATISTICS, summed exactly over all calibration windows), a
cost that spreads a block's layers over the ranks, and `decide(layer, weight, statistics, rule)`:
the layer's bool mask (True = keep) and, for a method that also changes the kept weights, the new
float32 weight (None otherwise). The engine calls `decide` on the one rank that owns the layer and
sends the result to every rank, so a method may be costly and need not be cheap to repeat.

The mask of a score-based method comes from the project's selection rules (`LayerRule.mask`, through
hpcprune.prune.rules: row, layer, nm), so ties and rounding are those of every other pipeline.
- magnitude: |W|.
- wanda: |W_ij| · ‖X_j‖₂ (Sun et al. 2024), the norms from input_squares; rule row compares within
  each output row, as the paper does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from hpcprune.archive.codec import unpack_mask
from hpcprune.config import PruneConfig
from hpcprune.dist.world import SingleWorld
from hpcprune.prune.calibrate import Statistics
from hpcprune.prune.patterns import rule_options
from hpcprune.prune.plan import Plan, TensorSpec
from hpcprune.prune.rules import select
from hpcprune.prune.scoring import ScoreContext, score_tensor


@dataclass(frozen=True)
class LayerRule:
    """prune.rule as one layer sees it: `row`, `layer` or `nm` at `sparsity` (1 - n/m for nm)."""

    name: str
    sparsity: float
    options: tuple[tuple[str, int], ...] = ()  # (n, m) of rule nm

    @classmethod
    def of(cls, prune: PruneConfig) -> LayerRule:
        return cls(prune.rule, prune.sparsity, tuple(sorted(rule_options(prune).items())))

    def mask(self, spec: TensorSpec, scores: torch.Tensor) -> torch.Tensor:
        """Bool mask (True = keep) of one layer from its float32 scores, low scores pruned first."""
        alone = TensorSpec(0, spec.name, spec.shape)
        chosen = select(self.name, {spec.name: scores.cpu()}, Plan((alone,), (0,)), SingleWorld(),
                        sparsity=self.sparsity, **dict(self.options))
        return unpack_mask(chosen.masks[spec.name], spec.shape)


@dataclass
class Decision:
    mask: torch.Tensor  # bool, the weight's shape, True = keep
    weight: torch.Tensor | None = None  # float32 new weight (zero where pruned), or None: weights unchanged


class BlockMethod(Protocol):
    statistics: tuple[str, ...]

    def cost(self, spec: TensorSpec) -> int:
        """Relative work of deciding this layer (spreads a block's layers over ranks)."""

    def decide(self, spec: TensorSpec, weight: torch.Tensor, statistics: Mapping[str, torch.Tensor],
               rule: LayerRule) -> Decision:
        """The layer's mask (and new weight) from its float32 weight and its float64 input statistics."""


class Magnitude:
    statistics: tuple[str, ...] = ()

    def cost(self, spec: TensorSpec) -> int:
        return spec.numel

    def decide(self, spec, weight, statistics, rule) -> Decision:
        return Decision(rule.mask(spec, score_tensor("magnitude", spec, weight, ScoreContext(seed=0))))


class Wanda:
    statistics: tuple[str, ...] = ("input_squares",)

    def cost(self, spec: TensorSpec) -> int:
        return spec.numel

    def decide(self, spec, weight, statistics, rule) -> Decision:
        norms = statistics["input_squares"].sqrt().to(torch.float32)
        context = ScoreContext(seed=0, statistics=Statistics(input_norms={spec.name: norms}))
        return Decision(rule.mask(spec, score_tensor("wanda", spec, weight, context)))


METHODS: dict[str, BlockMethod] = {
    "magnitude": Magnitude(),
    "wanda": Wanda(),
}
"""prune.criterion under schedule.kind sequential (names in hpcprune.registry.BLOCK_CRITERIA)."""
