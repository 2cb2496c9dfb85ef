"""torch.distributed for DDP fine-tuning, whatever started the ranks.

    mpirun -n 2 hpcprune prune --config configs/quickstart.yaml

Under torchrun or srun the TorchWorld has already initialised the process group. Under mpirun it
has not: rank 0 opens a TCPStore on a port the kernel picks and keeps (hpcprune.dist.rendezvous),
shares `host:port` through the World, and every rank joins (gloo on CPU, nccl on CUDA with one GPU
per local rank).
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hpcprune.dist.rendezvous import store_over
from hpcprune.dist.world import World

TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("HPCPRUNE_COLLECTIVE_TIMEOUT", "300")))


def ensure_process_group(world: World, device: torch.device) -> None:
    if world.size == 1 or dist.is_initialized():
        return
    host = os.environ.get("MASTER_ADDR") or socket.gethostname()
    store = store_over(world, host, int(os.environ.get("MASTER_PORT", 0)), TIMEOUT)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=world.rank, world_size=world.size, timeout=TIMEOUT)


def wrap_for_training(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """DDP over `model` when there are several ranks; the model itself otherwise."""
    if world.size == 1:
        return model
    ensure_process_group(world, device)
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def shutdown_process_group() -> None:
    if dist.is_initialized():
        # A barrier before teardown avoids a flaky "terminate called without an active exception".
        dist.barrier()
        dist.destroy_process_group()
