"""The prunable layers of a block-sequential run: every Linear weight inside the model's blocks.

    hpcprune prune --config configs/llm_wanda.yaml --set 'prune.exclude=[*.self_attn.o_proj.weight]'

Names are the model's state-dict names (`model.layers.0.self_attn.q_proj.weight`), numbered in block
order, then in the block's parameter order: the order of the archive's masks. Embeddings, norms and
the LM head lie outside the blocks and are never pruned; `prune.exclude` leaves more out. Each block's
layers are spread over the ranks by the cost of deciding them (hpcprune.prune.sequential.pieces).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from hpcprune.config import PruneConfig
from hpcprune.errors import UsageError
from hpcprune.prune.patterns import check_nm_shapes
from hpcprune.prune.plan import Plan, TensorSpec, prunable_tensors


@dataclass(frozen=True)
class BlockLayer:
    spec: TensorSpec  # name, shape and position in the run's plan
    module: nn.Linear  # the layer in the (materialised) block


def sequential_plan(blocks: nn.ModuleList, blocks_path: str, prune: PruneConfig) -> Plan:
    """The run's prunable weights, every rank the same; owners are decided per block (pieces.py)."""
    candidates = [(f"{blocks_path}.{index}.{name}.weight", tuple(module.weight.shape))
                  for index, block in enumerate(blocks)
                  for name, module in block.named_modules() if isinstance(module, nn.Linear)]
    if not candidates:
        raise UsageError(f"the blocks {blocks_path} hold no nn.Linear layer to prune (GPT-2's Conv1D is not one: "
                         "use a model whose blocks are built of nn.Linear)")
    tensors = prunable_tensors(candidates, prune)
    plan = Plan(tensors, (0,) * len(tensors))
    if prune.rule == "nm":  # every rank refuses before any block runs
        check_nm_shapes(plan, prune.m)
    return plan


def block_layers(plan: Plan, block: nn.Module, prefix: str) -> list[BlockLayer]:
    """The plan's layers inside `block` (state-dict prefix `prefix`), in plan order."""
    modules = {f"{prefix}.{name}.weight": module for name, module in block.named_modules()}
    return [BlockLayer(spec, modules[spec.name]) for spec in plan.tensors if spec.name in modules]
