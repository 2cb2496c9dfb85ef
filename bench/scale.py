"""Scale benchmark: score + exact global select + mask archive of a large safetensors checkpoint
under mpirun, with each rank's peak RSS, and the parallel efficiency per core.

    python bench/scale.py                      # 1e9 weights (3.75 GiB): fits in memory, page cache warm
    python bench/scale.py --params 9e9         # 9e9 weights (33.5 GiB): larger than this 23 GiB machine's
                                               # memory, read cold from disk (out of core)
    python bench/scale.py --params 5e7 --out - # quick smoke run, prints only

Runs, each the real CLI (`hpcprune prune`, model.name: checkpoint) under `mpirun`, wrapped only to
report each rank's own peak RSS:

- 1 rank and 2 ranks with torch's default threads (the figures of earlier versions: on 2 cores the
  1-rank run already spreads its kernels over both cores, so this ratio says little about ranks);
- 1 rank x 1 thread and 2 ranks x 1 thread (`--threads 1`: torch's threads and the OpenMP/BLAS
  pools through OMP_NUM_THREADS and friends): the parallel efficiency of ranks, per core;
- with `--params` above `--anchor-params` (1e9), 2 ranks once more on a checkpoint of that size: rank
  0's peak RSS must not grow with the model.

The page cache is stated as it is: when the checkpoint fits in available memory it is read once
before each run (warm); otherwise it is dropped from the cache before each run (posix_fadvise), so
every run reads it from disk alike, and the disk's cold sequential read throughput is measured.
The masks of every run are compared with the first run's. Everything written under --dir is
removed at the end (--keep to keep it). torch.nn.utils.prune.global_unstructured is tried on the
same tensors in a child process limited to --torch-limit-gib of address space.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1", "PYTHONPATH": str(ROOT)}
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
SIDE = 4096  # every tensor is SIDE x SIDE float32 (64 MiB)
GIB = 2**30
TENSOR_BYTES = SIDE * SIDE * 4
RSS_BOUND = 2 * TENSOR_BYTES + GIB // 2  # what a rank may hold: two of the largest tensor, and 0.5 GiB


def write_checkpoint(path: Path, params: int, seed: int = 0) -> int:
    """A safetensors file of `params` float32 weights in SIDE x SIDE tensors, streamed to disk."""
    count = max(1, round(params / (SIDE * SIDE)))
    header = {f"layers.{i}.weight": {"dtype": "F32", "shape": [SIDE, SIDE],
                                     "data_offsets": [i * TENSOR_BYTES, (i + 1) * TENSOR_BYTES]} for i in range(count)}
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format asks for an 8-byte aligned data start
    rng = np.random.default_rng(seed)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)) + encoded)
        for _ in range(count):
            out.write((rng.standard_normal((SIDE, SIDE), dtype=np.float32) * 0.02).tobytes())
        out.flush()
        os.fsync(out.fileno())
    return count * SIDE * SIDE


def write_config(path: Path, checkpoint: Path, archive: Path, sparsity: float) -> None:
    path.write_text(
        f"model: {{name: checkpoint, checkpoint: {checkpoint}}}\n"
        f"prune: {{criterion: magnitude, rule: global, sparsity: {sparsity}}}\n"
        f"finetune: {{epochs: 0}}\nprogress: false\noutput: {{path: {archive}}}\n"
    )


# --- the page cache ---------------------------------------------------------------------------------


def available_memory() -> int:
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) * 1024


def drop_from_cache(path: Path) -> None:
    """Let the kernel forget the file's pages (written and synced, so clean): the next read is from disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)


def read_through(path: Path) -> float:
    """Read the whole file once, sequentially; seconds taken."""
    started = time.perf_counter()
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


class PageCache:
    """Warm when the checkpoint fits in the memory available beside the ranks, else cold for every run."""

    def __init__(self, checkpoint: Path, ranks_bytes: int):
        self.checkpoint, self.size = checkpoint, checkpoint.stat().st_size
        self.available = available_memory()
        self.warm = self.size + ranks_bytes < self.available
        drop_from_cache(checkpoint)
        self.cold_read_seconds = read_through(checkpoint)  # from disk: measured once, either way

    def prepare(self) -> None:
        """Before each run: the same state of the cache for all of them."""
        if self.warm:
            read_through(self.checkpoint)
        else:
            drop_from_cache(self.checkpoint)

    def describe(self) -> dict:
        return {"warm": self.warm, "available_bytes": self.available,
                "cold_read_bytes_per_second": self.size / self.cold_read_seconds}


