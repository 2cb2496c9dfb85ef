"""Tasks for tests/test_fanout.py that fail on purpose; a module of their own, so that SLURM array
tasks (which import what they run by module name) find them as `tests.fanout_tasks`."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from pathlib import Path

from hpcprune.run.fanout import run_shard


def _count_call(folder: str, rank: int) -> tuple[Path, int]:
    """Leave calls/<rank>-<stage>-<unique> beside the round folder; the stage is the one not yet reduced."""
    root = Path(folder)
    stage = 1 + len(list(root.glob("stage-*/reduced.npy")))
    (root.parent / "calls").mkdir(exist_ok=True)
    (root.parent / "calls" / f"{rank}-{stage}-{uuid.uuid4().hex}").touch()
    return root.parent, stage


def killed_once(folder: str, rank: int) -> str:
    """run_shard, except that on its first run shard 1 SIGKILLs itself (no exception, no output) as
    soon as stage 1 is summed: while it works on stage 2 or waits for its sum."""
    beside, _ = _count_call(folder, rank)
    if rank == 1 and not (beside / "killed").exists():
        threading.Thread(target=_kill_once_summed, args=(Path(folder), beside), daemon=True).start()
    return run_shard(folder, rank)


def _kill_once_summed(root: Path, beside: Path) -> None:
    while not (root / "stage-001" / "reduced.npy").exists():
        time.sleep(0.01)
    (beside / "killed").touch()
    os.kill(os.getpid(), signal.SIGKILL)


def raises_once(folder: str, rank: int) -> str:
    """run_shard, except that shard 1 raises the first time it starts at stage 2 (an inline task
    cannot be killed without its coordinator)."""
    beside, stage = _count_call(folder, rank)
    if rank == 1 and stage == 2 and not (beside / "raised").exists():
        (beside / "raised").touch()
        raise RuntimeError("node lost")
    return run_shard(folder, rank)
