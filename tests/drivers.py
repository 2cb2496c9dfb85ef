"""Entry points the distributed tests start under mpirun/torchrun (real launchers, real ranks).

    mpirun -n 3 python -m tests.drivers masks OUT_DIR NAME:KEY=VALUE;KEY=VALUE ...
    mpirun -n 2 python -m tests.drivers train OUT_DIR [hpcprune prune args]
    mpirun -n 2 python -m tests.drivers cli [hpcprune prune args]   (with an extra failing criterion)
    mpirun -n 2 python -m tests.drivers gradual OUT_DIR CONFIG KEY=VALUE ...   (records each mask update)
    mpirun -n 2 python -m tests.drivers rng OUT_DIR     (each rank's generators saved on rank 0, restored)
    HPCPRUNE_MAX_MESSAGE_BYTES=7 mpirun -n 3 python -m tests.drivers messages OUT.json
    mpirun -n 2 python -m tests.drivers gather_growth OUT_DIR BYTES
    mpirun -n 2 python -m tests.drivers traced OUT_DIR [hpcprune prune args]   (peak of traced allocations)
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from hpcprune import registry
from hpcprune.config import load_config
from hpcprune.dist import ddp
from hpcprune.dist.detect import detect_world
from hpcprune.models.builders import save_checkpoint
from hpcprune.prune.gradual import GradualPruner
from hpcprune.prune.masks import unwrap
from hpcprune.prune.scoring import CRITERIA
from hpcprune.run.pipeline import run
from hpcprune.train.checkpoint import restore_rng, rng_of_every_rank

REFERENCE = Path(__file__).resolve().parent.parent / "configs" / "oneshot_global.yaml"


def masks(out_dir: str, *cases: str) -> None:
    """Run every case (name:override;override) in one launch: one mpirun per world size, not per case."""
    world = detect_world()
    for case in cases:
        name, _, overrides = case.partition(":")
        config = load_config(REFERENCE, [o for o in overrides.split(";") if o] + [f"output.path={out_dir}/{name}.h5", "progress=false"])
        run(config, world, force=True)
    world.close()


def train(out_dir: str, config_path: str, *overrides: str) -> None:
    """One run with fine-tuning; every rank then saves the parameters it ended with, and the process
    groups it trained with (rank<r>.json: the default group's backend, how many nccl groups were made)."""
    world = detect_world()
    config = load_config(config_path, list(overrides) + [f"output.path={out_dir}/run.h5", "progress=false"])
    result = run(config, world, force=True)
    save_checkpoint(result.model, f"{out_dir}/rank{world.rank}.safetensors")
    groups = {"default": dist.get_backend() if dist.is_initialized() else None, "nccl": len(ddp._nccl_groups)}
    Path(out_dir, f"rank{world.rank}.json").write_text(json.dumps(groups))
    world.close()


def gradual(out_dir: str, config_path: str, *overrides: str) -> None:
    """One gradual run; rank 0 writes every mask update to OUT_DIR/updates.json: its schedule step,
    s_t, kept count, and a digest of the model's zero pattern (the masks, while no kept weight is 0)."""
    world = detect_world()
    config = load_config(config_path, list(overrides) + [f"output.path={out_dir}/run.h5", "progress=false"])
    seen = []
    making_update = GradualPruner.__call__

    def recording(pruner, enforcer, batches):
        before = len(pruner.updates)
        making_update(pruner, enforcer, batches)
        if len(pruner.updates) > before:
            step, sparsity, kept = pruner.updates[-1]
            weights = [p.detach() for name, p in unwrap(pruner._model).named_parameters() if p.dim() > 1]
            zeros = hashlib.sha256(b"".join((weight != 0).numpy().tobytes() for weight in weights)).hexdigest()
            seen.append({"step": step, "sparsity": sparsity, "kept": kept, "masks": zeros})

    GradualPruner.__call__ = recording
    run(config, world, force=True)
    if world.is_root:
        Path(out_dir, "updates.json").write_text(json.dumps(seen))
    world.close()


def rng(out_dir: str) -> None:
    """Every rank seeds its generators differently, rank 0 saves all of them as a training checkpoint
    does, every rank loses its state and restores it from the file; each writes what it drew after
    saving and after restoring (CPU, and its own GPU when there is one)."""
    world = detect_world()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(world.local_rank)
        torch.cuda.init()
    torch.manual_seed(100 + world.rank)  # seeds this rank's GPU too
    saved = rng_of_every_rank(world)
    devices = ["cpu", "cuda"] if cuda else ["cpu"]
    expected = {device: torch.rand(4, device=device).tolist() for device in devices}
    if world.is_root:
        torch.save({"ranks": saved}, Path(out_dir, "rng.pt"))
    world.barrier()
    torch.manual_seed(999)
    restore_rng(torch.load(Path(out_dir, "rng.pt"), weights_only=True), world.rank)
    restored = {device: torch.rand(4, device=device).tolist() for device in devices}
    Path(out_dir, f"rank{world.rank}.json").write_text(json.dumps({"expected": expected, "restored": restored}))
    world.close()


def explode_on_failing_rank(spec, weight, context, out=None):
    if os.environ.get("HPCPRUNE_TEST_FAIL_RANK") == os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("RANK")):
        raise RuntimeError("injected failure during scoring")
    return weight.detach().abs()


