"""Models the tests name in configs as `tests.fixture_models:<builder>` (package.module:callable)."""

from __future__ import annotations

import os

import torch
from torch import nn


def tied_mlp(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """Several layers whose weights take only 7 values, so nearly every score is exactly tied."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(),
                          nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, num_classes))
    generator = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randint(-3, 4, parameter.shape, generator=generator).float() / 4)
    return model


class FailsInTraining(nn.Module):
    """A small MLP whose forward raises on the rank named by $HPCPRUNE_TEST_FAIL_RANK once training starts."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.training and os.environ.get("HPCPRUNE_TEST_FAIL_RANK") == _rank():
            raise RuntimeError("injected failure during fine-tuning")
        return self.body(images)


def _rank() -> str:
    return os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("RANK", "0"))
