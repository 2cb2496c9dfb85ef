"""The prunable layers of a block-sequential run: every Linear weight inside the model's blocks.

    hpcprune prune --config configs/llm_wanda.yaml --set 'prune.exclude=[*.self_attn.o_proj.weight]'

GPT-2's `Conv1D` (transformers.pytorch_utils) is a Linear layer whose weight is stored in the other
orientation (in x out, y = xW + b): its layer is `transposed`, the methods see `linear_weight()`
(out x in) and `linear_spec`, and what they decide is turned back to the stored orientation, in which
masks and weights are recorded, applied and exported. Such a layer is never cut into row ranges.

Names are the model's state-dict names (`model.layers.0.self_attn.q_proj.weight`), numbered in block
order, then in the block's parameter order: the order of the archive's masks. Embeddings, norms and
the LM head lie outside the blocks and are never pruned; `prune.exclude` leaves more out. Each block's
layers are spread over the ranks by the cost of deciding them (hpcprune.prune.sequential.pieces).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hpcprune.config import PruneConfig
from hpcprune.errors import UsageError
from hpcprune.prune.patterns import check_nm_shapes
from hpcprune.prune.plan import Plan, TensorSpec, prunable_tensors


@dataclass(frozen=True)
class BlockLayer:
    spec: TensorSpec  # name, stored shape and position in the run's plan
    module: nn.Module  # the nn.Linear (or Conv1D) in the (materialised) block
    transposed: bool = False  # a Conv1D: the weight is stored in x out

    @property
    def linear_spec(self) -> TensorSpec:
        """The spec as the methods see it: out x in."""
        return linear_spec(self.spec, self.transposed)

    @property
    def in_features(self) -> int:
        return self.linear_spec.shape[1]

    def linear_weight(self) -> torch.Tensor:
        """The weight, out x in (a copy for a Conv1D)."""
        weight = self.module.weight
        return weight.detach().T.contiguous() if self.transposed else weight

    def stored(self, tensor: torch.Tensor) -> torch.Tensor:
        """A mask or weight decided out x in, in the stored orientation."""
        return tensor.T.contiguous() if self.transposed else tensor


def linear_spec(spec: TensorSpec, transposed: bool) -> TensorSpec:
    """`spec` out x in: a Conv1D's stored in x out shape reversed, a Linear's as it is."""
    return TensorSpec(spec.index, spec.name, tuple(reversed(spec.shape))) if transposed else spec


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2), known by its class name and `nf` so that this floor need not import transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _prunable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def sequential_plan(blocks: nn.ModuleList, blocks_path: str, prune: PruneConfig) -> Plan:
    """The run's prunable weights, every rank the same; owners are decided per block (pieces.py)."""
    found = [(f"{blocks_path}.{index}.{name}.weight", tuple(module.weight.shape), is_conv1d(module))
             for index, block in enumerate(blocks) for name, module in block.named_modules() if _prunable(module)]
    if not found:
        raise UsageError(f"the blocks {blocks_path} hold no nn.Linear (or GPT-2 Conv1D) layer to prune")
    tensors = prunable_tensors([(name, shape) for name, shape, _ in found], prune)
    plan = Plan(tensors, (0,) * len(tensors))
    if prune.rule == "nm":  # every rank refuses before any block runs, on the inputs of each layer
        transposed = {name for name, _, conv in found if conv}
        oriented = tuple(linear_spec(spec, spec.name in transposed) for spec in tensors)
        check_nm_shapes(Plan(oriented, plan.owners), prune.m)
    return plan


def block_layers(plan: Plan, block: nn.Module, prefix: str) -> list[BlockLayer]:
    """The plan's layers inside `block` (state-dict prefix `prefix`), in plan order."""
    modules = {f"{prefix}.{name}.weight": module for name, module in block.named_modules()}
    return [BlockLayer(spec, modules[spec.name], is_conv1d(modules[spec.name]))
            for spec in plan.tensors if spec.name in modules]
