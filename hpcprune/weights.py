"""Where the weights to score come from: the model in memory, or a safetensors checkpoint on disk.

    hpcprune prune --set model.name=checkpoint --set model.checkpoint=big.safetensors --set finetune.epochs=0

A `CheckpointWeights` reads one tensor at a time (open, read, close), so a rank holds only the
tensor it is scoring: a checkpoint larger than a rank's memory can still be scored and masked.
Its prunable tensors are the floating-point tensors of two or more dimensions named `*weight`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from hpcprune.errors import UsageError

FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


class Weights(Protocol):
    def get(self, name: str) -> torch.Tensor:
        """The tensor called `name` (a view of the live parameter, or a fresh copy from disk)."""


class ModelWeights:
    def __init__(self, model: nn.Module):
        self._parameters = dict(model.named_parameters())

    def get(self, name: str) -> torch.Tensor:
        return self._parameters[name].detach()


class CheckpointWeights:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.suffix != ".safetensors":
            raise UsageError(f"model.checkpoint {self.path}: model 'checkpoint' reads .safetensors files only")
        try:
            with safe_open(self.path, framework="pt") as checkpoint:
                self.shapes = {name: tuple(checkpoint.get_slice(name).get_shape()) for name in checkpoint.keys()}
                self.dtypes = {name: checkpoint.get_slice(name).get_dtype() for name in checkpoint.keys()}
        except (OSError, SafetensorError) as error:
            raise UsageError(f"cannot read checkpoint {self.path}: {error}") from None

    def prunable(self) -> list[tuple[str, tuple[int, ...]]]:
        """Floating tensors of 2+ dimensions named *weight, in file order."""
        return [(name, shape) for name, shape in self.shapes.items()
                if len(shape) >= 2 and self.dtypes[name] in FLOAT_DTYPES and name.endswith("weight")]

    def get(self, name: str) -> torch.Tensor:
        # Opened per tensor: the file stays mapped only while this one tensor is copied out.
        with safe_open(self.path, framework="pt") as checkpoint:
            return checkpoint.get_tensor(name)
