"""Criteria from the literature, registered in `hpcprune.prune.scoring.CRITERIA` next to magnitude.

    hpcprune prune --config configs/fmnist_lenet300_lamp.yaml --set prune.criterion=taylor

Each is one function (spec, weight, context, out=None) -> float32 scores, low = pruned first. The
data-dependent ones read the calibration statistics in `context.statistics` (hpcprune.prune.calibrate):
- taylor: |w · ∂L/∂w|, the first-order Taylor estimate of the loss change when w is removed
  (Molchanov et al. 2019), with the gradient of the loss over all calibration samples;
- snip: |g · w| / Σ|g · w| over all prunable weights, connection sensitivity (Lee et al. 2019); it
  needs no trained weights: with `pretrain.epochs: 0` it prunes at initialisation;
- wanda: |W_ij| · ‖X_j‖₂ (Sun et al. 2024), compared within each output row (rule row, its default);
- lamp: w_u² / Σ_{v: w_v² ≥ w_u²} w_v² within the tensor (Lee et al. 2021): layer-adaptive magnitude
  that a global threshold can compare across layers without collapsing any of them.
"""

from __future__ import annotations

import torch

from hpcprune.prune.plan import TensorSpec


def _finish(scores: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    scores = scores.to(torch.float32)
    return scores if out is None else out.copy_(scores)


def _statistic(context, kind: str, spec: TensorSpec) -> torch.Tensor:
    statistics = getattr(context, "statistics", None)
    table = getattr(statistics, kind, None) or {}
    if spec.name not in table:  # a programming error: the pipeline calibrates before scoring
        raise RuntimeError(f"no calibration {kind} for {spec.name}: calibrate before scoring")
    return table[spec.name]


def taylor(spec: TensorSpec, weight: torch.Tensor, context, out: torch.Tensor | None = None) -> torch.Tensor:
    gradient = _statistic(context, "gradients", spec).to(weight.device)
    return _finish((weight.detach().to(torch.float32) * gradient).abs_(), out)


def snip(spec: TensorSpec, weight: torch.Tensor, context, out: torch.Tensor | None = None) -> torch.Tensor:
    gradient = _statistic(context, "gradients", spec).to(weight.device)
    total = context.statistics.sensitivity_total
    sensitivity = (weight.detach().to(torch.float32) * gradient).abs_()
    return _finish(sensitivity / total if total > 0 else sensitivity, out)


def wanda(spec: TensorSpec, weight: torch.Tensor, context, out: torch.Tensor | None = None) -> torch.Tensor:
    norms = _statistic(context, "input_norms", spec).to(weight.device)
    rows = weight.detach().to(torch.float32).reshape(weight.shape[0], -1).abs()
    return _finish((rows * norms).reshape(weight.shape), out)


def lamp(spec: TensorSpec, weight: torch.Tensor, context, out: torch.Tensor | None = None) -> torch.Tensor:
    squares = weight.detach().to(torch.float64).reshape(-1).square()
    ordered, order = torch.sort(squares)
    at_least = ordered.flip(0).cumsum(0).flip(0)  # at_least[i] = Σ ordered[i:]
    # Tied weights share one denominator: the sum from the first of them on covers every one as large.
    first_of_value = torch.searchsorted(ordered, ordered, side="left")
    denominators = at_least[first_of_value]
    ratios = torch.where(denominators > 0, ordered / denominators.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    scores = torch.empty_like(ratios).scatter_(0, order, ratios)
    return _finish(scores.reshape(weight.shape), out)


LITERATURE_CRITERIA = {
    "taylor": taylor,
    "snip": snip,
    "wanda": wanda,
    "lamp": lamp,
}
