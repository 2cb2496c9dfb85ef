"""Training steps that are the same, bit for bit, at any world size: `finetune.step_batches: N`.

    hpcprune prune --config configs/fmnist_lenet300_gradual.yaml
    mpirun -n 2 hpcprune prune --config configs/fmnist_lenet300_gradual.yaml   # the same masks, bit for bit

DDP averages each rank's gradient with a float allreduce: which samples a rank's batch holds, how
the batch is grouped and the order of the additions all change with the world size, so after a few
steps the weights differ in their last bits, and masks chosen on them (the gradual schedule's
updates, the next round's selection) differ too. With `step_batches: N`, an optimizer step is N
batches of `data.batch_size`, cut in order from one permutation of the training set per epoch (the
same for every world size). Batch j of a step is computed on rank j mod n, with its own RNG seed
(dropout), and the gradient of its summed loss is one term of an exact sum
(`hpcprune.dist.exact_sum`), whose total is the same integer for any split of the terms over ranks.
The step's gradient is that total divided by the step's samples: the mean one process would take
over all of them. Replicas start from rank 0's tensors and stay equal, since every rank applies the
same gradient.

Each rank computes on one thread: torch's CPU kernels split a reduction (a bias gradient, a sum
over the batch) over threads and add the partial sums in an order that depends on their number,
so one rank with 2 threads would differ from 2 ranks with 1; the parallelism of exact steps is the
ranks' (launch one per core).

Precision: a batch's gradient keeps at least 50 significant bits relative to its largest element,
far beyond float32's 24. Cost: two collectives per step (the scales, then the gradient as int64,
twice the float32 bytes), no overlap of communication with the backward pass, which DDP has, and
one thread per rank.
BatchNorm's running statistics follow the batches a rank computes, so they would differ between
ranks: such models train with `step_batches` on one rank only, and are refused on more.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from hpcprune.dist.exact_sum import sum_kept_terms
from hpcprune.dist.threads import one_thread
from hpcprune.dist.world import World

BATCH_SEED_STRIDE = 1_000_003  # seeds of batches of different epochs never meet for epochs this long


@dataclass(frozen=True)
class Step:
    batches: int  # batches of data.batch_size in this step, over all ranks
    samples: int  # samples in those batches
    local: list[tuple[int, list[int]]]  # (batch index in the epoch, sample indices) computed by this rank


@dataclass(frozen=True)
class StepPlan:
    """Which samples each optimizer step of an epoch takes, and which of its batches this rank computes."""

    size: int  # training samples
    batch_size: int
    step_batches: int
    seed: int
    rank: int
    world_size: int

    @property
    def batches(self) -> int:
        """Batches per epoch (the last one may be short)."""
        return -(-self.size // self.batch_size)

    def epoch(self, epoch: int) -> Iterator[Step]:
        # The order of SeededShuffle, the one-process loader: step_batches 1 on one rank sees its batches.
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        for first in range(0, self.batches, self.step_batches):
            count = min(self.step_batches, self.batches - first)
            samples = min(self.size, (first + count) * self.batch_size) - first * self.batch_size
            local = [(index, order[index * self.batch_size:(index + 1) * self.batch_size])
                     for index in range(first, first + count) if (index - first) % self.world_size == self.rank]
            yield Step(count, samples, local)

    def batch_seed(self, epoch: int, index: int) -> int:
        return (self.seed * BATCH_SEED_STRIDE + epoch) * BATCH_SEED_STRIDE + index


def running_statistics_problem(model: nn.Module, world_size: int, key: str) -> str | None:
    """Why exact steps cannot train `model` on `world_size` ranks (BatchNorm buffers would drift apart), or None."""
    if world_size == 1:
        return None
    tracked = [name for name, module in model.named_modules()
               if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats]
    if not tracked:
        return None
    return (f"{key}: exact steps on {world_size} ranks cannot keep the running statistics of {tracked[0]!r} "
            f"({len(tracked)} BatchNorm layer(s)) equal on every rank; run on one rank, or remove {key} to "
            "train with DDP")


def share_replica(model: nn.Module, world: World) -> None:
    """Every rank starts from rank 0's parameters and buffers (what DDP's constructor does)."""
    if world.size == 1:
        return
    tensors = list(model.state_dict().values())
    payload = b"".join(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                       for tensor in tensors) if world.is_root else None
    payload = world.broadcast_bytes(payload)
    offset = 0
    with torch.no_grad():
        for tensor in tensors:
            size = tensor.numel() * tensor.element_size()
            raw = torch.frombuffer(bytearray(payload[offset:offset + size]), dtype=torch.uint8)
            tensor.copy_(raw.view(tensor.dtype).view(tensor.shape))
            offset += size


def exact_epoch(model: nn.Module, data: Dataset, plan: StepPlan, epoch: int, optimizer, enforcer, *,
                world: World, device: torch.device, loss_of: Callable, after_step: Callable | None,
                wrap_steps: Callable[[Iterator[Step]], Iterator[Step]] = iter) -> float:
    """One epoch of exact steps; returns the mean training loss over all samples (the same bits everywhere)."""
    model.train()
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    losses = []
    # On one thread: split over threads, a reduction (a bias gradient, a sum over the batch) adds its
    # partial sums in another order, and 1 rank with 2 threads would differ from 2 ranks with 1.
    with one_thread():
        for step in wrap_steps(plan.epoch(epoch)):
            _one_step(model, data, plan, epoch, step, parameters, losses, optimizer, enforcer,
                      world=world, device=device, loss_of=loss_of, after_step=after_step)
    loss_sum = sum_kept_terms(losses, (1,), plan.batches, world)
    return float(loss_sum[0] / plan.size) if plan.size else math.nan


def _one_step(model, data, plan: StepPlan, epoch: int, step: Step, parameters, losses: list, optimizer, enforcer, *,
              world: World, device, loss_of: Callable, after_step: Callable | None) -> None:
    """This rank's batches of `step`, the exact sum of all ranks' gradients, and the optimizer step."""
    terms = []
    for index, samples in step.local:
        inputs, targets = (part.to(device, non_blocking=True)
                           for part in default_collate([data[sample] for sample in samples]))
        torch.manual_seed(plan.batch_seed(epoch, index))
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(model(inputs), targets, inputs) * len(targets)  # summed: batches weigh by samples
        loss.backward()
        terms.append(_flat_gradient(parameters))
        losses.append(loss.detach().to(torch.float64).reshape(1))
    total = sum_kept_terms(terms, (_numel(parameters),), step.batches, world)
    _set_gradient(parameters, total / step.samples)
    take_step(optimizer, enforcer, after_step, step.batches)


def take_step(optimizer, enforcer, after_step: Callable | None, batches: int) -> None:
    """The optimizer step on the gradients in place, pruned weights held at 0 (DDP's steps use it too)."""
    if enforcer is not None:
        enforcer.before_step()
    optimizer.step()
    if enforcer is not None:
        enforcer.after_step()
    if after_step is not None:
        after_step(enforcer, batches)


def _numel(parameters: list[torch.Tensor]) -> int:
    return sum(parameter.numel() for parameter in parameters)


def _flat_gradient(parameters: list[torch.Tensor]) -> torch.Tensor:
    """This batch's gradient as one vector (a parameter the loss does not reach: zeros)."""
    return torch.cat([(parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)).reshape(-1)
                      for parameter in parameters])


def _set_gradient(parameters: list[torch.Tensor], flat: torch.Tensor) -> None:
    offset = 0
    for parameter in parameters:
        size = parameter.numel()
        parameter.grad = flat[offset:offset + size].view(parameter.shape).to(parameter.device, parameter.dtype)
        offset += size
