"""What one evaluation window contributes to a model's figure: token NLL, or embedding fidelity.

    hpcprune prune --config configs/llm_wanda.yaml     # eval.text: perplexity before and after

Each function turns one window's model outputs into float64 terms; the pipeline adds the terms of
all windows exactly (hpcprune.dist.exact_sum), so the figure does not depend on which rank held
which window.
- Causal LMs: Σ of -log p(token t+1 | tokens ≤ t) over the window's positions, from the logits in
  float64; perplexity = exp(Σ NLL / tokens predicted).
- Encoders: the cosine between the mean-pooled last hidden states (attention mask as weights) of
  the pruned and the dense model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Σ NLL of `ids[1:]` under `logits[:-1]` ([T, vocab] and [T]), float64 scalar as a 1-element tensor."""
    log_probabilities = F.log_softmax(logits[:-1].to(torch.float64), dim=-1)
    nll = -log_probabilities.gather(1, ids[1:, None].to(logits.device)).sum()
    return nll.reshape(1)


def perplexity(nll_sum: float, tokens: int) -> float:
    return math.exp(nll_sum / tokens) if tokens else math.nan


def mean_pooled(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[T, d] hidden states averaged over the positions `mask` keeps (all without one), float64."""
    hidden = hidden.to(torch.float64)
    if mask is None:
        return hidden.mean(0)
    weights = mask.to(hidden.device, torch.float64)[:, None]
    return (hidden * weights).sum(0) / weights.sum().clamp_min(1.0)


def window_cosine(pruned: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """Cosine of two pooled embeddings, float64, as a 1-element tensor."""
    return F.cosine_similarity(pruned[None], dense[None], dim=1, eps=1e-12).reshape(1)
