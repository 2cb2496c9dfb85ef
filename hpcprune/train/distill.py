"""Knowledge distillation: the dense model teaches the pruned one while it is fine-tuned.

    hpcprune prune --config configs/fmnist_lenet300_distill.yaml     # distill: {weight: 0.5, temperature: 4}

loss = (1 - α) · CE(student, labels) + α · T² · KL(softmax(teacher / T) ‖ softmax(student / T))
(Hinton et al. 2015); T² keeps the soft term's gradients on the scale of the hard one. The teacher
is the dense model as recorded in the run's states (`dense.safetensors`), frozen, in eval mode.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hpcprune.config import DistillConfig
from hpcprune.models.builders import load_checkpoint
from hpcprune.prune.masks import unwrap


class DistillationLoss:
    def __init__(self, teacher: nn.Module, cfg: DistillConfig):
        self.teacher, self.temperature, self.weight = teacher, cfg.temperature, cfg.weight

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = self.teacher(inputs)
        hard = F.cross_entropy(logits, targets)
        soft = F.kl_div(F.log_softmax(logits / self.temperature, dim=1),
                        F.log_softmax(teacher_logits / self.temperature, dim=1),
                        reduction="batchmean", log_target=True) * self.temperature ** 2
        return (1 - self.weight) * hard + self.weight * soft


def distillation_loss(cfg: DistillConfig, model: nn.Module, dense_state: str | Path) -> DistillationLoss | None:
    """The fine-tuning loss with `model`'s dense weights from `dense_state` as teacher; None when off."""
    if cfg.weight == 0:
        return None
    teacher = copy.deepcopy(unwrap(model))
    load_checkpoint(teacher, dense_state)
    teacher.eval().requires_grad_(False)
    return DistillationLoss(teacher, cfg)
