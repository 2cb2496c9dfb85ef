"""Masks: pruned weights stay exactly 0.0 under every optimizer; bit packing round-trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hpcprune.archive.codec import pack_mask, unpack_mask
from hpcprune.errors import UsageError
from hpcprune.prune.masks import SAME_SIZE_INTEGERS, MaskEnforcer, apply_masks, kept_count, sparsity_of, zero_pruned_

OPTIMIZERS = {
    "sgd-momentum-decay": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.05),
    "sgd-nesterov": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01, weight_decay=0.05),
    "adam-amsgrad": lambda params: torch.optim.Adam(params, lr=0.01, weight_decay=0.05, amsgrad=True),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.05),
}
STEPS = 8


def small_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))


def random_masks(model: nn.Module, keep: float = 0.5) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {name: torch.rand(param.shape, generator=generator) < keep
            for name, param in model.named_parameters() if name.endswith("weight")}


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, enforcer: MaskEnforcer | None, steps: int = STEPS,
                grads_only: bool = False) -> None:
    generator = torch.Generator().manual_seed(2)
    for _ in range(steps):
        inputs = torch.randn(16, 6, generator=generator)
        targets = torch.randint(0, 3, (16,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        if enforcer is not None:
            enforcer.before_step()
        optimizer.step()
        if enforcer is not None and not grads_only:
            enforcer.after_step()


def pruned_values(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {name: params[name].detach()[~mask] for name, mask in masks.items()}


def assert_pruned_exactly_zero(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    for name, values in pruned_values(model, masks).items():
        assert torch.equal(values, torch.zeros_like(values)), f"{name}: pruned weights moved"


def assert_state_zero_where_pruned(model: nn.Module, masks, optimizer) -> None:
    params = dict(model.named_parameters())
    checked = 0
    for name, mask in masks.items():
        for key, value in optimizer.state[params[name]].items():
            if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                assert torch.equal(value[~mask], torch.zeros_like(value[~mask])), f"{name}.{key} nonzero where pruned"
                checked += 1
    assert checked >= len(masks)  # the optimizer did keep per-element state to check


@pytest.mark.parametrize("make_optimizer", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_pruned_weights_stay_exactly_zero(make_optimizer):
    model = small_mlp()
    masks = random_masks(model)
    optimizer = make_optimizer(model.parameters())
    apply_masks(model, masks)
    train_steps(model, optimizer, MaskEnforcer(model, masks, optimizer))
    assert_pruned_exactly_zero(model, masks)
    assert_state_zero_where_pruned(model, masks, optimizer)


@pytest.mark.parametrize("make_optimizer", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_without_enforcer_pruned_weights_come_back(make_optimizer):
    """The control: the same training without the enforcer moves pruned weights, so the test above can fail."""
    model = small_mlp()
    masks = random_masks(model)
    optimizer = make_optimizer(model.parameters())
    apply_masks(model, masks)
    train_steps(model, optimizer, None)
    for name, values in pruned_values(model, masks).items():
        assert values.count_nonzero() > 0, name


def warmed_up(make_optimizer):
    """A model and optimizer after dense training: momentum and Adam moments are nonzero everywhere."""
    model = small_mlp()
    optimizer = make_optimizer(model.parameters())
    train_steps(model, optimizer, None, steps=3)
    return model, optimizer


@pytest.mark.parametrize("make_optimizer", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_stale_optimizer_state_is_cleared(make_optimizer):
    """Pruning mid-training: state accumulated while dense must not resurrect the pruned weights."""
    model, optimizer = warmed_up(make_optimizer)
    masks = random_masks(model)
    apply_masks(model, masks)
    enforcer = MaskEnforcer(model, masks, optimizer)
    train_steps(model, optimizer, enforcer)
    assert_pruned_exactly_zero(model, masks)
    assert_state_zero_where_pruned(model, masks, optimizer)


def test_masking_gradients_alone_lets_stale_momentum_resurrect_weights():
    """The control for the test above: only after_step's state clearing keeps them at zero."""
    model, optimizer = warmed_up(OPTIMIZERS["sgd-momentum-decay"])
    masks = random_masks(model)
    apply_masks(model, masks)
    train_steps(model, optimizer, MaskEnforcer(model, masks, optimizer), grads_only=True)
    assert any(values.count_nonzero() > 0 for values in pruned_values(model, masks).values())


def test_kept_weights_still_train():
    model = small_mlp()
    masks = random_masks(model)
    apply_masks(model, masks)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    optimizer = OPTIMIZERS["sgd-momentum-decay"](model.parameters())
    train_steps(model, optimizer, MaskEnforcer(model, masks, optimizer))
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert not torch.equal(params[name].detach()[mask], before[name][mask]), name


def test_apply_masks_zeroes_only_pruned_positions():
    model = small_mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")  # a multiplicative mask would keep NaN; pruning must not
    masks = random_masks(model)
    masks["0.weight"][0, 0] = False
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    apply_masks(model, masks)
    params = dict(model.named_parameters())
    assert_pruned_exactly_zero(model, masks)
    for name, mask in masks.items():
        assert torch.equal(params[name].detach()[mask], before[name][mask])
    assert torch.equal(params["0.bias"].detach(), before["0.bias"])
    assert not any(name.endswith(("_orig", "_mask")) for name in model.state_dict())  # plain state dict