# --- runs ---------------------------------------------------------------------------------------------


def disk_read_bytes() -> int:
    """Bytes the whole machine has read from block devices so far (/proc/vmstat pgpgin, in KiB): on a
    quiet machine the difference over a run is what that run read from disk, page cache misses only."""
    for line in Path("/proc/vmstat").read_text().splitlines():
        name, value = line.split()
        if name == "pgpgin":
            return int(value) * 1024
    return 0


def run_ranks(ranks: int, config: Path, threads: int | None) -> dict:
    """One `mpirun -n RANKS` of the CLI; wall time, each rank's peak RSS, and the bytes read from disk."""
    command = ["mpirun", "-n", str(ranks), sys.executable, __file__, "--as-rank", "prune", "--config", str(config), "--force", "-q"]
    env = {name: value for name, value in os.environ.items() if name not in THREAD_VARIABLES}  # default: torch's own
    env.update(MPI_ENV)
    if threads is not None:
        env.update({variable: str(threads) for variable in THREAD_VARIABLES}, HPCPRUNE_BENCH_THREADS=str(threads))
    started, read_before = time.perf_counter(), disk_read_bytes()
    finished = subprocess.run(command, capture_output=True, text=True, env=env)
    wall, read = time.perf_counter() - started, disk_read_bytes() - read_before
    if finished.returncode:
        raise SystemExit(f"mpirun -n {ranks} failed:\n{finished.stderr}")
    # mpirun forwards the ranks' stderr in pieces: two ranks' reports may share a line
    peaks = sorted((int(rank), int(kib)) for rank, kib in re.findall(r"PEAK_RSS (\d+) (\d+)", finished.stderr))
    return {"ranks": ranks, "threads": threads, "wall_seconds": wall, "peak_rss_bytes": [kib * 1024 for _, kib in peaks],
            "disk_read_bytes": read}


def as_rank(argv: list[str]) -> None:
    """Run the CLI in this rank, then report its peak RSS (ru_maxrss is in KiB on Linux)."""
    import torch

    from hpcprune.cli import main
    from hpcprune.dist.detect import launcher_rank

    if os.environ.get("HPCPRUNE_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["HPCPRUNE_BENCH_THREADS"]))
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


def masks_equal(first: Path, second: Path) -> bool:
    import h5py

    with h5py.File(first, "r") as a, h5py.File(second, "r") as b:
        one, two = a["rounds/0001/masks"], b["rounds/0001/masks"]
        return list(one) == list(two) and all(np.array_equal(one[name][()], two[name][()]) for name in one)


def remove_run(folder: Path, name: str) -> None:
    for path in (folder / f"{name}.h5", folder / f"{name}.yaml"):
        path.unlink(missing_ok=True)
    for side in ("states", "masks"):  # the archive's own folders (format 2: named after run.h5)
        shutil.rmtree(folder / f"{name}.h5.{side}", ignore_errors=True)


def measured(folder: Path, checkpoint: Path, cache: PageCache, sparsity: float, ranks: int, threads: int | None,
             reference: Path | None) -> dict:
    """One run, its figures, and whether its masks equal `reference`'s (whose archive is kept)."""
    name = f"n{ranks}-t{threads or 'default'}"
    config, archive = folder / f"{name}.yaml", folder / f"{name}.h5"
    write_config(config, checkpoint, archive, sparsity)
    cache.prepare()
    run = {**run_ranks(ranks, config, threads), **archive_figures(archive)}
    run["rest_seconds"] = run["wall_seconds"] - run["seconds_select"] - run["seconds_record"] - run["seconds_write"]
    run["masks_identical"] = True if reference is None else masks_equal(reference, archive)
    if reference is not None:
        remove_run(folder, name)
    return run


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


def anchor_run(folder: Path, params: int, sparsity: float) -> dict:
    """2 ranks, default threads, on a checkpoint of `params` weights: rank 0's peak at a smaller model."""
    checkpoint = folder / "anchor.safetensors"
    write_checkpoint(checkpoint, params, seed=1)
    try:
        cache = PageCache(checkpoint, ranks_bytes=2 * RSS_BOUND)
        run = measured(folder, checkpoint, cache, sparsity, 2, None, reference=None)
        remove_run(folder, "n2-tdefault")
        return {"params": params, **run}
    finally:
        checkpoint.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=1e9, help="weights in the checkpoint (9e9: out of core here)")
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--threads", type=int, default=1, help="threads per rank of the efficiency runs")
    parser.add_argument("--anchor-params", type=float, default=1e9, help="smaller model of the RSS comparison")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/hpcprune-scale"))
    parser.add_argument("--torch-limit-gib", type=float, default=20.0)
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--keep", action="store_true", help="leave the checkpoint and the first archive in --dir")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale"), help="results stem, or - to only print")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    checkpoint = args.dir / "model.safetensors"
    try:
        result = benchmark(args, checkpoint)
    finally:
        if not args.keep:
            checkpoint.unlink(missing_ok=True)
            for name in ("n1-tdefault", "n2-tdefault"):
                remove_run(args.dir, name)
    table = render(result)
    print(table)
    if args.out != "-":
        Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
        Path(args.out + ".md").write_text(table + "\n")


