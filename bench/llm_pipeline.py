"""hpcprune's side of bench/llm.py: the real `hpcprune prune` (schedule.kind sequential), 1 rank or mpirun -n 2.

    python bench/llm.py --model DIR --texts DIR --sides anchor hpcprune hpcprune-2 --methods sparsegpt

Each run is the CLI on the model folder, with the bench's calibration text, window count, window
length and seed (so hpcprune.models.text_windows draws the very windows the other sides get) and
`sequential.threads` = --threads per rank; no eval.text, since bench/llm.py measures every side's
perplexity itself; SparseGPT's damping and block size are the defaults, 1 % and 128, as the
other sides'; then bench/llm.py's --hpcprune-set overrides, if any. Every process is bench/llm_rank.py, which writes its own peak RSS and CPU
seconds; the side's `run_seconds` are the launcher's wall time of the whole run (start-up, reading the
model block by block and the first inputs included, as the anchor's `run_seconds` include its
imports and model load); `blocks_seconds`, the archive's per-block seconds summed, leaves those
out, as the anchor's `oneshot` seconds do. The
pruned model comes back through `hpcprune export --format hf`, which bench/llm.py loads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RANKS = {"hpcprune": 1, "hpcprune-2": 2}
"""Sides of bench/llm.py that run the pipeline, and their ranks."""

SETTINGS = {  # method -> its --set overrides (nm fixes the sparsity itself)
    "sparsegpt": ["prune.criterion=sparsegpt", "prune.rule=row"],
    "sparsegpt-layer": ["prune.criterion=sparsegpt", "prune.rule=layer"],
    "sparsegpt-2:4": ["prune.criterion=sparsegpt", "prune.rule=nm", "prune.n=2", "prune.m=4"],
    "wanda": ["prune.criterion=wanda", "prune.rule=row"],
    "wanda-2:4": ["prune.criterion=wanda", "prune.rule=nm", "prune.n=2", "prune.m=4"],
    "magnitude": ["prune.criterion=magnitude", "prune.rule=row"],
}
MPI = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_rmaps_base_oversubscribe": "1"}


def overrides(method: str, args, archive: Path) -> list[str]:
    sparsity = [] if "2:4" in method else [f"prune.sparsity={args.sparsity}"]
    return [f"model.name=hf:{args.model}", "schedule.kind=sequential", "pretrain.epochs=0", "finetune.epochs=0",
            f"calibration.text={args.texts / 'calibration.txt'}", f"calibration.samples={args.samples}",
            f"calibration.sequence_length={args.sequence_length}", f"calibration.seed={args.seed}",
            f"sequential.threads={args.threads}", f"output.path={archive}", "progress=false",
            *SETTINGS[method], *sparsity, *args.hpcprune_set]


def run_pipeline(side: str, method: str, args, work: Path) -> tuple[dict, Path] | dict:
    """(report, exported folder) of one run, or {"failed": ...}."""
    stem = work / f"{side}-{method.replace(':', '_')}"
    archive, folder = stem.with_suffix(".h5"), Path(f"{stem}-hf")
    ranks = RANKS[side]
    launcher = ["mpirun", "-n", str(ranks)] if ranks > 1 else []
    command = [*launcher, sys.executable, str(HERE / "llm_rank.py"), str(stem), "prune", "--force", "-q",
               *(item for override in overrides(method, args, archive) for item in ("--set", override))]
    environment = {**os.environ, **MPI, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads),
                   "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    finished = subprocess.run(command, env=environment, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if finished.returncode:
        return {"side": side, "method": method, "failed": (finished.stderr or finished.stdout)[-4000:]}
    per_rank = [json.loads(Path(f"{stem}.{rank}.json").read_text()) for rank in range(ranks)]
    shutil.rmtree(folder, ignore_errors=True)
    exported = subprocess.run([sys.executable, "-m", "hpcprune", "export", str(archive), "--format", "hf",
                               "--out", str(folder)], env=environment, capture_output=True, text=True)
    if exported.returncode:
        return {"side": side, "method": method, "failed": exported.stderr[-4000:]}
    report = {"method": method, "ranks": ranks, "threads": args.threads, "run_seconds": wall,
              "blocks_seconds": blocks_seconds(archive),
              "cpu_seconds": sum(rank["cpu_seconds"] for rank in per_rank),
              "peak_rss_bytes": max(rank["peak_rss_bytes"] for rank in per_rank), "per_rank": per_rank}
    return report, folder


def blocks_seconds(archive: Path) -> float:
    """The run's per-block seconds (rank 0's, from loading a block to recording it), summed: what the
    anchor's `oneshot` seconds cover, without start-up, the model index, tokenizing and first inputs."""
    from hpcprune.archive.blocks import round_tables

    return float(sum(row["seconds"] for row in round_tables(archive, 1)["blocks"]))


def clean(work: Path, side: str, method: str) -> None:
    """What a run left in `work` besides its report."""
    stem = work / f"{side}-{method.replace(':', '_')}"
    for path in (Path(f"{stem}-hf"), Path(f"{stem}.h5.states"), Path(f"{stem}.h5.masks")):  # the archive's folders
        shutil.rmtree(path, ignore_errors=True)
    stem.with_suffix(".h5").unlink(missing_ok=True)