class Wrapper(nn.Module):
    """Stands in for DistributedDataParallel: the model lives in `.module`."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, inputs):
        return self.module(inputs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_zero_pruned_has_masked_fill_bits(dtype):
    """Kept values keep their bits (NaN, ±inf and -0.0 among them); pruned ones become +0.0, for a
    transposed (strided) keep mask too, as the SparseGPT solve passes it."""
    generator = torch.Generator().manual_seed(3)
    values = torch.randn(64, 48, generator=generator).to(dtype)
    values[0, :6] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, -1.0]).to(dtype)
    for keep in (torch.rand(64, 48, generator=generator) < 0.5, torch.rand(48, 64, generator=generator).T < 0.5):
        keep[0, :6] = torch.tensor([True, True, False, True, False, False])
        expected = values.clone().masked_fill_(~keep, 0.0)
        got = zero_pruned_(values.clone(), keep)
        integers = SAME_SIZE_INTEGERS[values.element_size()]
        assert torch.equal(got.view(integers), expected.view(integers))
        assert not got[~keep].view(integers).any()  # +0.0: all bits zero


def test_wrapped_model_uses_the_inner_parameter_names():
    inner = small_mlp()
    model = Wrapper(inner)
    masks = random_masks(inner)  # "0.weight", not "module.0.weight"
    optimizer = OPTIMIZERS["adam"](model.parameters())
    apply_masks(model, masks)
    train_steps(model, optimizer, MaskEnforcer(model, masks, optimizer))
    assert_pruned_exactly_zero(inner, masks)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_masks_enforced_on_a_cuda_model():
    model = small_mlp().cuda()
    masks = random_masks(model)  # on the CPU
    optimizer = OPTIMIZERS["adamw"](model.parameters())
    apply_masks(model, masks)
    enforcer = MaskEnforcer(model, masks, optimizer)
    generator = torch.Generator().manual_seed(2)
    for _ in range(STEPS):
        inputs, targets = torch.randn(16, 6, generator=generator).cuda(), torch.randint(0, 3, (16,), generator=generator).cuda()
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        enforcer.before_step()
        optimizer.step()
        enforcer.after_step()
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        values = params[name].detach().cpu()[~mask]
        assert torch.equal(values, torch.zeros_like(values)), name


def test_mask_for_unknown_parameter_is_a_usage_error():
    model = small_mlp()
    with pytest.raises(UsageError, match="fc9.weight"):
        apply_masks(model, {"fc9.weight": torch.ones(3, 3, dtype=torch.bool)})


def test_mask_of_wrong_shape_names_tensor_and_shapes():
    model = small_mlp()
    with pytest.raises(UsageError, match=r"0\.weight.*\(12, 5\).*\(12, 6\)"):
        MaskEnforcer(model, {"0.weight": torch.ones(12, 5, dtype=torch.bool)}, torch.optim.SGD(model.parameters(), lr=0.1))


def test_mask_must_be_bool():
    model = small_mlp()
    with pytest.raises(UsageError, match="bool"):
        apply_masks(model, {"0.weight": torch.ones(12, 6)})


@pytest.mark.parametrize("shape", [(3, 5), (7,), (2, 3, 3, 3), (8,), (1,), (0,), (16, 9)])
def test_pack_unpack_round_trip(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(3)) < 0.5
    packed = pack_mask(mask)
    assert packed.dtype == np.uint8
    assert packed.shape == ((mask.numel() + 7) // 8,)
    restored = unpack_mask(packed, shape)
    assert restored.dtype == torch.bool
    assert torch.equal(restored, mask)


def test_pack_uses_big_bit_order_over_the_flattened_mask():
    mask = torch.tensor([[True, False, False], [False, False, False], [False, False, True]])
    assert pack_mask(mask).tolist() == [0b1000_0000, 0b1000_0000]
    assert torch.equal(unpack_mask(np.array([0b1000_0000, 0b1000_0000], dtype=np.uint8), (3, 3)), mask)


def test_unpack_ignores_padding_bits():
    assert unpack_mask(np.array([0b0000_0111], dtype=np.uint8), (5,)).tolist() == [False] * 5


def test_unpack_refuses_wrong_byte_count():
    with pytest.raises(ValueError, match=r"\(3, 5\)"):
        unpack_mask(np.zeros(3, dtype=np.uint8), (3, 5))


def test_pack_refuses_non_bool():
    with pytest.raises(ValueError, match="bool"):
        pack_mask(torch.ones(4))


def test_counts():
    masks = {"a": torch.tensor([True, False, True]), "b": torch.zeros(2, 2, dtype=torch.bool)}
    assert kept_count(masks["a"]) == 2
    assert sparsity_of(masks) == (2, 7)
    assert sparsity_of({}) == (0, 0)


@pytest.mark.parametrize("make_optimizer", [OPTIMIZERS["sgd-momentum-decay"], OPTIMIZERS["adam"]], ids=["sgd", "adam"])
def test_packed_masks_train_exactly_as_bool_masks(make_optimizer):
    """Masks kept as their packed bits (an eighth of a byte per weight) give the same weights, bit for bit."""
    results = []
    for packed in (False, True):
        model = small_mlp()
        masks = random_masks(model, keep=0.4)
        given = {name: torch.from_numpy(pack_mask(mask)) for name, mask in masks.items()} if packed else masks
        optimizer = make_optimizer(model.parameters())
        apply_masks(model, given)
        train_steps(model, optimizer, MaskEnforcer(model, given, optimizer))
        assert_pruned_exactly_zero(model, masks)
        results.append({name: param.detach().clone() for name, param in model.named_parameters()})
    assert all(torch.equal(results[0][name], results[1][name]) for name in results[0])


def test_packed_mask_of_wrong_length_names_tensor_and_bytes():
    model = small_mlp()
    with pytest.raises(UsageError, match=r"0\.weight.*\(8,\).*\(9,\)"):
        apply_masks(model, {"0.weight": torch.zeros(8, dtype=torch.uint8)})
