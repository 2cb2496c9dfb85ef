"""The per-layer reconstruction error a block-sequential round records, against the definition itself.

‖WX − ŴX‖² / ‖WX‖², X what each layer receives while the pruned block runs (so the second layer's X
already carries the first layer's pruning), summed over the windows, padding positions left out.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hpcprune.dist.world import SingleWorld
from hpcprune.prune.plan import TensorSpec
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


@pytest.mark.parametrize("bias", [False, True])
def test_recorded_error_is_the_definition_on_the_pruned_inputs(bias):
    block, dense = pruned_block(bias)
    layers = [BlockLayer(TensorSpec(0, "first", (20, 12)), block[0]), BlockLayer(TensorSpec(1, "second", (8, 20)), block[2])]
    generator = torch.Generator().manual_seed(1)
    windows = [torch.randn(1, 6, 12, generator=generator) for _ in range(3)]
    keeps = [torch.tensor([[True, True, True, True, False, False]]), torch.ones(1, 6, dtype=torch.bool),
             torch.tensor([[True, False, True, True, True, True]])]
    with torch.no_grad():
        expected = expected_errors(block, {name: weight.clone() for name, weight in dense.items()}, windows, keeps)
    with torch.no_grad(), ReconstructionErrors(layers, dense, windows=len(windows)) as errors:
        for hidden, keep in zip(windows, keeps):
            with errors.window(keep):
                block(hidden)
    measured = errors.reduce(SingleWorld())
    assert measured.keys() == expected.keys()
    for name in expected:
        assert 0.05 < expected[name] < 2
        assert measured[name] == pytest.approx(expected[name], rel=1e-5), name
