"""torch.distributed for DDP fine-tuning, whatever started the ranks.

    mpirun -n 2 hpcprune prune --config configs/quickstart.yaml

Under torchrun or srun the TorchWorld has already initialised the process group. Under mpirun it
has not: rank 0 picks a free port on its host and shares `host:port` through the World, then every
rank joins (gloo on CPU, nccl on CUDA with one GPU per local rank).
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hpcprune.dist.world import World

TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("HPCPRUNE_COLLECTIVE_TIMEOUT", "300")))


def ensure_process_group(world: World, device: torch.device) -> None:
    if world.size == 1 or dist.is_initialized():
        return
    address = world.broadcast_bytes(_rendezvous_address().encode() if world.is_root else None).decode()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{address}", rank=world.rank, world_size=world.size, timeout=TIMEOUT)


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


def _rendezvous_address() -> str:
    host = os.environ.get("MASTER_ADDR") or socket.gethostname()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))  # the kernel picks a free port; it is released for the process group to take
        port = probe.getsockname()[1]
    return f"{host}:{os.environ.get('MASTER_PORT', port)}"
