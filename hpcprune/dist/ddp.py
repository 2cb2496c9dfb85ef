"""torch.distributed for DDP fine-tuning, whatever started the ranks.

    mpirun -n 2 hpcprune prune --config configs/quickstart.yaml

Under torchrun or srun the TorchWorld has already initialised the process group. Under mpirun it
has not: rank 0 opens a TCPStore on a port the kernel picks and keeps (hpcprune.dist.rendezvous),
shares `host:port` through the World, and every rank joins. The default group is gloo; only when
the run's device is CUDA does DDP get an nccl group, after each rank has made its own GPU current.
Two ranks on one GPU are refused first, in one line (NCCL would fail on them).
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hpcprune.dist.failures import raise_on_every_rank
from hpcprune.dist.rendezvous import store_over
from hpcprune.dist.world import World
from hpcprune.errors import UsageError

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("HPCPRUNE_COLLECTIVE_TIMEOUT", "300")))

_nccl_groups: list[dist.ProcessGroup] = []  # the one nccl group of this process, once DDP trains on CUDA


def ensure_process_group(world: World, device: torch.device) -> None:
    """The default process group (gloo, whatever the device: NCCL gets a group of its own)."""
    if world.size == 1 or dist.is_initialized():
        return
    host = os.environ.get("MASTER_ADDR") or socket.gethostname()
    store = store_over(world, host, int(os.environ.get("MASTER_PORT", 0)), COLLECTIVE_TIMEOUT)
    dist.init_process_group("gloo", store=store, rank=world.rank, world_size=world.size, timeout=COLLECTIVE_TIMEOUT)


def training_group(device: torch.device) -> dist.ProcessGroup | None:
    """Where DDP averages gradients: the default group on the CPU; on CUDA an nccl group, made once,
    after this rank's GPU is made the current device (NCCL binds its communicator to it)."""
    if device.type != "cuda":
        return None
    torch.cuda.set_device(device)
    if not _nccl_groups:
        _nccl_groups.append(dist.new_group(backend="nccl", timeout=COLLECTIVE_TIMEOUT))
    return _nccl_groups[0]


def wrap_for_training(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """DDP over `model` when there are several ranks; the model itself otherwise."""
    if world.size == 1:
        return model
    ensure_process_group(world, device)
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, process_group=training_group(device))


def refuse_shared_gpus(world: World, device: torch.device) -> None:
    """Two ranks on one GPU: NCCL refuses to run, so say it in one line before any work (collective)."""
    if world.size == 1 or device.type != "cuda":
        return
    gathered = world.gather_bytes(f"{socket.gethostname()} {gpu_identity(device)}".encode())
    problem = b""
    if gathered is not None:
        users: dict[str, list[int]] = {}
        for rank, key in enumerate(gathered):
            users.setdefault(key.decode(), []).append(rank)
        shared = next(((key, ranks) for key, ranks in users.items() if len(ranks) > 1), None)
        if shared is not None:
            host, gpu = shared[0].split(" ", 1)
            problem = (f"device: cuda: ranks {', '.join(map(str, shared[1]))} on {host} would share GPU {gpu}, and "
                       f"NCCL needs one GPU per rank: start at most {torch.cuda.device_count()} rank(s) per node, give "
                       "each rank its own GPU (srun --gpus-per-task=1), or set device: cpu").encode()
    problem = world.broadcast_bytes(problem if world.is_root else None)
    if problem:
        raise_on_every_rank(world, UsageError(problem.decode()))


def gpu_identity(device: torch.device) -> str:
    """What tells one physical GPU from another, whatever CUDA_VISIBLE_DEVICES numbers it."""
    properties = torch.cuda.get_device_properties(device)
    uuid = getattr(properties, "uuid", None)
    if uuid is not None:
        return str(uuid)
    return ":".join(str(getattr(properties, name, "?")) for name in ("pci_domain_id", "pci_bus_id", "pci_device_id"))


def shutdown_process_group() -> None:
    if dist.is_initialized():
        # A barrier before teardown avoids a flaky "terminate called without an active exception".
        dist.barrier()
        dist.destroy_process_group()
        _nccl_groups.clear()