def benchmark(args, checkpoint: Path) -> dict:
    params = write_checkpoint(checkpoint, int(args.params))
    cache = PageCache(checkpoint, ranks_bytes=2 * RSS_BOUND)
    reference = args.dir / "n1-tdefault.h5"
    runs = [measured(args.dir, checkpoint, cache, args.sparsity, ranks, threads, None if not index else reference)
            for index, (ranks, threads) in enumerate([(1, None), (2, None), (1, args.threads), (2, args.threads)])]
    torch_result = None if args.skip_torch else try_global_unstructured(checkpoint, args.sparsity, args.torch_limit_gib)
    checkpoint_bytes = checkpoint.stat().st_size
    checkpoint.unlink()  # before the anchor's checkpoint is written: disk holds one at a time
    anchor = anchor_run(args.dir, int(args.anchor_params), args.sparsity) if args.params > args.anchor_params else None
    return {"params": params, "checkpoint_bytes": checkpoint_bytes, "largest_tensor_bytes": TENSOR_BYTES,
            "rss_bound_bytes": RSS_BOUND, "sparsity": args.sparsity, "cores": os.cpu_count(), "threads": args.threads,
            "page_cache": cache.describe(), "runs": runs, "anchor": anchor,
            "masks_identical": all(run["masks_identical"] for run in runs), "global_unstructured": torch_result}


