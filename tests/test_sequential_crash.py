"""A block-sequential run killed anywhere, or preempted, resumes to the uninterrupted run bit for bit.

    python -m pytest -q tests/test_sequential_crash.py

The kills are real SIGKILLs from tests.crash_points: mid-forward of a window through a block, just
after a block's masks are recorded, in a collective, while the archive is written; for SparseGPT,
between a block's solves and in the middle of the broadcast of its updated weights. After each kill
the archive must open and every recorded block must be whole; the run resumed to its end must hold
the uninterrupted run's masks, updated weights, reconstruction errors and perplexities, to the bit.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py

from hpcprune.archive.blocks import recorded_blocks, round_tables
from hpcprune.archive.reader import open_archive
from hpcprune.dist.signals import PREEMPTED_EXIT
from tests.helpers import ROOT, archive_masks, launch, mpi_env, updated_weights
from tests.test_reliability_crash import kill_chains, kill_schedule
from tests.tiny_llm import Folders, sequential_overrides

KILLS = 10


def sequential_args(folders: Folders, out: Path, *, quiet: bool = True) -> list[str]:
    return [argument for override in sequential_overrides(folders.llama, folders, out)
            for argument in ("--set", override)] + ["--out", str(out)] + (["-q"] if quiet else [])


def crash_run(folders: Folders, out: Path, *args: str, launcher=(), kill: str | None = None, rank: int = 0,
              count: Path | None = None) -> subprocess.CompletedProcess:
    env = {}
    if kill:
        env.update(HPCPRUNE_TEST_KILL=kill, HPCPRUNE_TEST_KILL_RANK=str(rank), HPCPRUNE_TEST_KILLED=f"{out}.killed")
    if count:
        env["HPCPRUNE_TEST_COUNT"] = str(count)
    command = [*launcher, sys.executable, "-m", "tests.crash_points", "prune", *sequential_args(folders, out), *args]
    return launch(command, timeout=300, env=env)


def run_facts(path: Path) -> dict:
    """What must not depend on being killed: masks, the round's figures, the per-block tables."""
    tables = round_tables(path, 1)
    with h5py.File(path, "r") as archive:
        attrs = {key: str(value) for key, value in archive["rounds/0001"].attrs.items() if not key.startswith("seconds")}
    return {"masks": {name: packed.tobytes() for name, packed in archive_masks(path, 1).items()}, "attrs": attrs,
            "reconstruction": str(tables["reconstruction"]), "metrics": str(tables["metrics"]),
            "blocks": [(row["block"], bool(row["weights_file"])) for row in tables["blocks"]],
            "weights": updated_weights(path)}


def assert_consistent(path: Path) -> None:
    """After a kill: the archive opens, and every block in the blocks table has all its masks."""
    if not path.exists():
        return  # killed before the new archive was renamed into place
    open_archive(path)
    blocks = [row["block"] for row in recorded_blocks(path, 1)]
    assert blocks == list(range(len(blocks)))
    names = list(archive_masks(path, 1))
    assert names == [name for name in names if int(name.split(".")[2]) in blocks]
    assert len(names) == 7 * len(blocks)
    assert [row["name"] for row in round_tables(path, 1)["metrics"]] == names


def test_ten_random_kills_under_mpirun_resume_to_the_uninterrupted_run(mpirun, mpi4py, tiny_folders, tmp_path):
    launcher = [mpirun, "-n", "2"]
    reference, count = tmp_path / "reference.h5", tmp_path / "counts"
    done = crash_run(tiny_folders, reference, launcher=launcher, count=count)
    assert done.returncode == 0, done.stderr
    counts = [json.loads(Path(f"{count}.{rank}").read_text()) for rank in (0, 1)]
    assert {"block_forward", "record_block", "allreduce", "broadcast", "write_mask", "commit"} <= counts[0].keys()

    out = tmp_path / "run.h5"
    points = kill_chains(out, kill_schedule(counts, seed=13), KILLS,
                         lambda kill, rank: crash_run(tiny_folders, out, "--resume", launcher=launcher, kill=kill, rank=rank),
                         finished=lambda: assert_same_facts(out, reference), killed=lambda: assert_consistent(out))
    assert len(points) >= 4, points
    finished = crash_run(tiny_folders, out, "--resume", launcher=launcher)
    assert finished.returncode == 0, finished.stderr
    assert_same_facts(out, reference)


