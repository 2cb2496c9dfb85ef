"""Structured pruning: whole output channels (Conv) and neurons (Linear), removed with all they couple.

    hpcprune prune --config configs/structured_resnet8.yaml

With `prune.granularity: channel` the unit of pruning is a channel group of `hpcprune.prune.channel_graph`
(the output channels of one layer, or of several layers joined by residual additions). A channel's
score is a norm of its producers' weight rows (`CHANNEL_CRITERIA`: l1, l2), summed over the coupled
producers; with `prune.batchnorm_scale` each producer's norm is first multiplied by |gamma| of the
BatchNorm right after it, because BatchNorm normalises the convolution's output away and gamma is
what sets the channel's scale downstream (network slimming, Liu et al. 2017).

`prune.sparsity` is the fraction of prunable channels removed: exactly round(sparsity × channels)
over all groups (rule `global`) or round(sparsity × size) in each group (rule `layer`); rule
`threshold` removes the channels scoring <= `prune.threshold`. Ties are broken by position (group
order, then channel index), and every group keeps at least its best channel, so no layer is cut off.

The archive keeps per-weight masks of the prunable tensors: a pruned channel clears its producers'
rows and its consumers' input columns, so the masked model computes exactly what the physically
compacted one does. During fine-tuning `companion_masks` also holds the producers' biases and the
BatchNorms' weight and bias at 0 for pruned channels (running statistics are left to themselves).

Scores are few (one float per channel and producer): each rank computes, in float64, the norms of
the producers it owns in the plan into its slots of one fixed-size vector, zero elsewhere; a single
allreduce gives every rank all of them exactly (x + 0 = x), and every rank then adds the producers
up in the same order. So the masks are bit-identical for any world size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

from hpcprune.archive.codec import pack_mask, unpack_mask
from hpcprune.config import PruneConfig
from hpcprune.dist.world import World
from hpcprune.errors import UsageError
from hpcprune.prune.channel_graph import ChannelGroup, kept_channels, trace_channels
from hpcprune.prune.plan import Plan
from hpcprune.prune.selection import Selection, prune_count


def l1(rows: torch.Tensor) -> torch.Tensor:
    """Σ |w| over each row (channel), as in Li et al. 2017, "Pruning filters for efficient ConvNets"."""
    return rows.abs().sum(dim=1)


def l2(rows: torch.Tensor) -> torch.Tensor:
    """‖w‖₂ of each row (channel)."""
    return torch.linalg.vector_norm(rows, ord=2, dim=1)


# name -> (float64 rows [channels, weights per channel]) -> float64 norm per channel
CHANNEL_CRITERIA: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "l1": l1,
    "l2": l2,
}


# --- rules: per-group float64 scores -> per-group bool "pruned" arrays, and the boundary score ------

Pruned = tuple[list[np.ndarray], float | None]


def prune_global(scores: list[np.ndarray], sparsity: float, threshold: float | None) -> Pruned:
    """The round(sparsity × channels) lowest scores over all groups."""
    total = sum(group.size for group in scores)
    return _prune_lowest(scores, prune_count(sparsity, total))


def prune_layer(scores: list[np.ndarray], sparsity: float, threshold: float | None) -> Pruned:
    """The round(sparsity × size) lowest scores of each group (no boundary common to all)."""
    return [_prune_lowest([group], prune_count(sparsity, group.size))[0][0] for group in scores], None


def prune_threshold(scores: list[np.ndarray], sparsity: float, threshold: float | None) -> Pruned:
    """Every channel scoring <= threshold, except each group's best."""
    pruned = []
    for group in scores:
        mask = group <= threshold  # -inf (pruned before) included
        mask[_best(group)] = False
        pruned.append(mask)
    return pruned, threshold


CHANNEL_RULES: dict[str, Callable[[list[np.ndarray], float, float | None], Pruned]] = {
    "global": prune_global,
    "layer": prune_layer,
    "threshold": prune_threshold,
}


def _best(group: np.ndarray) -> int:
    """The channel pruned last: the highest score, the latest position among equals."""
    return int(group.size - 1 - np.argmax(group[::-1]))


def _prune_lowest(scores: list[np.ndarray], k: int) -> Pruned:
    """Prune the k lowest scores (and every -inf: pruned in an earlier round), ties earliest first,
    never the best channel of a group."""
    flat = np.concatenate(scores)  # one float per channel: small by nature
    starts = np.cumsum([0] + [group.size for group in scores[:-1]])
    candidate = np.ones(flat.size, dtype=bool)
    candidate[[start + _best(group) for start, group in zip(starts, scores)]] = False
    k = max(k, int(np.count_nonzero(np.isneginf(flat) & candidate)))
    if k > np.count_nonzero(candidate):
        raise UsageError(f"prune.sparsity: pruning {k} of {flat.size} channels would empty a layer "
                         f"(every channel group keeps at least one channel; at most {int(candidate.sum())} can go)")
    order = np.lexsort((np.arange(flat.size), flat))  # by score, then by position
    chosen = order[candidate[order]][:k]
    pruned = np.zeros(flat.size, dtype=bool)
    pruned[chosen] = True
    boundary = float(flat[chosen[-1]]) if k else None
    return np.split(pruned, starts[1:]), boundary


# --- the granularity as the pipeline uses it --------------------------------------------------------


