"""The real CLI under real launchers, for the LLM benchmarks: command lines, environment, peak RSS per rank,
and where the results go.

    python -m bench.launched --as-rank prune --config run.yaml     # one rank: the CLI, then its peak RSS

`as_rank` runs `hpcprune ARGS` inside this process and then prints `PEAK_RSS <rank> <KiB>` on
stderr (ru_maxrss of the process, KiB on Linux), so a benchmark learns each rank's peak from the
launcher's output without instrumenting the pipeline. Every launched process gets one torch/OpenMP
thread (the block-sequential pipeline fixes its own threads too, `sequential.threads`) and the
repository on PYTHONPATH, so the ranks import this worktree's hpcprune.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAUNCH_ENV = {
    # Open MPI refuses root and more ranks than cores unless told; these machines run as root on 2 cores.
    "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_rmaps_base_oversubscribe": "1",
    "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
}
PEAK_TAG = "PEAK_RSS"
PEAK_REPORT = re.compile(rf"{PEAK_TAG} (\d+) (\d+)\n")


def mpirun(ranks: int, *args: str) -> list[str]:
    """`mpirun -n RANKS` of `hpcprune ARGS`, each rank reporting its peak RSS."""
    return ["mpirun", "-n", str(ranks), sys.executable, "-m", "bench.launched", "--as-rank", *args]


def torchrun(ranks: int, *args: str) -> list[str]:
    """`torchrun --nproc_per_node RANKS` of `hpcprune ARGS`, each rank reporting its peak RSS."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
            "-m", "bench.launched", "--as-rank", *args]


@dataclass
class Launched:
    command: list[str]
    wall_seconds: float
    peak_rss_bytes: list[int]  # by rank
    stderr: str


def launch(command: list[str], what: str) -> Launched:
    """Run `command` from the repository root; SystemExit with its stderr's tail when it fails."""
    started = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **LAUNCH_ENV})
    wall = time.perf_counter() - started
    if finished.returncode:
        raise SystemExit(f"{what} failed (exit {finished.returncode}): {' '.join(command)}\n{finished.stderr[-4000:]}")
    return Launched(command, wall, peak_rss(finished.stderr), finished.stderr)


def peak_rss(stderr: str) -> list[int]:
    """Each rank's peak RSS in bytes, in rank order, from the PEAK_RSS reports of `as_rank`, found
    anywhere in the text: a launcher that merges the ranks' streams may join two reports on one line."""
    peaks = sorted((int(rank), int(kib)) for rank, kib in PEAK_REPORT.findall(stderr))
    return [kib * 1024 for _, kib in peaks]


def idle_rank_rss() -> int:
    """Peak RSS in bytes of an `mpirun -n 1` rank that only imports what a rank imports (the floor under
    every figure). Under mpirun, not a plain child: Linux keeps ru_maxrss across fork and exec, so a
    child of this process would report this process's peak."""
    code = ("import resource, torch, transformers, transformers.models.llama.modeling_llama, h5py, mpi4py.MPI, "
            "hpcprune.cli, hpcprune.run.sequential; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    finished = subprocess.run(["mpirun", "-n", "1", sys.executable, "-c", code], capture_output=True, text=True,
                              check=True, cwd=ROOT, env={**os.environ, **LAUNCH_ENV})
    return int(finished.stdout.split()[-1]) * 1024


def publish(result: dict, render: Callable[[dict], str], out: str) -> None:
    """Print the result's table; unless `out` is "-", write OUT.json and OUT.md (bench/results/<name>)."""
    table = render(result)
    print(table)
    if out != "-":
        Path(out + ".json").write_text(json.dumps(result, indent=2) + "\n")
        Path(out + ".md").write_text(table + "\n")


def as_rank(argv: list[str]) -> None:
    """Run the CLI in this process, then report its peak RSS whatever the outcome."""
    from hpcprune.cli import main
    from hpcprune.dist.detect import launcher_rank

    sys.argv = ["hpcprune", *argv]
    try:
        main()
    finally:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        sys.stderr.flush()  # one write of the whole line, after what the run wrote, so no rank splits it
        os.write(sys.stderr.fileno(), f"\n{PEAK_TAG} {launcher_rank()} {kib}\n".encode())


if __name__ == "__main__":
    if sys.argv[1:2] != ["--as-rank"]:
        raise SystemExit("usage: python -m bench.launched --as-rank HPCPRUNE_ARGS...")
    as_rank(sys.argv[2:])
