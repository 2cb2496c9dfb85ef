"""Step 5 — calibrate: statistics of the model over a few data batches, for the data-dependent criteria.

    hpcprune prune --config configs/fmnist_lenet300_wanda.yaml   # prune.criterion: wanda (or taylor, snip)

Calibration batch b is samples [b*batch_size, (b+1)*batch_size) of `calibration.split` in its stored
order, and rank r computes the batches b with b mod size == r: the same batches whatever the world
size, and a rank may get none (fewer batches than ranks). A batch is the unit: its statistic is one
float64 term, computed the same way on whichever rank holds it, and the terms of all batches are
added with `hpcprune.dist.exact_sum` (int64 fixed point, one rounding per term), so the totals have
the same bits for 1, 2, 3 or 4 ranks and any batch count. Input norms and gradients are reduced
tensor by tensor. tests/test_calibrate.py and the mask cases of tests/test_distributed.py check
bit-identical statistics and masks for 1 to 4 ranks.

Statistics (float32 after the reduction, on every rank):
- input_norms (wanda): ‖X_j‖₂ of every input feature j of a prunable module, over all samples and
  positions. A Linear's feature is its input coordinate (tokens of a sequence count as samples). A
  Conv2d's feature is a column of the unfolded input (in channel, kernel row, kernel column), in the
  order of the weight's flat input dimension, so |W| * norm is Wanda's score for convolutions too.
- gradients (taylor, snip): ∂L/∂w of the mean cross-entropy over all calibration samples, with the
  model in eval mode (no dropout, BatchNorm's running statistics untouched). `sensitivity_total` is
  the sum of |g·w| over every prunable weight, SNIP's normaliser: every rank computes it over all
  tensors in plan order from the exact mean gradients (numpy's fixed pairwise sums), so it does not
  depend on which rank owns which tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import default_collate

from hpcprune.config import CalibrationConfig
from hpcprune.dist.exact_sum import ExactSum, SpreadTooWide, reduce_exactly
from hpcprune.dist.world import World
from hpcprune.errors import UsageError
from hpcprune.prune.masks import unwrap
from hpcprune.prune.plan import Plan

INPUT_NORMS, GRADIENTS = "input_norms", "gradients"

# Which statistics a criterion needs; criteria not listed need none (and no data).
NEEDS: dict[str, tuple[str, ...]] = {
    "taylor": (GRADIENTS,),
    "snip": (GRADIENTS,),
    "wanda": (INPUT_NORMS,),
}

# (inputs, targets or None): one calibration batch, inputs as the model's forward takes them
Batch = tuple[object, torch.Tensor | None]

RETRIES = 3  # passes with fewer fixed-point bits after a SpreadTooWide, before giving up


@dataclass
class Statistics:
    samples: int = 0  # calibration samples over all ranks
    input_norms: dict[str, torch.Tensor] = field(default_factory=dict)  # weight name -> ‖X_j‖₂, flat input order
    gradients: dict[str, torch.Tensor] = field(default_factory=dict)  # weight name -> mean gradient (this rank's tensors)
    sensitivity_total: float = math.nan  # Σ |g·w| over all prunable weights


def calibrate(model: nn.Module, plan: Plan, batches: "CalibrationBatches", world: World, criterion: str,
              device: torch.device) -> Statistics:
    """The statistics `criterion` needs, identical on every rank for any world size."""
    bits = None
    for _ in range(RETRIES):
        try:
            return _calibrate_once(model, plan, batches, world, criterion, device, bits)
        except SpreadTooWide as refused:  # raised on every rank alike: all pass again with the same bits
            bits = refused.mantissa_bits if bits is None else min(bits, refused.mantissa_bits)
    raise RuntimeError(f"calibration: the batches' scales still differ too much after {RETRIES} passes")


def _calibrate_once(model, plan: Plan, batches, world: World, criterion: str, device, bits: int | None) -> Statistics:
    needs = NEEDS.get(criterion, ())
    module = unwrap(model)
    weights = _prunable_weights(module, plan)
    was_training = module.training
    module.eval()
    try:
        with _InputNormHooks(module, plan, batches.count, device, bits, enabled=INPUT_NORMS in needs) as norms:
            sums = _gradient_sums(weights, batches.count, device, bits) if GRADIENTS in needs else {}
            samples = 0
            for inputs, targets in batches.mine(world):
                samples += _accumulate(module, inputs, targets, weights, sums, device, criterion)
                norms.end_batch()
    finally:
        module.train(was_training)
    total_samples = int(world.allreduce_sum(np.array([samples], dtype=np.int64))[0])
    if total_samples == 0:
        raise UsageError("calibration: no calibration samples (calibration.batches or the split is empty)")
    statistics = Statistics(samples=total_samples)
    if INPUT_NORMS in needs:
        statistics.input_norms = _reduce_norms(norms, plan, world)
    if GRADIENTS in needs:
        statistics.gradients, statistics.sensitivity_total = _reduce_gradients(sums, weights, plan, world, total_samples)
    return statistics


def _prunable_weights(module: nn.Module, plan: Plan) -> dict[str, nn.Parameter]:
    params = dict(module.named_parameters())
    return {spec.name: params[spec.name] for spec in plan.tensors}


def _gradient_sums(weights: dict[str, nn.Parameter], batches: int, device, bits: int | None) -> dict[str, ExactSum]:
    return {name: _exact_sum(weight.shape, batches, device, bits) for name, weight in weights.items()}


def _exact_sum(shape, terms: int, device, bits: int | None) -> ExactSum:
    total = ExactSum.of(shape, terms, device)
    if bits is not None:
        total.mantissa_bits = bits
    return total


def _accumulate(module, inputs, targets, weights, sums, device, criterion) -> int:
    """One batch: a forward (the hooks take the input norms), and a backward when gradients are needed."""
    inputs = _to(inputs, device)
    if not sums:
        with torch.no_grad():
            _forward(module, inputs)
        return _batch_size(inputs)
    if targets is None:
        raise UsageError(f"criterion {criterion!r} needs labelled calibration data (a loss to differentiate)")
    logits = _forward(module, inputs)
    loss = F.cross_entropy(logits, targets.to(device), reduction="sum")  # summed: the mean is taken over all ranks
    grads = torch.autograd.grad(loss, list(weights.values()))  # leaves .grad alone: training state untouched
    for name, grad in zip(weights, grads):
        sums[name].add(grad)  # this batch's term
    return len(targets)


def _forward(module: nn.Module, inputs) -> torch.Tensor:
    output = module(**inputs) if isinstance(inputs, dict) else module(inputs)
    return output.logits if hasattr(output, "logits") else output


def _to(inputs, device: torch.device):
    if isinstance(inputs, dict):
        return {key: value.to(device) for key, value in inputs.items()}
    return inputs.to(device)


def _batch_size(inputs) -> int:
    first = next(iter(inputs.values())) if isinstance(inputs, dict) else inputs
    return len(first)


def _reduce_norms(norms: _InputNormHooks, plan: Plan, world: World) -> dict[str, torch.Tensor]:
    """Every tensor's squared feature norms summed exactly, then their square roots as float32."""
    names = [spec.name for spec in plan.tensors]
    seen = world.allreduce_sum(np.array([norms.batches_seen[name] for name in names], dtype=np.int64))
    missing = [name for name, count in zip(names, seen) if count == 0]
    if missing:  # every rank knows: all refuse together
        raise UsageError(f"calibration: no input seen for {missing[0]!r} (its module never ran in the forward)")
    return {name: reduce_exactly([norms.sums[name]], world)[0].sqrt().to(torch.float32).cpu() for name in names}


