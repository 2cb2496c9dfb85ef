"""World over torch.distributed (gloo): ranks started by `torchrun`, or by plain `srun` without MPI.

    torchrun --nproc_per_node 2 -m hpcprune prune --config configs/oneshot_global.yaml
    srun --ntasks 4 hpcprune prune --config configs/oneshot_global.yaml

The World's collectives run on a gloo group on the CPU (they move numpy arrays), whatever backend
DDP later uses for gradients. A collective that fails because a peer died raises `PeerLost`, so a
surviving rank reports "another rank failed" instead of a second copy of the same error.
"""

from __future__ import annotations

import datetime
import os
import subprocess
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from hpcprune.dist.ddp import shutdown_process_group
from hpcprune.dist.world import PeerLost, World

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("HPCPRUNE_COLLECTIVE_TIMEOUT", "300")))
Result = TypeVar("Result")


class TorchWorld(World):
    name = "torch"

    def __init__(self, rank: int, size: int, local_rank: int, init_method: str) -> None:
        self.rank, self.size, self.local_rank = rank, size, local_rank
        if not dist.is_initialized():
            backend = "cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size, timeout=COLLECTIVE_TIMEOUT)
        self.group = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)

    def allreduce_sum(self, array: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(np.array(array, copy=True))
        _collective(lambda: dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group))
        return tensor.numpy()

    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        length = torch.tensor([len(data) if self.rank == root else 0], dtype=torch.int64)
        _collective(lambda: dist.broadcast(length, src=root, group=self.group))
        buffer = _bytes_tensor(data) if self.rank == root else torch.empty(int(length), dtype=torch.uint8)
        _collective(lambda: dist.broadcast(buffer, src=root, group=self.group))
        return buffer.numpy().tobytes()

    def gather_bytes(self, data: bytes, root: int = 0) -> list[bytes] | None:
        # gloo has no variable-size gather: agree on the largest length, pad, gather, trim.
        lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        _collective(lambda: dist.all_gather(lengths, torch.tensor([len(data)], dtype=torch.int64), group=self.group))
        longest = max(int(length) for length in lengths)
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[: len(data)] = _bytes_tensor(data)
        buffers = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.size)] if self.rank == root else None
        _collective(lambda: dist.gather(padded, buffers, dst=root, group=self.group))
        if self.rank != root:
            return None
        return [buffer[: int(length)].numpy().tobytes() for buffer, length in zip(buffers, lengths)]

    def barrier(self) -> None:
        _collective(lambda: dist.barrier(group=self.group))

    def abort(self, exit_code: int) -> None:
        # Leaving is enough: the peers' next collective fails at once (closed connection) or at the
        # timeout, and torchrun ends the remaining workers when one exits non-zero.
        os._exit(exit_code)

    def close(self) -> None:
        shutdown_process_group()


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def _collective(call: Callable[[], Result]) -> Result:
    try:
        return call()
    except (RuntimeError, dist.DistError) as error:
        raise PeerLost(f"a collective failed, most likely because another rank failed ({str(error).splitlines()[0]})") from error


def from_torchrun() -> World | None:
    """torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous MASTER_ADDR/MASTER_PORT."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and not {"RANK", "WORLD_SIZE", "MASTER_ADDR"} <= os.environ.keys():
        return None
    return TorchWorld(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)), "env://")


def from_srun() -> World | None:
    """A job step started by srun: ranks from SLURM_*, rendezvous on the step's first node."""
    size = int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1")))
    if "SLURM_PROCID" not in os.environ or "SLURM_STEP_ID" not in os.environ or size < 2:
        return None
    address = os.environ.get("MASTER_ADDR") or _first_host(os.environ.get("SLURM_STEP_NODELIST", os.environ.get("SLURM_JOB_NODELIST", "")))
    # A port derived from the job and step ids: every rank computes the same one, and concurrent
    # steps on one node do not collide.
    port = os.environ.get("MASTER_PORT") or str(20000 + (int(os.environ.get("SLURM_JOB_ID", 0)) * 7 + int(os.environ.get("SLURM_STEP_ID", 0))) % 20000)
    return TorchWorld(int(os.environ["SLURM_PROCID"]), size, int(os.environ.get("SLURM_LOCALID", 0)), f"tcp://{address}:{port}")


def _first_host(nodelist: str) -> str:
    if not nodelist:
        return "127.0.0.1"
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True, timeout=30)
        return hosts.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return nodelist.split(",")[0]
