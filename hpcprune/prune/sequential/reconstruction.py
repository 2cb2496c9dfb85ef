"""How much of each layer's output pruning lost: ‖WX − ŴX‖² / ‖WX‖² on the calibration inputs.

    hpcprune inspect layers run.h5     # the reconstruction table of a block-sequential round

X is what the layer receives while its block runs pruned on the block's calibration inputs (so it
already carries the pruning of the layers before it in the block), W the dense weight and Ŵ the
pruned (or, for methods that update weights, the updated) one; biases cancel out. Per group of
windows (`sequential.window_group`, whole on one rank, as the input statistics' groups) the two
squared norms are float64 terms, added in window order within the group and exactly over all
groups and ranks, so the ratio does not depend on the world size. A block without calibration
windows has no error (NaN).

Two ways to the same measure, chosen by shape and by the inputs layers share (the dense pass's
agreed leaders), so every rank chooses alike:
- a layer's product: a forward hook sees the pruned output ŴX + b the block computes anyway, so
  only (W − Ŵ)X is new, one matmul per window, and WX = (ŴX + b) − b + (W − Ŵ)X;
- the layers reading one input with, together, at least GRAM_WIDTH times as many outputs as it has
  features (attention's q, k and v, and its o; a gated MLP's gate and up; GPT-2's c_attn, c_fc and
  attention's c_proj):
  G = ΣXᵀX of that input instead, its triangle added up over the group's windows in float32
  (hpcprune.prune.sequential.gram's `add_lower_gram`) and summed exactly like the norms; then
  ‖(W − Ŵ)X‖² = Σ((W − Ŵ)G ∘ (W − Ŵ)) and ‖WX‖² = Σ(WG ∘ W) once per block, float32 products
  summed in float64. The triangle costs in²/2 float32 multiply-adds per position, the products
  Σ out · in; both float32 roads agree with the float64 definition to about 1e-6;
- `known`: layers whose input is the same in the pruned block as in the dense one (those reading
  the block's first Linear input, such as q, k and v) and whose method summed a multiple of its
  Gram matrix already (SparseGPT's Hessian): the same two sums from it, and nothing in the pass.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from hpcprune.dist.exact_sum import ExactSum, reduce_exactly
from hpcprune.dist.world import World
from hpcprune.prune.plan import TensorSpec, assign_owners
from hpcprune.prune.sequential.gram import add_lower_gram, packed_lower, packed_size, unpacked
from hpcprune.prune.sequential.input_statistics import WindowHooks, input_rows
from hpcprune.prune.sequential.layers import BlockLayer

GRAM_WIDTH = 0.5
"""Outputs per input feature, over the layers that read one input, from which their errors come from
the input's Gram matrix: its triangle (in²/2 float32 multiply-adds per position) then costs no more
than their products (Σ out · in)."""


def measured_by_gram(layers: list[BlockLayer], leaders: dict[str, str]) -> set[str]:
    """Names of the layers measured through their input's Gram matrix; `leaders`: layer -> the layer
    whose input it shares (a layer missing from it reads an input of its own)."""
    leader_of = {layer.spec.name: leaders.get(layer.spec.name, layer.spec.name) for layer in layers}
    width: dict[str, int] = {}
    for layer in layers:
        width[leader_of[layer.spec.name]] = width.get(leader_of[layer.spec.name], 0) + layer.linear_spec.shape[0]
    return {layer.spec.name for layer in layers if width[leader_of[layer.spec.name]] >= GRAM_WIDTH * layer.in_features}


class ReconstructionErrors(WindowHooks):
    """Hooks on `layers` of the pruned block; `dense` holds their dense weights (float32), which
    become W − Ŵ in place (the caller keeps no other use for them: no second copy of the block)."""

    def __init__(self, layers: list[BlockLayer], dense: dict[str, torch.Tensor], windows: int,
                 leaders: dict[str, str] | None = None, known: dict[str, torch.Tensor] | None = None,
                 group: int = 1):
        self.known = known or {}  # layer -> a positive multiple of its input's ΣXᵀX, already summed
        self.measured = layers
        super().__init__([layer for layer in layers if layer.spec.name not in self.known], group)  # the others need hooks
        with torch.no_grad():
            self.lost = {layer.spec.name: dense[layer.spec.name].sub_(layer.module.weight)
                         for layer in layers if layer.spec.name in dense}
        self.windows = windows  # all ranks' windows
        self.device = next(iter(dense.values())).device if dense else torch.device("cpu")
        self.leaders = {layer.spec.name: (leaders or {}).get(layer.spec.name, layer.spec.name) for layer in self.layers}
        self.by_gram = measured_by_gram(self.layers, self.leaders)
        terms = math.ceil(windows / group)
        self.sums = {layer.spec.name: ExactSum.of((2,), terms, self.device)
                     for layer in self.layers if layer.spec.name not in self.by_gram}
        self.grams = {layer.spec.name: ExactSum.of((packed_size(layer.in_features),), terms, self.device)
                      for layer in self.layers
                      if layer.spec.name in self.by_gram and self.leaders[layer.spec.name] == layer.spec.name}
        self._terms: dict[str, torch.Tensor] = {}  # this group's windows so far: norms, or Gram squares

    def _register(self, module, hook):
        return module.register_forward_hook(hook)

    def _hook(self, layer: BlockLayer):
        return self._gram_hook(layer) if layer.spec.name in self.by_gram else self._product_hook(layer)

    def _product_hook(self, layer: BlockLayer):
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

    def _gram_hook(self, layer: BlockLayer):
        name = layer.spec.name

        def add(module, args, output) -> None:
            if self.leaders[name] == name:  # the others reading this input use its Gram matrix
                self._terms[name] = add_lower_gram(self._terms.get(name), input_rows(args[0], self._keep))
        return add

    def _end_group(self) -> None:
        for name, term in self._terms.items():
            if name in self.sums:
                self.sums[name].add(term, consume=True)
            else:
                self.grams[name].add(packed_lower(term), consume=True)
        self._terms = {}

    def reduce(self, world: World) -> dict[str, float]:
        """Layer name -> error over all ranks' windows (NaN when nothing reached the layer)."""
        self._end_group()
        names = list(self.sums) + list(self.grams)
        totals = dict(zip(names, reduce_exactly([*self.sums.values(), *self.grams.values()], world)))
        forms = self._quadratic_forms(totals, world)
        errors = {}
        for layer in self.measured:
            name = layer.spec.name
            lost, kept = forms[name] if name in forms else totals[name].tolist()
            errors[name] = float(lost / kept) if kept > 0 else math.nan
        return errors

    def _quadratic_forms(self, totals: dict[str, torch.Tensor], world: World) -> dict[str, tuple[float, float]]:
        """(‖(W − Ŵ)X‖², ‖WX‖²) of the layers measured through a Gram matrix, each computed on one
        rank (assign_owners by out · in², what its products cost) and shared by a float64 allreduce
        in which every other rank adds +0.0: the same bits as one rank computing them all."""
        layers = [layer for layer in self.measured if layer.spec.name in self.known or layer.spec.name in self.by_gram]
        specs = tuple(TensorSpec(index, layer.spec.name, layer.linear_spec.shape) for index, layer in enumerate(layers))
        owners = assign_owners(specs, world.size, cost=lambda spec: spec.shape[0] * spec.shape[1] ** 2)
        grams: dict[str, torch.Tensor] = {}  # leader -> its float32 Gram matrix, unpacked where needed
        forms = np.zeros((len(layers), 2))
        for index, (layer, owner) in enumerate(zip(layers, owners)):
            if owner != world.rank:
                continue
            name = layer.spec.name
            if name in self.known:  # the ratio does not see the multiple
                gram = self.known[name].to(torch.float32)
            else:
                leader = self.leaders[name]
                if leader not in grams:
                    grams[leader] = unpacked(totals[leader], layer.in_features).to(torch.float32)  # the leader's input
                gram = grams[leader]
            forms[index] = self._from_gram(layer, gram)
        if world.size > 1:
            forms = world.allreduce_sum(forms)
        return {layer.spec.name: (float(lost), float(kept)) for layer, (lost, kept) in zip(layers, forms)}

    def _from_gram(self, layer: BlockLayer, gram: torch.Tensor) -> tuple[float, float]:
        """(‖(W − Ŵ)X‖², ‖WX‖²) from G = ΣXᵀX (float32): Σ((W − Ŵ)G ∘ (W − Ŵ)) and Σ(WG ∘ W), float32
        products (half float64's time; the terms' sum, in float64, is what cancellation could hurt)."""
        if layer.spec.name not in self.lost:
            return 0.0, 0.0
        difference = self.lost[layer.spec.name]
        difference = difference.T if layer.transposed else difference  # out x in
        dense = difference + layer.linear_weight().detach()
        return tuple(float(((weight @ gram) * weight).sum(dtype=torch.float64)) for weight in (difference, dense))
