"""Step 6 — score: a criterion maps one weight tensor to a float32 score tensor of the same shape.

    hpcprune prune --config configs/quickstart.yaml --set prune.criterion=relative

Low scores are pruned first. A criterion is one small function registered in `CRITERIA`; it sees
only its own tensor (plus a context), so any rank can score any tensor and get the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from hpcprune.archive.codec import unpack_mask
from hpcprune.prune.criteria import LITERATURE_CRITERIA
from hpcprune.prune.plan import TensorSpec


@dataclass(frozen=True)
class ScoreContext:
    seed: int
    statistics: object = None  # hpcprune.prune.calibrate.Statistics, for the criteria that need data


# A criterion may write into `out` (float32, the weight's shape) instead of allocating: the lazy
# scores of a large model then reuse one buffer rather than allocating a tensor per access.
Criterion = Callable[..., torch.Tensor]  # (spec, weight, context, out=None) -> float32 scores


def magnitude(spec: TensorSpec, weight: torch.Tensor, context: ScoreContext, out: torch.Tensor | None = None) -> torch.Tensor:
    """|w|: the classic (Han et al. 2015) criterion."""
    if out is None:
        return weight.detach().abs().to(torch.float32)
    return out.copy_(weight.detach()).abs_()


def relative(spec: TensorSpec, weight: torch.Tensor, context: ScoreContext, out: torch.Tensor | None = None) -> torch.Tensor:
    """|w_ij| / sum_k |w_ik|: a weight's share of its output row (output channel for convolutions)."""
    rows = weight.detach().abs().to(torch.float32).reshape(weight.shape[0], -1)
    row_sums = rows.sum(dim=1, keepdim=True)
    # An all-zero row has nothing to share: its scores are 0 rather than 0/0.
    shares = torch.where(row_sums > 0, rows / row_sums.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    return shares.reshape(weight.shape)


def random(spec: TensorSpec, weight: torch.Tensor, context: ScoreContext, out: torch.Tensor | None = None) -> torch.Tensor:
    """Uniform noise, seeded by (seed, tensor index) so it does not depend on which rank scores it."""
    generator = torch.Generator().manual_seed(context.seed * 1_000_003 + spec.index)
    return torch.rand(spec.shape, generator=generator, dtype=torch.float32).to(weight.device)


CRITERIA: dict[str, Criterion] = {
    "magnitude": magnitude,
    "relative": relative,
    "random": random,
    **LITERATURE_CRITERIA,  # taylor, snip, wanda, lamp
}


def score_tensor(criterion: str, spec: TensorSpec, weight: torch.Tensor, context: ScoreContext,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    scores = CRITERIA[criterion](spec, weight, context, out=out)
    assert scores.shape == weight.shape and scores.dtype == torch.float32, f"criterion {criterion} broke its contract"
    return scores


class LazyScores(Mapping[str, torch.Tensor]):
    """This rank's scores, computed on access and never cached.

    Selection reads each tensor's scores once per pass and lets go of them before the next tensor,
    so only one score tensor is alive at a time: memory follows the largest tensor, not the model.
    That guarantee lets every access write into one reused buffer (for criteria that accept `out`)
    instead of allocating afresh, which freed memory would not always cover.
    Weights pruned in an earlier round (False in `previous`) score -inf, so they stay pruned.
    """

    def __init__(self, criterion: str, specs: list[TensorSpec], weights, context: ScoreContext,
                 previous: Mapping[str, np.ndarray] | None = None):
        self._criterion, self._weights, self._context = criterion, weights, context
        self._specs = {spec.name: spec for spec in specs}
        self._previous = previous or {}
        self._buffer = torch.empty(max((spec.numel for spec in specs), default=0), dtype=torch.float32)

    def __getitem__(self, name: str) -> torch.Tensor:
        spec = self._specs[name]
        weight = self._weights.get(name)
        out = self._buffer[: spec.numel].view(spec.shape) if weight.device.type == "cpu" else None
        scores = score_tensor(self._criterion, spec, weight, self._context, out=out).cpu()
        if name in self._previous:
            scores.masked_fill_(~unpack_mask(self._previous[name], spec.shape), float("-inf"))
        return scores

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)