class ChannelPruning:
    """The prunable channel groups of a model under a plan, and how to score, select and mask them."""

    def __init__(self, model: nn.Module, plan: Plan, prune: PruneConfig):
        self.model, self.plan, self.prune = model, plan, prune
        self._parameters = dict(model.named_parameters())
        planned = {spec.name for spec in plan.tensors}
        traced = trace_channels(model)
        # A group whose rows or columns lie in an excluded tensor would change that tensor: it stays.
        self.groups = tuple(group for group in traced.groups if set(group.weights) <= planned)
        if not self.groups:
            raise UsageError(f"prune.granularity channel: {type(model).__name__} has no prunable channel group "
                             f"(every layer's output reaches the model's output, an untracked operation, "
                             f"or an excluded tensor: prune.exclude={prune.exclude})")

    @property
    def channels(self) -> int:
        return sum(group.size for group in self.groups)

    def scores(self, world: World, previous: Mapping[str, np.ndarray] | None = None) -> list[np.ndarray]:
        """Per group, the float64 score of each channel, equal on every rank; -inf where `previous`
        (packed masks of an earlier round) already pruned the channel."""
        slots = self._slots()
        partial = np.zeros(sum(group.size * len(group.producers) for group in self.groups), dtype=np.float64)
        owners = {spec.name: owner for spec, owner in zip(self.plan.tensors, self.plan.owners)}
        for (group, producer), start in slots.items():
            if owners[producer.weight] == world.rank:
                partial[start:start + group.size] = self._producer_norms(group, producer).numpy()
        norms = world.allreduce_sum(partial)
        scores = []
        for group in self.groups:
            score = np.zeros(group.size, dtype=np.float64)
            for producer in group.producers:  # the same order on every rank
                start = slots[(group, producer)]
                score += norms[start:start + group.size]
            if previous:
                score[~self._alive(group, previous)] = -np.inf
            scores.append(score)
        return scores

    def select(self, world: World, sparsity: float, previous: Mapping[str, np.ndarray] | None = None) -> Selection:
        """Masks (packed, this rank's tensors of the plan) that prune whole channels under `prune.rule`."""
        pruned, boundary = CHANNEL_RULES[self.prune.rule](self.scores(world, previous), sparsity, self.prune.threshold)
        masks = self.weight_masks(pruned, [spec.name for spec in self.plan.local(world.rank)])
        kept = sum(int(mask.count_nonzero()) for mask in masks.values())
        kept_total = int(world.allreduce_sum(np.array([kept], dtype=np.int64))[0])
        channels_kept = self.channels - sum(int(mask.sum()) for mask in pruned)
        return Selection(masks={name: pack_mask(mask) for name, mask in masks.items()}, threshold=boundary,
                         kept=kept_total, total=self.plan.total,
                         shapes={name: tuple(mask.shape) for name, mask in masks.items()},
                         attrs=dict(channels_kept=channels_kept, channels_total=self.channels))

    def weight_masks(self, pruned: list[np.ndarray], names: list[str]) -> dict[str, torch.Tensor]:
        """Bool masks of `names`: False on the rows of pruned channels' producers and the columns of their consumers."""
        masks = {name: torch.ones(self.plan.by_name(name).shape, dtype=torch.bool) for name in names}
        for group, channels in zip(self.groups, pruned):
            gone = torch.from_numpy(np.flatnonzero(channels))
            for piece in group.slices():
                if piece.name in masks:
                    columns = (gone[:, None] * piece.width + torch.arange(piece.width)).flatten()
                    masks[piece.name].index_fill_(piece.dim, columns, False)
        return masks

    def companion_masks(self, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Masks for the biases and BatchNorm weights and biases of the channels `masks` prune.

        MaskEnforcer then keeps them at 0 as it does pruned weights, so a pruned channel outputs
        exactly 0 wherever it goes. Buffers (running statistics) are not parameters and need none.
        """
        companions = {}
        for group in self.groups:
            alive = torch.zeros(group.size, dtype=torch.bool)
            alive[kept_channels(group, masks)] = True
            companions.update({piece.name: alive for piece in group.companions() if piece.name in self._parameters})
        return companions

    def _slots(self) -> dict[tuple[ChannelGroup, object], int]:
        """Where each (group, producer)'s channel norms live in the reduced vector."""
        slots, start = {}, 0
        for group in self.groups:
            for producer in group.producers:
                slots[(group, producer)] = start
                start += group.size
        return slots

    def _producer_norms(self, group: ChannelGroup, producer) -> torch.Tensor:
        rows = self._parameters[producer.weight].detach().to(torch.float64).reshape(group.size, -1)
        norms = CHANNEL_CRITERIA[self.prune.criterion](rows)
        gamma = self._parameters.get(f"{producer.norm}.weight") if producer.norm else None
        if self.prune.batchnorm_scale and gamma is not None:
            norms = norms * gamma.detach().to(torch.float64).abs()
        return norms.cpu()

    def _alive(self, group: ChannelGroup, previous: Mapping[str, np.ndarray]) -> np.ndarray:
        masks = {p.weight: unpack_mask(previous[p.weight], self.plan.by_name(p.weight).shape) for p in group.producers}
        alive = np.zeros(group.size, dtype=bool)
        alive[kept_channels(group, masks).numpy()] = True
        return alive
