"""Selection rules that compare scores within small groups: output rows, and N:M blocks of inputs.

    hpcprune prune --config configs/fmnist_lenet300_wanda.yaml          # rule row (wanda's default)
    hpcprune prune --config configs/fmnist_lenet300_nm.yaml             # rule nm, prune.n: 2, prune.m: 4

row: every output row (output channel of a convolution) prunes its prune_count(sparsity, row length)
smallest scores, as Wanda compares weights (Sun et al. 2024). nm: along the input dimension, every
group of M consecutive input weights keeps exactly its N largest scores — the 2:4 and 4:8 patterns
that sparse tensor cores execute. A convolution's groups run along its input channels at each kernel
position (the weight seen as out x kh x kw x in, the layout those kernels use), so its input channel
count must be a multiple of M.

Within a group, ties are pruned earliest position first, as the global rule breaks ties. A group
never spans two tensors, so each rank decides its tensors alone: the masks cannot depend on the world
size. Memory: one tensor's scores, its bool mask, and the sort of CHUNK elements at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from hpcprune.config import PruneConfig
from hpcprune.dist.failures import shared
from hpcprune.dist.world import World
from hpcprune.errors import UsageError
from hpcprune.prune.plan import Plan, TensorSpec
from hpcprune.prune.selection import Selection, finish_selection, prune_count
from hpcprune.prune.streaming import CHUNK, BadScores, Scores, Tensors, nan_message


def rule_options(prune: PruneConfig) -> dict[str, int]:
    """The settings of `prune` that its rule takes besides the sparsity (select's **options)."""
    return {"n": prune.n, "m": prune.m} if prune.rule == "nm" else {}


def select_row(scores: Scores, plan: Plan, world: World, *, sparsity: float, threshold: float | None = None) -> Selection:
    """Prune the same fraction of every output row: its prune_count(sparsity, row length) smallest scores."""
    def row_mask(spec: TensorSpec, flat: torch.Tensor) -> torch.Tensor:
        rows = flat.view(spec.shape[0], -1)
        return keep_largest(rows, prune_count(sparsity, rows.shape[1])).reshape(-1)

    return _select_groups(scores, plan, world, row_mask)


def select_nm(scores: Scores, plan: Plan, world: World, *, sparsity: float, threshold: float | None = None,
              n: int = 2, m: int = 4) -> Selection:
    """Keep the n largest scores of every m consecutive input weights (sparsity is 1 - n/m)."""
    check_nm_shapes(plan, m)

    def nm_mask(spec: TensorSpec, flat: torch.Tensor) -> torch.Tensor:
        inputs_last = flat.view(spec.shape).movedim(1, -1)  # out x (kernel...) x in
        keep = keep_largest(inputs_last.reshape(-1, m), m - n)
        return keep.view(inputs_last.shape).movedim(-1, 1).reshape(-1)

    return _select_groups(scores, plan, world, nm_mask)


def check_nm_shapes(plan: Plan, m: int) -> None:
    """Every rank checks every tensor (shapes are in the plan), so all refuse together, before any collective."""
    for spec in plan.tensors:
        if spec.shape[1] % m:
            raise UsageError(f"rule nm: {spec.name} has {spec.shape[1]} inputs, not a multiple of prune.m={m}; "
                             "leave it out with prune.exclude")


def keep_largest(groups: torch.Tensor, pruned: int) -> torch.Tensor:
    """Bool mask of `groups` (G x L) pruning the `pruned` smallest of each row, earliest first among ties."""
    keep = torch.ones(groups.shape, dtype=torch.bool)
    if pruned == 0:
        return keep
    block = max(1, CHUNK // max(groups.shape[1], 1))  # rows sorted at a time: bounded temporary memory
    for start in range(0, groups.shape[0], block):
        rows = groups[start:start + block]
        if torch.isnan(rows).any():
            raise BadScores("NaN")
        keep[start:start + block] = ~smallest(rows.cpu(), pruned)
    return keep


def smallest(rows: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask of the `count` smallest of each row, earliest first among ties (what a stable sort
    picks): all below the row's count-th smallest value, then, in position order, as many of those
    equal to it as are still wanted. topk finds that value in about half a sort's time; its own
    choice among ties is unspecified, hence the threshold rather than its indices."""
    threshold = torch.topk(rows, count, dim=1, largest=False, sorted=False).values.amax(dim=1, keepdim=True)
    below = rows < threshold
    ties = rows == threshold
    wanted = count - below.sum(dim=1, keepdim=True)
    return below | (ties & (ties.cumsum(dim=1) <= wanted))


def _select_groups(scores: Scores, plan: Plan, world: World,
                   tensor_mask: Callable[[TensorSpec, torch.Tensor], torch.Tensor]) -> Selection:
    """Masks of this rank's tensors, each decided alone by `tensor_mask`, then the kept counts summed."""
    tensors = Tensors.of(scores, plan, world)
    masks, kept, problem = tensors.empty_masks(), 0, tensors.problem
    for position, spec in enumerate(tensors.specs if problem is None else []):
        try:  # whatever fails on a tensor, this rank must still reach the collective in finish_selection
            keep = tensor_mask(spec, tensors.read(position)).numpy()
        except BadScores as error:
            problem = nan_message(spec) if str(error) == "NaN" else str(error)
            break
        except Exception as error:
            problem = shared(world, error)
            break
        masks[position][:] = np.packbits(keep, bitorder="big")
        kept += int(keep.sum())
    return finish_selection(tensors, masks, kept, None, plan, world, problem=problem)


PATTERN_RULES: dict[str, Callable[..., Selection]] = {
    "row": select_row,
    "nm": select_nm,
}
