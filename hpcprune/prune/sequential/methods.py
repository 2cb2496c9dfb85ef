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
- sparsegpt: the OBS solve of hpcprune.prune.sparsegpt (Frantar & Alistarh 2023) on the layer's
  Hessian 2/N·ΣXᵀX: masks chosen by the solve itself (row, layer or nm, exact counts) and the kept
  weights updated; `sparsegpt.damping` and `sparsegpt.block_size` from the config.

`METHODS` maps each name to its class; `block_method(config)` builds the run's method (`of(config)`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.utils.weak import WeakIdKeyDictionary

from hpcprune.archive.codec import unpack_mask
from hpcprune.config import PruneConfig, RunConfig
from hpcprune.dist.world import SingleWorld
from hpcprune.errors import UsageError
from hpcprune.prune.calibrate import Statistics
from hpcprune.prune.patterns import rule_options
from hpcprune.prune.plan import Plan, TensorSpec
from hpcprune.prune.rules import select
from hpcprune.prune.scoring import ScoreContext, score_tensor
from hpcprune.prune.sparsegpt import (
    DEFAULT_BLOCKSIZE,
    DEFAULT_PERCDAMP,
    HessianNotPositiveDefinite,
    InverseHessian,
    SparseGPTRule,
    invert_hessian,
    row_ranges,
    sparsegpt,
)


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
        """Relative work of deciding this layer, or these rows of it (spreads a block's work over ranks)."""

    def row_split(self, spec: TensorSpec, rule: LayerRule, parts: int) -> list[tuple[int, int]] | None:
        """Up to `parts` row ranges that `decide` solves apart with the same bits, or None: never split."""

    def decide(self, spec: TensorSpec, weight: torch.Tensor, statistics: Mapping[str, torch.Tensor],
               rule: LayerRule, rows: tuple[int, int] | None = None) -> Decision:
        """The layer's mask (and new weight) from its float32 weight and its float64 input statistics;
        with `rows`, those of rows [start, end) only."""


class ScoreMethod:
    """A method that scores weights and keeps the rule's mask: no settings, each layer decided whole."""

    @classmethod
    def of(cls, config: RunConfig) -> BlockMethod:
        return cls()

    def row_split(self, spec: TensorSpec, rule: LayerRule, parts: int) -> None:
        return None  # scoring is cheap: never worth a cut


class Magnitude(ScoreMethod):
    statistics: tuple[str, ...] = ()

    def cost(self, spec: TensorSpec) -> int:
        return spec.numel

    def decide(self, spec, weight, statistics, rule, rows=None) -> Decision:
        return Decision(rule.mask(spec, score_tensor("magnitude", spec, weight, ScoreContext(seed=0))))


class Wanda(ScoreMethod):
    statistics: tuple[str, ...] = ("input_squares",)

    def cost(self, spec: TensorSpec) -> int:
        return spec.numel

    def decide(self, spec, weight, statistics, rule, rows=None) -> Decision:
        norms = statistics["input_squares"].sqrt().to(torch.float32)
        context = ScoreContext(seed=0, statistics=Statistics(input_norms={spec.name: norms}))
        return Decision(rule.mask(spec, score_tensor("wanda", spec, weight, context)))


class SparseGPT:
    statistics: tuple[str, ...] = ("hessian",)

    def __init__(self, damping: float = DEFAULT_PERCDAMP, block_size: int = DEFAULT_BLOCKSIZE):
        self.damping, self.block_size = damping, block_size
        # Hessian -> its inverse factor, while the Hessian lives: q, k and v (gate and up) read one
        # input, share one Hessian tensor, and so one factorisation on a rank that solves several.
        self._inverses: WeakIdKeyDictionary = WeakIdKeyDictionary()

    @classmethod
    def of(cls, config: RunConfig) -> SparseGPT:
        return cls(config.sparsegpt.damping, config.sparsegpt.block_size)

    def cost(self, spec: TensorSpec) -> int:
        """Tenths of a nanosecond on one CPU thread, as measured on SmolLM2's shapes: the column sweep
        (~350 ns per weight), the Cholesky factors (~0.1 ns · in³, on every rank solving some rows of
        the layer) and the Python loop over columns (~50 µs per input)."""
        rows, features = spec.shape
        return 3500 * rows * features + features ** 3 + 500_000 * features

    def row_split(self, spec: TensorSpec, rule: LayerRule, parts: int) -> list[tuple[int, int]] | None:
        if rule.name == "layer":  # the block's mask pools all rows
            return None
        return [(start, end) for start, end in row_ranges(spec.shape[0], parts) if end > start]

    def decide(self, spec, weight, statistics, rule, rows=None) -> Decision:
        options = dict(rule.options)
        solve = SparseGPTRule(sparsity=rule.sparsity, selection=rule.name, n=options.get("n", 2), m=options.get("m", 4),
                              blocksize=self.block_size, percdamp=self.damping)
        try:
            solved = sparsegpt(weight, self._inverse(statistics["hessian"]), solve, rows=rows)
        except HessianNotPositiveDefinite as failed:
            raise UsageError(f"{spec.name}: {failed}") from None
        return Decision(solved.keep, solved.weight.to(torch.float32))

    def _inverse(self, hessian: torch.Tensor) -> InverseHessian:
        inverse = self._inverses.get(hessian)
        if inverse is None:
            inverse = self._inverses[hessian] = invert_hessian(hessian, self.damping)
        return inverse


METHODS: dict[str, type] = {
    "magnitude": Magnitude,
    "wanda": Wanda,
    "sparsegpt": SparseGPT,
}
"""prune.criterion under schedule.kind sequential (names in hpcprune.registry.BLOCK_CRITERIA)."""


def block_method(config: RunConfig) -> BlockMethod:
    """The run's method, with its settings from the config."""
    return METHODS[config.prune.criterion].of(config)