def render(result: dict) -> str:
    one, two, one_thread, two_threads = result["runs"]
    cache = result["page_cache"]
    if cache["warm"]:
        cache_line = (f"page cache warm: the file fits in the {cache['available_bytes'] / GIB:.1f} GiB available and "
                      f"is read once before each run")
    else:
        cache_line = (f"page cache cold: the file is larger than the {cache['available_bytes'] / GIB:.1f} GiB available, "
                      f"so it is dropped from the cache before each run and read from disk")
    lines = [
        f"# Scale: score + global select + mask archive of a {result['params'] / 1e9:.2f}e9-parameter safetensors checkpoint",
        "",
        f"Checkpoint {result['checkpoint_bytes'] / GIB:.2f} GiB float32 in {TENSOR_BYTES / 2**20:.0f} MiB tensors, sparsity "
        f"{result['sparsity']}, {result['cores']} cores; {cache_line} (cold sequential read "
        f"{cache['cold_read_bytes_per_second'] / 1e9:.2f} GB/s).",
        "",
        "| ranks x threads | wall s | score + select s | record s | rest s | read from disk (GiB) | peak RSS per rank (GiB) | max RSS / bound |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for run in result["runs"]:
        peaks = ", ".join(f"{peak / GIB:.2f}" for peak in run["peak_rss_bytes"])
        record = run["seconds_record"] + run["seconds_write"]
        lines.append(f"| {run['ranks']} x {run['threads'] or 'default'} | {run['wall_seconds']:.1f} | "
                     f"{run['seconds_select']:.1f} | {record:.1f} | {run['rest_seconds']:.1f} | {run['disk_read_bytes'] / GIB:.1f} | {peaks} | "
                     f"{max(run['peak_rss_bytes']) / result['rss_bound_bytes']:.2f} |")
    largest = max(peak for run in result["runs"] for peak in run["peak_rss_bytes"])
    lines += [
        "",
        "record: compress, send and write the masks (streamed to rank 0 tensor by tensor); rest: start-up (interpreter, "
        "imports, MPI), plan, archive creation and the closing event, the part no rank count shortens; read from disk: "
        "the machine's reads from block devices during the run (/proc/vmstat pgpgin), what the page cache did not hold.",
        "",
        f"- Parallel efficiency, {result['threads']} thread(s) per rank: 2 ranks {one_thread['seconds_select'] / two_threads['seconds_select']:.2f}x "
        f"the 1-rank throughput on score + select (target >= 1.85x), {one_thread['wall_seconds'] / two_threads['wall_seconds']:.2f}x "
        f"on the whole run (rest {one_thread['rest_seconds']:.1f} s and {two_threads['rest_seconds']:.1f} s, record "
        f"{one_thread['seconds_record'] + one_thread['seconds_write']:.1f} s and {two_threads['seconds_record'] + two_threads['seconds_write']:.1f} s).",
        f"- Default threads (earlier versions' figure): 2 ranks {one['wall_seconds'] / two['wall_seconds']:.2f}x wall, "
        f"{one['seconds_select'] / two['seconds_select']:.2f}x on score + select.",
        *disk_floor_lines(result, one_thread, two_threads),
        f"- Largest peak RSS of any rank: {largest / GIB:.3f} GiB; bound 2 x largest tensor + 0.5 GiB = "
        f"{result['rss_bound_bytes'] / GIB:.3f} GiB: {'within' if largest <= result['rss_bound_bytes'] else 'OVER'}.",
    ]
    anchor = result["anchor"]
    if anchor is not None:
        ratio = two["peak_rss_bytes"][0] / anchor["peak_rss_bytes"][0]
        lines.append(f"- Rank 0's peak RSS with 2 ranks: {two['peak_rss_bytes'][0] / GIB:.3f} GiB here, "
                     f"{anchor['peak_rss_bytes'][0] / GIB:.3f} GiB at {anchor['params'] / 1e9:.2f}e9 parameters: "
                     f"ratio {ratio:.3f} (target within 10 %).")
    lines.append(f"- Masks identical for every run: {result['masks_identical']}; kept {int(one['kept']):,} of {int(one['total']):,}.")
    lines.append(torch_line(result["global_unstructured"]))
    return "\n".join(lines)


def disk_floor_lines(result: dict, one: dict, two: dict) -> list[str]:
    """Out of core, the disk bounds score + select: what it read, at the cold sequential rate, is a
    floor on the 2-rank time, and so a ceiling on any speedup of ranks over the 1-rank run."""
    if result["page_cache"]["warm"]:
        return []
    floor = two["disk_read_bytes"] / result["page_cache"]["cold_read_bytes_per_second"]
    return [f"- The disk: the 2 x {two['threads'] or 'default'} run read {two['disk_read_bytes'] / GIB:.1f} GiB from it, "
            f"{floor:.1f} s at the cold sequential rate, {floor / two['seconds_select']:.0%} of its score + select "
            f"({two['seconds_select']:.1f} s); reading as much, no number of ranks takes the 1-rank score + select "
            f"({one['seconds_select']:.1f} s) past {one['seconds_select'] / floor:.2f}x."]


def torch_line(torch_result: dict | None) -> str:
    if torch_result is None:
        return "- torch.nn.utils.prune.global_unstructured: not run (--skip-torch)."
    if torch_result["fits"]:
        return (f"- torch.nn.utils.prune.global_unstructured: {torch_result['seconds']:.1f} s, "
                f"peak RSS {torch_result['peak_rss_bytes'] / GIB:.1f} GiB.")
    peak = torch_result["peak_rss_bytes_before_failure"]
    return (f"- torch.nn.utils.prune.global_unstructured: does not fit in {torch_result['limit_gib']:.0f} GiB "
            f"of address space ({torch_result['error']}); peak RSS before failing {(peak or 0) / GIB:.1f} GiB.")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--as-rank":
        as_rank(sys.argv[2:])
    else:
        main()
