"""The per-layer reconstruction error a block-sequential round records, against the definition itself.

‖WX − ŴX‖² / ‖WX‖², X what each layer receives while the pruned block runs (so the second layer's X
already carries the first layer's pruning), summed over the windows, padding positions left out,
alone or in groups of windows (each group's terms added before the exact sum); wide layers measured
through their inputs' Gram matrix agree with their products.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hpcprune.dist.world import SingleWorld
from hpcprune.prune.plan import TensorSpec
from hpcprune.prune.sequential import reconstruction
from hpcprune.prune.sequential.layers import BlockLayer
from hpcprune.prune.sequential.reconstruction import ReconstructionErrors


def pruned_block(bias: bool) -> tuple[nn.Sequential, dict[str, torch.Tensor]]:
    """Two Linear layers with a ReLU between; each loses about half its weights, the first also sees
    its kept weights moved (as SparseGPT moves them). Returns the block and the dense weights."""
    generator = torch.Generator().manual_seed(0)
    block = nn.Sequential(nn.Linear(12, 20, bias=bias), nn.ReLU(), nn.Linear(20, 8, bias=bias))
    dense = {}
    with torch.no_grad():
        for name, layer in (("first", block[0]), ("second", block[2])):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator))
            if bias:
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator))
            dense[name] = layer.weight.detach().clone()
            keep = torch.rand(layer.weight.shape, generator=generator) > 0.5
            layer.weight.mul_(keep)
        block[0].weight.add_(0.1 * torch.randn(block[0].weight.shape, generator=generator) * (block[0].weight != 0))
    return block, dense


def expected_errors(block: nn.Sequential, dense: dict[str, torch.Tensor], windows, keeps) -> dict[str, float]:
    """The definition, computed directly in float64 from each layer's pruned-pass input."""
    lost = {"first": 0.0, "second": 0.0}
    kept = {"first": 0.0, "second": 0.0}
    for hidden, keep in zip(windows, keeps):
        rows = hidden.reshape(-1, hidden.shape[-1])[keep.reshape(-1)].double()
        for name, layer in (("first", block[0]), ("second", block[2])):
            wx, pruned_wx = rows @ dense[name].double().T, rows @ layer.weight.double().T
            lost[name] += float((wx - pruned_wx).square().sum())
            kept[name] += float(wx.square().sum())
            rows = torch.relu(rows @ layer.weight.double().T + (layer.bias.double() if layer.bias is not None else 0))
    return {name: lost[name] / kept[name] for name in lost}


@pytest.mark.parametrize("bias, group", [(False, 1), (True, 1), (True, 2)])
def test_recorded_error_is_the_definition_on_the_pruned_inputs(bias, group):
    block, dense = pruned_block(bias)
    layers = [BlockLayer(TensorSpec(0, "first", (20, 12)), block[0]), BlockLayer(TensorSpec(1, "second", (8, 20)), block[2])]
    generator = torch.Generator().manual_seed(1)
    windows = [torch.randn(1, 6, 12, generator=generator) for _ in range(3)]
    keeps = [torch.tensor([[True, True, True, True, False, False]]), torch.ones(1, 6, dtype=torch.bool),
             torch.tensor([[True, False, True, True, True, True]])]
    with torch.no_grad():
        expected = expected_errors(block, {name: weight.clone() for name, weight in dense.items()}, windows, keeps)
    with torch.no_grad(), ReconstructionErrors(layers, dense, windows=len(windows), group=group) as errors:
        for index, (hidden, keep) in enumerate(zip(windows, keeps)):
            with errors.window(keep, index):
                block(hidden)
    measured = errors.reduce(SingleWorld())
    assert measured.keys() == expected.keys()
    for name in expected:
        assert 0.05 < expected[name] < 2
        assert measured[name] == pytest.approx(expected[name], rel=1e-5), name


class GatedMLP(nn.Module):
    """gate and up read the same input (each with GRAM_WIDTH times its inputs as outputs), down reads their product."""

    def __init__(self, conv1d: bool = False):
        super().__init__()
        generator = torch.Generator().manual_seed(2)
        if conv1d:
            from transformers.pytorch_utils import Conv1D
            self.gate, self.up = Conv1D(16, 6), Conv1D(16, 6)
        else:
            self.gate, self.up = nn.Linear(6, 16), nn.Linear(6, 16)
        self.down = nn.Linear(16, 6)
        with torch.no_grad():
            for layer in (self.gate, self.up, self.down):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator))

    def forward(self, hidden):
        return self.down(torch.nn.functional.silu(self.gate(hidden)) * self.up(hidden))


