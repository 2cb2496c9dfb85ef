"""Scale benchmark: score + exact global select + mask archive of a ~1e9-parameter safetensors
checkpoint under `mpirun -n 1` and `mpirun -n 2`, with each rank's peak RSS.

    python bench/scale.py                      # ~4 GB checkpoint under /var/tmp, writes bench/results/scale.*
    python bench/scale.py --params 5e7 --out - # quick smoke run, prints only

The checkpoint is written tensor by tensor (never whole in memory). Each rank runs the real CLI
(`hpcprune prune`, model.name: checkpoint), wrapped only to report its own peak RSS. For comparison,
torch.nn.utils.prune.global_unstructured is tried on the same tensors in a child process limited to
--torch-limit-gib of address space, so that a model it cannot hold fails there instead of taking the
machine down.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1", "PYTHONPATH": str(ROOT)}
SIDE = 4096  # every tensor is SIDE x SIDE float32 (64 MiB)


def write_checkpoint(path: Path, params: int, seed: int = 0) -> int:
    """A safetensors file of `params` float32 weights in SIDE x SIDE tensors, streamed to disk."""
    count = max(1, round(params / (SIDE * SIDE)))
    size = SIDE * SIDE * 4
    header = {f"layers.{i}.weight": {"dtype": "F32", "shape": [SIDE, SIDE], "data_offsets": [i * size, (i + 1) * size]}
              for i in range(count)}
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format asks for an 8-byte aligned data start
    rng = np.random.default_rng(seed)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)) + encoded)
        for _ in range(count):
            out.write((rng.standard_normal((SIDE, SIDE), dtype=np.float32) * 0.02).tobytes())
    return count * SIDE * SIDE


def write_config(path: Path, checkpoint: Path, archive: Path, sparsity: float) -> None:
    path.write_text(
        f"model: {{name: checkpoint, checkpoint: {checkpoint}}}\n"
        f"prune: {{criterion: magnitude, rule: global, sparsity: {sparsity}}}\n"
        f"finetune: {{epochs: 0}}\nprogress: false\noutput: {{path: {archive}}}\n"
    )


def run_ranks(ranks: int, config: Path) -> dict:
    """One `mpirun -n RANKS` of the CLI; wall time and each rank's peak RSS."""
    command = ["mpirun", "-n", str(ranks), sys.executable, __file__, "--as-rank", "prune", "--config", str(config), "--force", "-q"]
    started = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **MPI_ENV})
    wall = time.perf_counter() - started
    if finished.returncode:
        raise SystemExit(f"mpirun -n {ranks} failed:\n{finished.stderr}")
    peaks = sorted((int(rank), int(kib)) for rank, kib in
                   (line.split()[1:3] for line in finished.stderr.splitlines() if line.startswith("PEAK_RSS")))
    return {"ranks": ranks, "wall_seconds": wall, "peak_rss_bytes": [kib * 1024 for _, kib in peaks]}


