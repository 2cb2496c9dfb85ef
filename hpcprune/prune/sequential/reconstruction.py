"""How much of each layer's output pruning lost: ‖WX − ŴX‖² / ‖WX‖² on the calibration inputs.

    hpcprune inspect layers run.h5     # the reconstruction table of a block-sequential round

X is what the layer receives while its block runs pruned on the block's calibration inputs (so it
already carries the pruning of the layers before it in the block), W the dense weight and Ŵ the
pruned (or, for methods that update weights, the updated) one; biases cancel out. Per window the
two squared norms are float64 terms, added exactly over all ranks' windows, so the ratio does not
depend on the world size. A block without calibration windows has no error (NaN).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hpcprune.dist.exact_sum import ExactSum, reduce_exactly
from hpcprune.dist.world import World
from hpcprune.prune.sequential.input_statistics import WindowHooks, input_rows
from hpcprune.prune.sequential.layers import BlockLayer


class ReconstructionErrors(WindowHooks):
    """Hooks on `layers` of the pruned block; `dense` holds their dense weights (float32)."""

    def __init__(self, layers: list[BlockLayer], dense: dict[str, torch.Tensor], windows: int):
        super().__init__(layers)
        self.dense, self.windows = dense, windows
        device = next(iter(dense.values())).device if dense else "cpu"
        self.sums = {layer.spec.name: ExactSum.of((2,), windows, device) for layer in layers}
        self._terms: dict[str, torch.Tensor] = {}

    def _hook(self, layer: BlockLayer):
        name = layer.spec.name

        def add(module, args) -> None:
            rows = input_rows(args[0], self._keep)
            dense = self.dense[name]
            lost = F.linear(rows, dense - module.weight).to(torch.float64).square().sum()
            kept = F.linear(rows, dense).to(torch.float64).square().sum()
            term = torch.stack([lost, kept])
            self._terms[name] = self._terms[name] + term if name in self._terms else term
        return add

    def _end_window(self) -> None:
        for name, term in self._terms.items():
            self.sums[name].add(term)
        self._terms = {}

    def reduce(self, world: World) -> dict[str, float]:
        """Layer name -> error over all ranks' windows (NaN when nothing reached the layer)."""
        totals = reduce_exactly([self.sums[layer.spec.name] for layer in self.layers], world)
        return {layer.spec.name: float(lost / kept) if kept > 0 else math.nan
                for layer, (lost, kept) in zip(self.layers, (total.tolist() for total in totals))}