def cli(*args: str) -> None:
    """The real CLI, with one more criterion that fails on $HPCPRUNE_TEST_FAIL_RANK."""
    from hpcprune.cli import main

    CRITERIA["explode"] = explode_on_failing_rank
    registry.CRITERIA["weight"] = (*registry.CRITERIA["weight"], "explode")
    sys.argv = ["hpcprune", *args]
    main()


MESSAGE_SIZES = (0, 1, 6, 7, 8, 15, 64)


def message_bytes(sender: int, size: int) -> bytes:
    """What `sender` sends as its message of `size` bytes: different for every sender and size."""
    return bytes((sender * 31 + size + i) % 251 for i in range(size))


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def messages(out_file: str) -> None:
    """Every byte message of the World once: rank 0 records (as digests) what it received."""
    world = detect_world()
    received = {"sent": [], "broadcast": [], "gathered": []}
    for size in MESSAGE_SIZES:  # every rank sends rank 0 its messages, in order
        if world.rank:
            world.send_bytes(message_bytes(world.rank, size), 0)
    if world.is_root:
        received["sent"] = [[digest(world.recv_bytes(rank)) for size in MESSAGE_SIZES] for rank in range(1, world.size)]
    for root in range(world.size):
        data = world.broadcast_bytes(message_bytes(root, 20 + root) if world.rank == root else None, root=root)
        received["broadcast"].append(digest(data))
    gathered = world.gather_bytes(message_bytes(world.rank, 3 * world.rank))
    if world.is_root:
        received["gathered"] = [digest(data) for data in gathered]
        Path(out_file).write_text(json.dumps(received))
    world.barrier()
    world.close()


def gather_growth(out_dir: str, nbytes: str) -> None:
    """Rank 0 gathers `nbytes` of its own and none of the others': each rank records how much its
    peak RSS grew in the gather (KiB)."""
    world = detect_world()
    data = bytes(int(nbytes)) if world.is_root else b""
    world.barrier()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    world.gather_bytes(data)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    Path(out_dir, f"rank{world.rank}.json").write_text(json.dumps({"grown_kib": grown}))
    world.barrier()
    world.close()


def traced(out_dir: str, *args: str) -> None:
    """The real CLI under tracemalloc (started after the imports): each rank records the peak bytes
    that Python and numpy allocated while the run ran."""
    import tracemalloc

    from hpcprune.cli import main
    from hpcprune.dist.detect import launcher_rank

    sys.argv = ["hpcprune", *args]
    tracemalloc.start()
    try:
        main()
    except SystemExit as stop:
        if stop.code:
            raise
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    Path(out_dir, f"traced{launcher_rank()}.json").write_text(json.dumps({"peak_bytes": peak}))


if __name__ == "__main__":
    {"masks": masks, "train": train, "cli": cli, "gradual": gradual, "rng": rng, "messages": messages,
     "gather_growth": gather_growth, "traced": traced}[sys.argv[1]](*sys.argv[2:])