def as_rank(argv: list[str]) -> None:
    """Run the CLI in this rank, then report its peak RSS (ru_maxrss is in KiB on Linux)."""
    from hpcprune.cli import main
    from hpcprune.dist.detect import launcher_rank

    sys.argv = ["hpcprune", *argv]
    try:
        main()
    finally:
        print(f"PEAK_RSS {launcher_rank()} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr, flush=True)


def archive_figures(path: Path) -> dict:
    import h5py

    with h5py.File(path, "r") as archive:
        attrs = archive["rounds/0001"].attrs
        return {key: float(attrs[key]) for key in ("kept", "total", "achieved_sparsity", "threshold",
                                                   "seconds_select", "seconds_record", "seconds_write")}


def try_global_unstructured(checkpoint: Path, sparsity: float, limit_gib: float) -> dict:
    """global_unstructured on the same tensors in a child capped at `limit_gib` of address space."""
    code = f"""
import resource, time, sys, torch
from torch import nn
from torch.nn.utils import prune
from safetensors.torch import load_file
resource.setrlimit(resource.RLIMIT_AS, ({int(limit_gib * 2**30)}, {int(limit_gib * 2**30)}))
try:
    state = load_file({str(checkpoint)!r})
    modules = []
    for tensor in state.values():
        layer = nn.Linear(1, 1, bias=False)
        layer.weight = nn.Parameter(tensor, requires_grad=False)
        modules.append(layer)
    del state
    started = time.perf_counter()
    prune.global_unstructured([(m, "weight") for m in modules], pruning_method=prune.L1Unstructured, amount={sparsity})
    print("OK", time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
except (RuntimeError, MemoryError) as error:
    print("FAILED", str(error).splitlines()[0][:200], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""
    finished = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    words = (finished.stdout.strip() or f"FAILED exit {finished.returncode} {finished.stderr.strip()[-200:]} 0").split(" ", 1)
    if words[0] == "OK":
        seconds, peak = words[1].split()
        return {"fits": True, "seconds": float(seconds), "peak_rss_bytes": int(peak), "limit_gib": limit_gib}
    message, _, peak = words[1].rpartition(" ")
    return {"fits": False, "error": message, "peak_rss_bytes_before_failure": int(peak) if peak.isdigit() else None,
            "limit_gib": limit_gib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=1e9)
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/hpcprune-scale"))
    parser.add_argument("--torch-limit-gib", type=float, default=20.0)
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale"), help="results stem, or - to only print")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    checkpoint = args.dir / "model.safetensors"
    params = write_checkpoint(checkpoint, int(args.params))
    checkpoint_bytes = checkpoint.stat().st_size
    subprocess.run(["cat", str(checkpoint)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache for both runs

    runs = []
    for ranks in (1, 2):
        config, archive = args.dir / f"n{ranks}.yaml", args.dir / f"n{ranks}.h5"
        write_config(config, checkpoint, archive, args.sparsity)
        runs.append({**run_ranks(ranks, config), **archive_figures(archive)})
    same_masks = masks_equal(args.dir / "n1.h5", args.dir / "n2.h5")
    result = {
        "params": params, "checkpoint_bytes": checkpoint_bytes, "sparsity": args.sparsity, "cores": os.cpu_count(),
        "runs": runs, "masks_identical": same_masks,
        "speedup_2_over_1": runs[0]["wall_seconds"] / runs[1]["wall_seconds"],
        "max_rank_rss_over_checkpoint_2_ranks": max(runs[1]["peak_rss_bytes"]) / checkpoint_bytes,
        "global_unstructured": None if args.skip_torch else try_global_unstructured(checkpoint, args.sparsity, args.torch_limit_gib),
    }
    table = render(result)
    print(table)
    if args.out != "-":
        Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
        Path(args.out + ".md").write_text(table + "\n")


def masks_equal(first: Path, second: Path) -> bool:
    import h5py

    with h5py.File(first, "r") as a, h5py.File(second, "r") as b:
        one, two = a["rounds/0001/masks"], b["rounds/0001/masks"]
        return list(one) == list(two) and all(np.array_equal(one[name][()], two[name][()]) for name in one)


def render(result: dict) -> str:
    gib = 2**30
    lines = [
        f"# Scale: score + global select + mask archive of a {result['params'] / 1e9:.2f}e9-parameter safetensors checkpoint",
        "",
        f"Checkpoint {result['checkpoint_bytes'] / gib:.2f} GiB float32, sparsity {result['sparsity']}, "
        f"{result['cores']} cores; page cache warm for both runs.",
        "",
        "| ranks | wall s | score + select s | compress + gather s | write s | peak RSS per rank (GiB) | max RSS / checkpoint |",
        "|---:|---:|---:|---:|---:|---|---:|",
    ]
    for run in result["runs"]:
        peaks = ", ".join(f"{peak / gib:.2f}" for peak in run["peak_rss_bytes"])
        lines.append(f"| {run['ranks']} | {run['wall_seconds']:.1f} | {run['seconds_select']:.1f} | "
                     f"{run['seconds_record']:.1f} | {run['seconds_write']:.1f} | {peaks} | {max(run['peak_rss_bytes']) / result['checkpoint_bytes']:.3f} |")
    one, two = result["runs"]
    lines += [
        "",
        f"- 2-rank speedup: {result['speedup_2_over_1']:.2f}x wall (target >= 1.6x); "
        f"{one['seconds_select'] / two['seconds_select']:.2f}x on score + select alone.",
        f"- Max rank RSS with 2 ranks: {result['max_rank_rss_over_checkpoint_2_ranks']:.3f} x checkpoint bytes (target <= 0.6).",
        f"- Masks identical for 1 and 2 ranks: {result['masks_identical']}; kept {int(one['kept']):,} of {int(one['total']):,}.",
    ]
    torch_result = result["global_unstructured"]
    if torch_result is None:
        lines.append("- torch.nn.utils.prune.global_unstructured: not run (--skip-torch).")
    elif torch_result["fits"]:
        lines.append(f"- torch.nn.utils.prune.global_unstructured: {torch_result['seconds']:.1f} s, "
                     f"peak RSS {torch_result['peak_rss_bytes'] / gib:.1f} GiB.")
    else:
        peak = torch_result["peak_rss_bytes_before_failure"]
        lines.append(f"- torch.nn.utils.prune.global_unstructured: does not fit in {torch_result['limit_gib']:.0f} GiB "
                     f"of address space ({torch_result['error']}); peak RSS before failing "
                     f"{(peak or 0) / gib:.1f} GiB.")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--as-rank":
        as_rank(sys.argv[2:])
    else:
        main()