def gated_layers(mlp: GatedMLP, conv1d: bool) -> list[BlockLayer]:
    return [BlockLayer(TensorSpec(0, "gate", tuple(mlp.gate.weight.shape)), mlp.gate, transposed=conv1d),
            BlockLayer(TensorSpec(1, "up", tuple(mlp.up.weight.shape)), mlp.up, transposed=conv1d),
            BlockLayer(TensorSpec(2, "down", tuple(mlp.down.weight.shape)), mlp.down)]


def measure(mlp: GatedMLP, layers, dense, windows, keeps, leaders=None, group=1) -> dict[str, float]:
    with torch.no_grad(), ReconstructionErrors(layers, {name: weight.clone() for name, weight in dense.items()},
                                               windows=len(windows), leaders=leaders, group=group) as errors:
        for index, (hidden, keep) in enumerate(zip(windows, keeps)):
            with errors.window(keep, index):
                mlp(hidden)
    return errors.reduce(SingleWorld())


@pytest.mark.parametrize("conv1d, shared, group", [(False, False, 1), (False, True, 1), (True, True, 1), (False, True, 2)])
def test_gram_and_product_give_the_same_error(conv1d, shared, group, monkeypatch):
    """gate and up are measured through their input's Gram matrix (one, when the dense pass found
    that they share it), down through its product; with the Gram path switched off every layer goes
    through its product, and the errors agree."""
    mlp = GatedMLP(conv1d)
    layers = gated_layers(mlp, conv1d)
    leaders = {"gate": "gate", "up": "gate", "down": "down"} if shared else None
    assert reconstruction.measured_by_gram(layers, leaders or {}) == {"gate", "up"}
    dense = {layer.spec.name: layer.module.weight.detach().clone() for layer in layers}
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in layers:  # about half pruned, the kept weights moved a little (as SparseGPT moves them)
            weight = layer.module.weight
            weight.mul_(torch.rand(weight.shape, generator=generator) > 0.5)
            weight.add_(0.1 * torch.randn(weight.shape, generator=generator) * (weight != 0))
    windows = [torch.randn(1, 5, 6, generator=generator) for _ in range(3)]
    keeps = [torch.tensor([[True, True, False, True, True]]), torch.ones(1, 5, dtype=torch.bool),
             torch.tensor([[False, True, True, True, True]])]
    by_gram = measure(mlp, layers, dense, windows, keeps, leaders, group)
    monkeypatch.setattr(reconstruction, "GRAM_WIDTH", 10**9)
    by_product = measure(mlp, layers, dense, windows, keeps, leaders, group)
    for name in ("gate", "up", "down"):  # the products are float32, their norms float64
        assert 0.05 < by_product[name] < 2
        assert by_gram[name] == pytest.approx(by_product[name], rel=1e-6), name
    rows = torch.cat([hidden.reshape(-1, 6)[keep.reshape(-1)] for hidden, keep in zip(windows, keeps)]).double()
    for layer in layers[:2]:  # the definition in float64: gate and up read the windows themselves
        def linear(weight):
            return (weight.T if conv1d else weight).double()
        lost = (rows @ (linear(dense[layer.spec.name]) - linear(layer.module.weight.detach())).T).square().sum()
        kept = (rows @ linear(dense[layer.spec.name]).T).square().sum()
        assert by_gram[layer.spec.name] == pytest.approx(float(lost / kept), rel=1e-6), layer.spec.name  # float32 Gram


def test_layers_sharing_an_input_are_measured_by_gram_when_their_outputs_together_are_wide():
    """q, k and v of SmolLM2's attention (576 -> 576, 192, 192) share an input: together 960 outputs
    for 576 features, so their float32 Gram triangle (576²/2 per position) costs less than their
    products; alone, k and v are too narrow, q and o (576 outputs) are not; down (1536 -> 576), which
    shares its input with no layer, goes through its product."""
    shapes = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576), "down": (576, 1536)}
    layers = [BlockLayer(TensorSpec(index, name, shape), nn.Linear(shape[1], shape[0], bias=False))
              for index, (name, shape) in enumerate(shapes.items())]
    assert reconstruction.measured_by_gram(layers, {"k": "q", "v": "q"}) == {"q", "k", "v", "o"}
    assert reconstruction.measured_by_gram(layers, {}) == {"q", "o"}
