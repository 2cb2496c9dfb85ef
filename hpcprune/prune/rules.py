"""Step 7 — select: the decision rule that turns scores into packed masks (True = keep).

    hpcprune prune --config configs/quickstart.yaml --set prune.rule=global --set prune.sparsity=0.9

Rules live in `RULES` (name -> function with the signature of `select` minus the name); adding a
rule touches only that registry. A rule sees only this rank's scores and talks to the other ranks
through `World.allreduce_sum`, so the same code is the single-process case and the cluster case.

Scores may be lazy: `scores[name]` may compute a tensor's scores afresh on every access, as the
pipeline's scoring does, so selection reads each tensor at most once per pass and lets go of it
(views included) before it reads the next: only one tensor's scores are alive at a time. Each
mask is built packed, chunk by chunk (`np.packbits`, big bit order: `hpcprune.prune.masks.pack_mask`'s
bytes), so memory follows the largest tensor, not the model's scores; the masks themselves (numel/8 bytes)
stay in memory only while small (`hpcprune.prune.mask_store`).

The global rule's exact selection lives in `hpcprune.prune.radix`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import numpy as np

from hpcprune.dist.failures import shared
from hpcprune.dist.world import SingleWorld, World
from hpcprune.prune.patterns import PATTERN_RULES
from hpcprune.prune.plan import Plan
from hpcprune.prune.radix import mask_above, smallest
from hpcprune.prune.selection import Selection, finish_selection, prune_count
from hpcprune.prune.streaming import Counts, Scores, Streamer, Tensors


def select(
    rule: str,
    scores: Scores,
    plan: Plan,
    world: World,
    *,
    sparsity: float,
    threshold: float | None = None,
    **options,
) -> Selection:
    """Masks for this rank's tensors under `rule` (a key of RULES); `options` go to rules that take them."""
    if rule not in RULES:
        raise ValueError(f"unknown selection rule {rule!r}; known: {', '.join(sorted(RULES))}")
    return RULES[rule](scores, plan, world, sparsity=sparsity, threshold=threshold, **options)


# --- rules -----------------------------------------------------------------------------------------


def select_global(
    scores: Scores, plan: Plan, world: World, *, sparsity: float, threshold: float | None = None
) -> Selection:
    """Prune the prune_count(sparsity, plan.total) smallest scores over all tensors of all ranks."""
    tensors = Tensors.of(scores, plan, world)
    k = prune_count(sparsity, plan.total)
    with Streamer() as stream:
        chosen = smallest(tensors, k, world, stream, slots=[spec.index for spec in tensors.specs],
                           slot_count=len(plan.tensors))
    return finish_selection(tensors, chosen.masks, chosen.kept, chosen.boundary, plan, world, problem=None)


def select_layer(
    scores: Scores, plan: Plan, world: World, *, sparsity: float, threshold: float | None = None
) -> Selection:
    """Prune the same fraction of every tensor: its prune_count(sparsity, numel) smallest scores."""
    tensors = Tensors.of(scores, plan, world)
    masks, kept, problem = tensors.empty_masks(), 0, tensors.problem
    with Streamer() as stream:
        for position, spec in enumerate(tensors.specs if problem is None else []):
            try:  # whatever fails on a tensor, this rank must still reach the collective in finish_selection
                # One read per tensor: its passes run over the held scores, nobody else's.
                alone = Tensors.holding(spec, tensors.read(position))
                chosen = smallest(alone, prune_count(sparsity, spec.numel), SingleWorld(), stream,
                                   slots=[0], slot_count=1)
                del alone
            except Exception as error:
                problem = shared(world, error)
                break
            masks[position][:] = chosen.masks[0]
            kept += chosen.kept
    return finish_selection(tensors, masks, kept, None, plan, world, problem=problem)


def select_threshold(
    scores: Scores, plan: Plan, world: World, *, sparsity: float, threshold: float | None = None
) -> Selection:
    """Prune every element whose score is <= threshold."""
    if threshold is None or math.isnan(threshold):
        raise ValueError("rule 'threshold' needs a threshold (prune.threshold)")
    tensors = Tensors.of(scores, plan, world)
    masks = tensors.empty_masks()
    counts = Counts.zero(len(tensors.specs))
    counts.problem = tensors.problem
    if counts.problem is None:
        work = partial(mask_above, masks=masks, boundary=np.float32(threshold), check_nan=True)
        try:  # whatever fails on a tensor, this rank must still reach the collective in finish_selection
            with Streamer() as stream:
                counts = stream.run(tensors, range(len(tensors.specs)), work, partial(Counts.zero, len(tensors.specs)))
        except Exception as error:
            counts.problem = shared(world, error)
    return finish_selection(tensors, masks, int(counts.kept.sum()), float(threshold), plan, world, problem=counts.problem)


RULES: dict[str, Callable[..., Selection]] = {
    "global": select_global,
    "layer": select_layer,
    "threshold": select_threshold,
}


# Rules that compare within small groups (output rows, N:M blocks) live in hpcprune.prune.patterns.
RULES.update(PATTERN_RULES)
