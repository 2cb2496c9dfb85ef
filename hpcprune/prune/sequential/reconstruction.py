"""How much of each layer's output pruning lost: ‖WX − ŴX‖² / ‖WX‖² on the calibration inputs.

    hpcprune inspect layers run.h5     # the reconstruction table of a block-sequential round

X is what the layer receives while its block runs pruned on the block's calibration inputs (so it
already carries the pruning of the layers before it in the block), W the dense weight and Ŵ the
pruned (or, for methods that update weights, the updated) one; biases cancel out. Per window the
two squared norms are float64 terms, added exactly over all ranks' windows, so the ratio does not
depend on the world size. A block without calibration windows has no error (NaN).

One extra matmul per layer and window: a forward hook sees the pruned output ŴX + b the block
computes anyway, so only (W − Ŵ)X is new, and WX = (ŴX + b) − b + (W − Ŵ)X.
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
    """Hooks on `layers` of the pruned block; `dense` holds their dense weights (float32), which
    become W − Ŵ in place (the caller keeps no other use for them: no second copy of the block)."""

    def __init__(self, layers: list[BlockLayer], dense: dict[str, torch.Tensor], windows: int):
        super().__init__(layers)
        with torch.no_grad():
            self.lost = {layer.spec.name: dense[layer.spec.name].sub_(layer.module.weight)
                         for layer in layers if layer.spec.name in dense}
        self.windows = windows
        device = next(iter(dense.values())).device if dense else "cpu"
        self.sums = {layer.spec.name: ExactSum.of((2,), windows, device) for layer in layers}
        self._terms: dict[str, torch.Tensor] = {}

    def _register(self, module, hook):
        return module.register_forward_hook(hook)

    def _hook(self, layer: BlockLayer):
        name = layer.spec.name

        def add(module, args, output) -> None:
            rows = input_rows(args[0], self._keep)
            difference = self.lost[name]  # W − Ŵ, stored as the layer stores its weight
            lost_rows = rows @ difference if layer.transposed else F.linear(rows, difference)  # (W − Ŵ)X
            dense_rows = input_rows(output, self._keep) + lost_rows
            if module.bias is not None:
                dense_rows -= module.bias
            # float64 norms without a float64 copy of the rows; squared, they are the sums of squares
            term = torch.stack([torch.linalg.vector_norm(rows_, dtype=torch.float64) for rows_ in (lost_rows, dense_rows)])
            term.square_()
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
