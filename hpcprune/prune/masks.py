"""Step 8 — mask: bool tensors beside the model (True = keep) that keep pruned weights exactly 0.0.

    python -m pytest tests/test_masks.py

There is no weight_orig/weight_mask reparametrisation: the model's state_dict stays plain and masks
are only a mapping from parameter name to a tensor: a bool tensor of the parameter's shape, or the
mask's packed bits (uint8, `hpcprune.archive.codec.pack_mask`'s bytes, as the archive and the ranks
keep them). Packed masks stay packed: a bool mask costs a byte per weight, its bits an eighth of
that, so each one is unpacked on the parameter's device only while it is applied, one at a time.
During fine-tuning `MaskEnforcer` zeroes gradients before each optimizer step and, after it, the
weights and every per-element optimizer state (momentum, Adam moments), so neither momentum nor
weight decay nor Adam can bring a pruned weight back.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from hpcprune.archive.codec import unpack_mask
from hpcprune.errors import UsageError


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself when `model` is a DistributedDataParallel (or similar) wrapper."""
    return getattr(model, "module", model)


SAME_SIZE_INTEGERS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def zero_pruned_(tensor: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """`tensor` (floating point) set to exactly +0.0 where `keep` (bool, broadcastable) is False, in
    place. Its bits are multiplied by 1 or 0 as integers: a kept value keeps its bits (NaN and -0.0
    too), a pruned one becomes all zero bits, as masked_fill_ would make it; masked_fill_ branches on
    each element, which a mask as random as pruning's makes about ten times slower on a CPU."""
    integers = SAME_SIZE_INTEGERS[tensor.element_size()]
    tensor.view(integers).mul_(keep)
    return tensor


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Set the pruned (False) positions of each masked parameter to 0.0, in place."""
    with torch.no_grad():
        for target in _targets(model, masks):
            target.param.masked_fill_(target.pruned(), 0.0)


class MaskEnforcer:
    """Keeps pruned weights exactly 0.0 while `optimizer` trains `model`.

    Call `before_step()` after `backward()` (and after DDP's gradient allreduce, i.e. after
    backward returns) and `after_step()` right after `optimizer.step()`.
    """

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer):
        # Checked and moved to each parameter's device once, not at every step.
        self._targets = _targets(model, masks)
        self._optimizer = optimizer

    def retarget(self, model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
        """Enforce `masks` from now on (the gradual schedule moves them while training)."""
        self._targets = _targets(model, masks)

    def before_step(self) -> None:
        """Zero the gradients of pruned weights, so the step itself sees nothing there."""
        for target in self._targets:
            if target.param.grad is not None:
                target.param.grad.masked_fill_(target.pruned(), 0.0)

    @torch.no_grad()
    def after_step(self) -> None:
        """Re-zero pruned weights and the optimizer's per-element state at their positions."""
        for target in self._targets:
            param, pruned = target.param, target.pruned()
            param.masked_fill_(pruned, 0.0)
            for value in self._optimizer.state.get(param, {}).values():
                if _is_per_element_state(value, param):
                    value.masked_fill_(pruned, 0)


def _is_per_element_state(value: object, param: torch.Tensor) -> bool:
    """momentum_buffer, exp_avg, exp_avg_sq, max_exp_avg_sq...: tensors shaped like the parameter.

    0-d tensors (Adam's `step`) are counters, never per-element state.
    """
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == param.shape


class _Target:
    """One masked parameter, and its mask on the parameter's device: inverted bool, or packed keep bits."""

    def __init__(self, param: torch.Tensor, mask: torch.Tensor):
        self.param = param
        self._packed = mask.dtype == torch.uint8
        self._mask = mask.to(param.device) if self._packed else ~mask.to(param.device)

    def pruned(self) -> torch.Tensor:
        """Bool tensor of the parameter's shape, True where pruned (made now from packed bits, then let go)."""
        if not self._packed:
            return self._mask
        shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=self._mask.device)
        bits = torch.bitwise_right_shift(self._mask.unsqueeze(1), shifts)  # first weight in the highest bit
        bits.bitwise_and_(1).bitwise_xor_(1)  # 1 where the keep bit is 0
        return bits.view(-1)[: self.param.numel()].view(torch.bool).view(self.param.shape)


def _targets(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> list[_Target]:
    """A _Target per mask, after checking names, shapes and dtypes."""
    params = dict(unwrap(model).named_parameters())
    targets = []
    for name, mask in masks.items():
        if name not in params:
            raise UsageError(f"mask for {name!r}: the model has no parameter of that name")
        param = params[name]
        if mask.dtype == torch.uint8:
            if tuple(mask.shape) != ((param.numel() + 7) // 8,):
                raise UsageError(f"packed mask for {name!r} has shape {tuple(mask.shape)}, the parameter "
                                 f"{tuple(param.shape)} needs ({(param.numel() + 7) // 8},) bytes")
        elif mask.dtype != torch.bool:
            raise UsageError(f"mask for {name!r} has dtype {mask.dtype}, expected torch.bool or packed torch.uint8")
        elif tuple(mask.shape) != tuple(param.shape):
            raise UsageError(f"mask for {name!r} has shape {tuple(mask.shape)}, the parameter {tuple(param.shape)}")
        targets.append(_Target(param, mask))
    return targets


class UnpackedMasks(Mapping[str, torch.Tensor]):
    """Packed masks read as bool tensors, each unpacked when it is asked for (one at a time)."""

    def __init__(self, packed: Mapping[str, np.ndarray], shapes: Mapping[str, Sequence[int]]):
        self._packed, self._shapes = packed, shapes

    def __getitem__(self, name: str) -> torch.Tensor:
        return unpack_mask(self._packed[name], self._shapes[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)


def kept_count(mask: torch.Tensor) -> int:
    """Number of kept (True) elements."""
    return int(mask.count_nonzero())


def sparsity_of(masks: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(kept, total) elements over all masks; the sparsity is 1 - kept / total."""
    kept = sum(kept_count(mask) for mask in masks.values())
    total = sum(mask.numel() for mask in masks.values())
    return kept, total
