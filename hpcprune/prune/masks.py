"""Step 8 — mask: bool tensors beside the model (True = keep) that keep pruned weights exactly 0.0.

    python -m pytest tests/test_masks.py

There is no weight_orig/weight_mask reparametrisation: the model's state_dict stays plain and a mask
is only a `dict[str, bool Tensor]` keyed by parameter name. During fine-tuning `MaskEnforcer`
zeroes gradients before each optimizer step and, after it, the weights and every per-element
optimizer state (momentum, Adam moments), so neither momentum nor weight decay nor Adam can bring a
pruned weight back. In the archive a mask is stored as `np.packbits` bytes (`hpcprune.archive.codec.pack_mask`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from hpcprune.errors import UsageError


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself when `model` is a DistributedDataParallel (or similar) wrapper."""
    return getattr(model, "module", model)


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Set the pruned (False) positions of each masked parameter to 0.0, in place."""
    with torch.no_grad():
        for param, pruned in _pruned_positions(model, masks):
            param.masked_fill_(pruned, 0.0)


class MaskEnforcer:
    """Keeps pruned weights exactly 0.0 while `optimizer` trains `model`.

    Call `before_step()` after `backward()` (and after DDP's gradient allreduce, i.e. after
    backward returns) and `after_step()` right after `optimizer.step()`.
    """

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer):
        # Inverted and moved to each parameter's device once, not at every step.
        self._targets = _pruned_positions(model, masks)
        self._optimizer = optimizer

    def retarget(self, model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
        """Enforce `masks` from now on (the gradual schedule moves them while training)."""
        self._targets = _pruned_positions(model, masks)

    def before_step(self) -> None:
        """Zero the gradients of pruned weights, so the step itself sees nothing there."""
        for param, pruned in self._targets:
            if param.grad is not None:
                param.grad.masked_fill_(pruned, 0.0)

    @torch.no_grad()
    def after_step(self) -> None:
        """Re-zero pruned weights and the optimizer's per-element state at their positions."""
        for param, pruned in self._targets:
            param.masked_fill_(pruned, 0.0)
            for value in self._optimizer.state.get(param, {}).values():
                if _is_per_element_state(value, param):
                    value.masked_fill_(pruned, 0)


def _is_per_element_state(value: object, param: torch.Tensor) -> bool:
    """momentum_buffer, exp_avg, exp_avg_sq, max_exp_avg_sq...: tensors shaped like the parameter.

    0-d tensors (Adam's `step`) are counters, never per-element state.
    """
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == param.shape


def _pruned_positions(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, bool tensor True where pruned) on the parameter's device, after checking names and shapes."""
    params = dict(unwrap(model).named_parameters())
    targets = []
    for name, mask in masks.items():
        if name not in params:
            raise UsageError(f"mask for {name!r}: the model has no parameter of that name")
        param = params[name]
        if tuple(mask.shape) != tuple(param.shape):
            raise UsageError(f"mask for {name!r} has shape {tuple(mask.shape)}, the parameter {tuple(param.shape)}")
        if mask.dtype != torch.bool:
            raise UsageError(f"mask for {name!r} has dtype {mask.dtype}, expected torch.bool")
        targets.append((param, ~mask.to(param.device)))
    return targets


def kept_count(mask: torch.Tensor) -> int:
    """Number of kept (True) elements."""
    return int(mask.count_nonzero())


def sparsity_of(masks: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(kept, total) elements over all masks; the sparsity is 1 - kept / total."""
    kept = sum(kept_count(mask) for mask in masks.values())
    total = sum(mask.numel() for mask in masks.values())
    return kept, total