def test_kills_in_sparsegpts_solves_and_weight_broadcast_resume_to_the_uninterrupted_run(mpirun, mpi4py, tiny_folders,
                                                                                         tmp_path):
    launcher, sparsegpt = [mpirun, "-n", "2"], ("--set", "prune.criterion=sparsegpt")
    reference, count = tmp_path / "reference.h5", tmp_path / "counts"
    done = crash_run(tiny_folders, reference, *sparsegpt, launcher=launcher, count=count)
    assert done.returncode == 0, done.stderr
    counts = [json.loads(Path(f"{count}.{rank}").read_text()) for rank in (0, 1)]
    assert counts[0]["solve"] + counts[1]["solve"] == 3 * 7 and counts[1]["decisions"] == 3 * 2  # 3 blocks, 2 ranks
    out = tmp_path / "run.h5"
    # Rank 1 between two solves of block 1; then, resumed at block 1, rank 0 holding its own block-1
    # decisions and waiting for rank 1's; then rank 1 with rank 0's block-2 weights, before sending its own.
    for kill, rank in [(f"solve:{counts[1]['solve'] // 2 + 1}", 1), ("decisions:1", 0), ("decisions:3", 1)]:
        killed = crash_run(tiny_folders, out, *sparsegpt, "--resume", launcher=launcher, kill=kill, rank=rank)
        assert killed.returncode != 0 and Path(f"{out}.killed").read_text() == f"{kill} on rank {rank}", killed.stderr
        Path(f"{out}.killed").unlink()
        assert_consistent(out)
    assert [row["block"] for row in recorded_blocks(out, 1)] == [0, 1]  # every kill stopped within its block
    finished = crash_run(tiny_folders, out, *sparsegpt, "--resume", launcher=launcher)
    assert finished.returncode == 0, finished.stderr
    assert_same_facts(out, reference)
    assert run_facts(out)["weights"]  # the comparison held SparseGPT's weights, not an empty table


def assert_same_facts(mine: Path, reference: Path) -> None:
    assert run_facts(mine) == run_facts(reference)


def test_sigusr1_stops_at_the_next_block_and_resume_gives_the_uninterrupted_run(tiny_folders, tmp_path):
    reference = launch([sys.executable, "-m", "hpcprune", "prune", *sequential_args(tiny_folders, tmp_path / "a.h5")])
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "b.h5"
    command = [sys.executable, "-m", "hpcprune", "prune", *sequential_args(tiny_folders, out, quiet=False)]
    process = subprocess.Popen(command, cwd=ROOT, env=mpi_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)  # not quiet: the log names each block as it ends
    log = []
    for line in process.stderr:
        log.append(line)
        if "block 1/3 pruned" in line:
            process.send_signal(signal.SIGUSR1)
    assert process.wait(timeout=300) == PREEMPTED_EXIT, "".join(log)
    assert [row["block"] for row in recorded_blocks(out, 1)] in ([0], [0, 1])  # stopped at a block boundary
    with h5py.File(out, "r") as archive:
        assert archive["rounds/0001"].attrs["status"] == "writing"
        assert archive["events"][-1]["detail"].decode().startswith("stopped before block")
    resumed = launch([sys.executable, "-m", "hpcprune", "prune", *sequential_args(tiny_folders, out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert run_facts(out) == run_facts(tmp_path / "a.h5")
    shutil.rmtree(tmp_path / "b.h5.states", ignore_errors=True)