def _reduce_gradients(sums, weights, plan: Plan, world: World, samples: int) -> tuple[dict[str, torch.Tensor], float]:
    """Mean gradients of this rank's tensors, and Σ|g·w| over all tensors, the same on every rank."""
    local = {spec.name for spec in plan.local(world.rank)}
    gradients, sensitivity = {}, 0.0
    for spec in plan.tensors:  # every rank takes part in every tensor's reduction, in the same order
        (total,) = reduce_exactly([sums.pop(spec.name)], world)
        gradient = (total / samples).to(torch.float32).cpu()
        weight = weights[spec.name].detach().cpu().numpy().astype(np.float64)
        sensitivity += float(np.abs(gradient.numpy().astype(np.float64) * weight).sum())
        if spec.name in local:
            gradients[spec.name] = gradient
    return gradients, sensitivity


# --- input norms -----------------------------------------------------------------------------


def feature_squares(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Σ x_j² per input feature of `module` over one batch, float64, in the weight's flat input order."""
    if isinstance(module, nn.Linear):
        return inputs.detach().reshape(-1, inputs.shape[-1]).to(torch.float64).square().sum(0)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or isinstance(module.padding, str):
            raise UsageError(f"calibration: wanda supports Conv2d with groups=1 and numeric padding, not {module}")
        columns = F.unfold(inputs.detach(), module.kernel_size, dilation=module.dilation,
                           padding=module.padding, stride=module.stride)  # N x (C*kh*kw) x positions
        return columns.to(torch.float64).square().sum(dim=(0, 2))
    raise UsageError(f"calibration: wanda supports Linear and Conv2d layers, not {type(module).__name__} "
                     "(exclude it with prune.exclude)")


class _InputNormHooks:
    """Forward pre-hooks on the modules of prunable weights: each batch's squared input features, one
    exact-sum term per batch and tensor (`end_batch`)."""

    def __init__(self, module: nn.Module, plan: Plan, batches: int, device, bits: int | None, *, enabled: bool):
        specs = {spec.name: spec for spec in plan.tensors} if enabled else {}
        self._modules = {}  # weight name -> the module it belongs to
        for name, child in module.named_modules():
            weight = f"{name}.weight" if name else "weight"
            if weight in specs:
                self._modules[weight] = child
        # One sum per tensor, made before any batch: a rank without batches adds empty sums in the same order.
        self.sums = {name: _exact_sum((spec.numel // spec.shape[0],), batches, device, bits) for name, spec in specs.items()}
        self.batches_seen = dict.fromkeys(specs, 0)
        self._batch: dict[str, torch.Tensor] = {}
        self._handles = []

    def __enter__(self) -> _InputNormHooks:
        for weight_name, module in self._modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(weight_name)))
        return self

    def _hook(self, weight_name: str) -> Callable:
        def add(module, args):
            squares = feature_squares(module, args[0])
            self._batch[weight_name] = self._batch[weight_name] + squares if weight_name in self._batch else squares
        return add

    def end_batch(self) -> None:
        for weight_name, term in self._batch.items():
            self.sums[weight_name].add(term)
            self.batches_seen[weight_name] += 1
        self._batch = {}

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()


# --- calibration data ------------------------------------------------------------------------


class CalibrationBatches:
    """Batch b of a calibration set, for b in 0..count-1; `mine` yields this rank's share."""

    def __init__(self, count: int, batch: Callable[[int], Batch]):
        self.count, self._batch = count, batch

    def mine(self, world: World) -> Iterator[Batch]:
        for index in range(world.rank, self.count, world.size):
            yield self._batch(index)

    @classmethod
    def of_dataset(cls, dataset, cfg: CalibrationConfig) -> CalibrationBatches:
        """Consecutive slices of a map-style dataset of (input, label) pairs."""
        size = len(dataset)
        count = min(cfg.batches, math.ceil(size / cfg.batch_size))

        def batch(index: int) -> Batch:
            start = index * cfg.batch_size
            inputs, targets = default_collate([dataset[i] for i in range(start, min(start + cfg.batch_size, size))])
            return inputs, targets

        return cls(count, batch)

    @classmethod
    def of_tensor(cls, sequences: torch.Tensor, cfg: CalibrationConfig,
                  to_inputs: Callable[[torch.Tensor], object]) -> CalibrationBatches:
        """Rows of `sequences` (e.g. token ids), batch_size at a time, unlabelled."""
        count = min(cfg.batches, math.ceil(len(sequences) / cfg.batch_size))

        def batch(index: int) -> Batch:
            rows = sequences[index * cfg.batch_size:(index + 1) * cfg.batch_size]
            return to_inputs(rows), None

        return cls(count, batch)
