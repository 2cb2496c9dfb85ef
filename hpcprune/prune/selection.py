"""What every selection rule returns, and the steps all of them share.

    hpcprune prune --config configs/quickstart.yaml     # a Selection per round

A `Selection` holds this rank's packed masks and the totals over all ranks. `prune_count` rounds a
sparsity to a count as torch.nn.utils.prune does; `finish_selection` ends every rule with the one
allreduce that sums the kept counts and tells every rank whether any rank failed. The rules
(hpcprune.prune.rules, hpcprune.prune.patterns) sit above this module and never import each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from hpcprune.dist.failures import outcome
from hpcprune.dist.world import World
from hpcprune.errors import UsageError
from hpcprune.prune.mask_store import MaskStore
from hpcprune.prune.plan import Plan
from hpcprune.prune.streaming import Tensors, as_failure, raise_if_failed


@dataclass
class Selection:
    masks: Mapping[str, np.ndarray]  # this rank's tensors (plan.local(rank)): packed bits of the flat mask, True = keep
    threshold: float | None  # boundary score T: < T pruned, > T kept, == T by position; None: none pruned / n.a.
    kept: int  # kept elements over all prunable tensors of all ranks
    total: int  # plan.total
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # shape of each mask (for unpack_mask)
    attrs: dict[str, int | float] = field(default_factory=dict)  # more round attributes (channel counts)


def prune_count(sparsity: float, total: int) -> int:
    """Number of elements to prune, rounded as torch.nn.utils.prune does (Python's round)."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    return round(sparsity * total)


def keeps_nothing(rule: str, sparsity: float, plan: Plan, min_density: float = 0.0) -> bool:
    """True when rule `global` or `layer` at `sparsity` would prune every prunable weight (known from
    the plan alone; other rules know it only once they have selected)."""
    if rule == "global":
        return min_density == 0 and prune_count(sparsity, plan.total) >= plan.total
    if rule == "layer":
        return all(prune_count(sparsity, spec.numel) >= spec.numel for spec in plan.tensors)
    return False


def nothing_kept(selection: Selection, *, rule: str, sparsity: float, threshold: float | None) -> UsageError | None:
    """The refusal of a selection that keeps no weight at all (a model that outputs constants), or None."""
    if selection.kept:
        return None
    if rule == "threshold":
        return UsageError(f"prune.threshold {threshold} prunes every one of the {selection.total} prunable weights")
    return sparsity_keeps_nothing(rule, sparsity, selection.total)


def sparsity_keeps_nothing(rule: str, sparsity: float, total: int) -> UsageError:
    return UsageError(f"prune.sparsity {sparsity} keeps none of the {total} prunable weights (rule {rule}); lower it")


def finish_selection(tensors: Tensors, masks: MaskStore, kept: int, boundary, plan: Plan, world: World, *, problem) -> Selection:
    """Sum kept counts over ranks with one allreduce that also tells every rank about any failure."""
    failure = as_failure(problem)
    reduced = world.allreduce_sum(np.concatenate([[kept], outcome(world, failure)]).astype(np.int64))
    raise_if_failed(world, failure, reduced[1:])
    kept_total = reduced[0]
    return Selection(masks=masks.named(tensors.specs), threshold=boundary,
                     kept=int(kept_total), total=plan.total, shapes={spec.name: spec.shape for spec in tensors.specs})
