"""World over torch.distributed (gloo): ranks started by `torchrun`, or by plain `srun` without MPI.

    torchrun --nproc_per_node 2 -m hpcprune prune --config configs/oneshot_global.yaml
    srun --ntasks 4 hpcprune prune --config configs/oneshot_global.yaml

The World's collectives run on a gloo group on the CPU (they move numpy arrays), whatever backend
DDP later uses for gradients. Byte messages go point to point in bounded pieces (`hpcprune.dist.pieces`):
gloo has no variable-size gather, and padding every rank's bytes to the longest would cost each
rank the largest message. A failed collective says what happened: a peer that died raises
`PeerLost` (a surviving rank then says only that it stops, instead of a second copy of the peer's
error), a peer that never came within the timeout `CollectiveTimeout`, ranks that ran different
collectives (seen with TORCH_DISTRIBUTED_DEBUG=DETAIL) `CollectiveMismatch`; anything else is
raised as torch raised it.
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

from hpcprune.dist.ddp import COLLECTIVE_TIMEOUT, shutdown_process_group
from hpcprune.dist.rendezvous import store_by_announcement
from hpcprune.dist.world import CollectiveMismatch, CollectiveTimeout, PeerLost, World, is_peer_loss

Result = TypeVar("Result")


class TorchWorld(World):
    name = "torch"

    def __init__(self, rank: int, size: int, local_rank: int, *, init_method: str | None = None,
                 store: dist.Store | None = None) -> None:
        self.rank, self.size, self.local_rank = rank, size, local_rank
        if not dist.is_initialized():
            # gloo: the World moves numpy arrays on the CPU whatever the run's device; DDP on CUDA
            # makes its own nccl group once it knows the device (hpcprune.dist.ddp).
            dist.init_process_group("gloo", init_method=init_method, store=store, rank=rank, world_size=size,
                                    timeout=COLLECTIVE_TIMEOUT)
        self.group = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)

    def allreduce_sum(self, array: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(np.array(array, copy=True))
        _collective(lambda: dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group))
        return tensor.numpy()

    def _send_array(self, array: np.ndarray, dest: int) -> None:
        tensor = _tensor_of(array)
        _collective(lambda: dist.send(tensor, dst=dest, group=self.group))

    def _recv_array(self, array: np.ndarray, source: int) -> None:
        tensor = torch.from_numpy(array)  # received into the array's own memory
        _collective(lambda: dist.recv(tensor, src=source, group=self.group))

    def _broadcast_array(self, array: np.ndarray, root: int) -> None:
        tensor = _tensor_of(array) if self.rank == root else torch.from_numpy(array)
        _collective(lambda: dist.broadcast(tensor, src=root, group=self.group))

    def barrier(self) -> None:
        _collective(lambda: dist.barrier(group=self.group))

    def abort(self, exit_code: int) -> None:
        # Leaving is enough: the peers' next collective fails at once (closed connection) or at the
        # timeout, and torchrun ends the remaining workers when one exits non-zero.
        os._exit(exit_code)

    def close(self) -> None:
        shutdown_process_group()


def _tensor_of(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing `array`'s memory; a read-only view (of bytes) is copied, one piece at most."""
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _collective(call: Callable[[], Result]) -> Result:
    try:
        return call()
    except (RuntimeError, dist.DistError) as error:
        failure = collective_failure(error)
        if failure is error:
            raise
        raise failure from error


# How gloo and c10d word what happened (the exception types do not tell).
TIMEOUT_MESSAGES = ("Timed out", "timed out", "Timeout")
MISMATCH_MESSAGES = ("mismatch between collectives",)
EXPLAINED = (PeerLost, CollectiveTimeout, CollectiveMismatch)


def collective_failure(error: BaseException) -> BaseException:
    """What a failed collective means, as the exception this rank raises (other errors as they are)."""
    if not isinstance(error, (RuntimeError, dist.DistError)) or isinstance(error, EXPLAINED):
        return error
    text = str(error)
    first_line = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    if is_peer_loss(error):
        return PeerLost(f"another rank is gone ({first_line[:200]})")
    if any(message in text for message in TIMEOUT_MESSAGES):
        return CollectiveTimeout(f"a collective waited {COLLECTIVE_TIMEOUT.total_seconds():g} s "
                                 f"(HPCPRUNE_COLLECTIVE_TIMEOUT) for a rank that never came: it hangs, is far "
                                 f"slower, or runs another collective ({first_line[:200]})")
    if any(message in text for message in MISMATCH_MESSAGES):
        return CollectiveMismatch(f"the ranks ran different collectives at the same step: {first_line[:300]}")
    return error


def from_torchrun() -> World | None:
    """torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous MASTER_ADDR/MASTER_PORT."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and not {"RANK", "WORLD_SIZE", "MASTER_ADDR"} <= os.environ.keys():
        return None
    return TorchWorld(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)),
                      init_method="env://")


def joined_by_announcement(rank: int, size: int, local_rank: int, host: str, job_id: str, step: str) -> TorchWorld:
    """A TorchWorld of ranks that share nothing yet but a job id (srun, submitit): see hpcprune.dist.rendezvous."""
    store, announcer = store_by_announcement(host, rank, size, job_id, step, COLLECTIVE_TIMEOUT)
    try:
        return TorchWorld(rank, size, local_rank, store=store)
    finally:  # the process group is formed: every rank has found the store
        if announcer is not None:
            announcer.close()


def from_srun() -> World | None:
    """A job step started by srun: ranks from SLURM_*, rendezvous on the step's first node."""
    size = int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1")))
    if "SLURM_PROCID" not in os.environ or "SLURM_STEP_ID" not in os.environ or size < 2:
        return None
    address = os.environ.get("MASTER_ADDR") or _first_host(os.environ.get("SLURM_STEP_NODELIST", os.environ.get("SLURM_JOB_NODELIST", "")))
    rank, local_rank = int(os.environ["SLURM_PROCID"]), int(os.environ.get("SLURM_LOCALID", 0))
    if "MASTER_PORT" in os.environ:  # the user's choice, taken as given
        return TorchWorld(rank, size, local_rank, init_method=f"tcp://{address}:{os.environ['MASTER_PORT']}")
    job = os.environ.get("SLURM_JOB_ID", "0")
    return joined_by_announcement(rank, size, local_rank, address, job, f"slurm-{job}.{os.environ['SLURM_STEP_ID']}")


def _first_host(nodelist: str) -> str:
    if not nodelist:
        return "127.0.0.1"
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True, timeout=30)
        return hosts.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return nodelist.split(",")[0]
