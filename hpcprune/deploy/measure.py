"""What an export saves, measured on the file as written: parameters, bytes, FLOPs and accuracy.

    hpcprune export runs/quickstart.h5 --format compact --out model.safetensors   # prints these figures
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hpcprune import registry
from hpcprune.deploy.formats import load_exported
from hpcprune.deploy.quantize import int8_parameters
from hpcprune.deploy.round_model import RoundModel
from hpcprune.dist.world import SingleWorld
from hpcprune.train.finetune import evaluate

log = logging.getLogger("hpcprune")
NOT_MEASURED = "a Hugging Face model: FLOPs and accuracy are measured on images"


@dataclass
class ExportReport:
    format: str
    round: int
    path: str
    parameters: int  # elements of the stored model's parameters (int8 weights included)
    nonzero_parameters: int
    bytes: int  # the file on disk
    dense_bytes: int  # the round's full dense state as float tensors, for comparison
    flops: float  # per sample, 2 x multiply-accumulates of Conv2d and Linear; NaN without a module
    nonzero_flops: float  # the same, counting only nonzero weights
    accuracy: float  # test accuracy of the exported model as loaded back; NaN without data
    recorded_accuracy: float
    details: dict[str, Any] = field(default_factory=dict)
    not_measured: str = ""  # why FLOPs and accuracy are n/a, when it is not "no module" or "no data"

    def render(self) -> str:
        def ratio(part: float, whole: float) -> str:
            return f"{part / whole:.3f}x" if whole and not math.isnan(part) else "n/a"

        no_module = self.not_measured or "no module"
        missing = no_module if math.isnan(self.flops) else self.not_measured or "no data"
        accuracy = f"n/a ({missing})" if math.isnan(self.accuracy) else f"{100 * self.accuracy:.2f} %"
        recorded = "" if math.isnan(self.recorded_accuracy) else f" (round {self.round} recorded {100 * self.recorded_accuracy:.2f} %)"
        flops = f"n/a ({no_module})" if math.isnan(self.flops) else f"{self.flops:,.0f} per sample, {self.nonzero_flops:,.0f} with nonzero weights"
        return (
            f"export     {self.path} ({self.format}, round {self.round})\n"
            f"parameters {self.parameters:,} stored, {self.nonzero_parameters:,} nonzero\n"
            f"bytes      {self.bytes:,} on disk ({ratio(self.bytes, self.dense_bytes)} the dense {self.dense_bytes:,})\n"
            f"flops      {flops}\n"
            f"accuracy   {accuracy}{recorded}"
        )


def measure(job: RoundModel, fmt: str, out: Path, details: dict[str, Any]) -> ExportReport:
    """Figures of the export as written: loaded back from `out`, so the file itself is what is measured."""
    loaded = load_exported(out)
    model = loaded.model
    parameters, nonzero = _parameter_counts(model, loaded.state)
    text_model = job.architecture["name"].startswith(registry.HF_PREFIX)
    flops, nonzero_flops = (math.nan, math.nan) if model is None or text_model else count_flops(model, job.architecture["input_shape"])
    accuracy = math.nan
    if model is not None and job.splits is not None:
        accuracy = evaluate(model, job.splits.test, world=SingleWorld(), device=torch.device("cpu"),
                            batch_size=job.config.data.eval_batch_size)[1]
    elif job.data_problem:
        log.warning("no accuracy for the export: %s", job.data_problem)
    dense_bytes = sum(tensor.nbytes for tensor in job.state.values())
    return ExportReport(fmt, job.round, str(out), parameters, nonzero, out.stat().st_size, dense_bytes,
                        flops, nonzero_flops, accuracy, job.recorded_accuracy, details,
                        NOT_MEASURED if text_model else "")


def _parameter_counts(model: nn.Module | None, state: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(stored, nonzero) parameter elements; int8 weights count as parameters too."""
    if model is None:
        tensors = [tensor for tensor in state.values() if tensor.is_floating_point()]
    else:
        tensors = [param.detach() for param in model.parameters()]
        tensors += [tensor for module in model.modules() for tensor in int8_parameters(module)]
    return sum(t.numel() for t in tensors), sum(int(t.count_nonzero()) for t in tensors)


@torch.no_grad()
def count_flops(model: nn.Module, input_shape) -> tuple[float, float]:
    """(FLOPs, FLOPs of nonzero weights) of one sample: 2 per multiply-accumulate of Conv2d and Linear."""
    totals = [0.0, 0.0]

    def weight_of(module: nn.Module) -> torch.Tensor | None:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            return module.weight
        quantized = int8_parameters(module)
        return quantized[0] if quantized else None

    def count(module: nn.Module, inputs, output) -> None:
        weight = weight_of(module)
        # Each weight is used once per output position: per pixel for a conv, once for a Linear.
        positions = output[0, 0].numel() if isinstance(module, nn.Conv2d) else output.numel() // output.shape[-1]
        totals[0] += 2.0 * weight.numel() * positions
        totals[1] += 2.0 * int(weight.count_nonzero()) * positions

    hooks = [module.register_forward_hook(count) for module in model.modules() if weight_of(module) is not None]
    try:
        model.eval()(torch.zeros(1, *input_shape))
    finally:
        for hook in hooks:
            hook.remove()
    return totals[0], totals[1]
