"""Wanda against magnitude on SmolLM2-135M, and the same masks under every launcher and world size.

    nice python -m bench.llm_wanda                 # full figures: 64 windows x 256 tokens, all of eval.txt
    nice python -m bench.llm_wanda --samples 4 --sequence-length 64 --eval-windows 4 --out -   # small, printed

The model is the SmolLM2-135M-Instruct folder and the texts are calibration.txt and the held-out
eval.txt that tests/build_smollm2.py and tests/build_texts.py build (tests/run.sh builds both into
~/.cache/hpcprune; the Python documentation's library reference and HOWTOs to calibrate on, its
tutorial to evaluate on). Every run is the real CLI on configs/llm_wanda.yaml with `--set`
overrides: 50 % unstructured per output row (`prune.rule: row`), --samples calibration windows of
--sequence-length tokens, perplexity over consecutive windows of the same length of eval.txt
(--eval-windows: only as many lines of it as give that many windows).

    magnitude  `hpcprune prune ... --set prune.criterion=magnitude` (`mpirun -n 1`): the anchor,
               with the dense perplexity every run also measures
    wanda      the same with prune.criterion=wanda under `mpirun -n 1`, `-n 2`, `-n 3` and
               `torchrun --nproc_per_node 2`

Reported: perplexity dense, magnitude, Wanda, and Wanda / magnitude as a ratio; for each Wanda run,
whether its masks are bit-identical to `mpirun -n 1`'s (hpcprune.read.diff, the archives' own
packed masks) and its perplexities equal; wall time and peak RSS per rank. Results go to
bench/results/llm_wanda.json and .md.
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import torch

from bench.launched import ROOT, launch, mpirun, publish, torchrun
from hpcprune.errors import UsageError
from hpcprune.models.text_windows import eval_windows

RESULTS = ROOT / "bench" / "results"
CACHE = Path(os.environ.get("HPCPRUNE_CACHE", Path.home() / ".cache" / "hpcprune"))
CONFIG = ROOT / "configs" / "llm_wanda.yaml"
LAUNCHERS = {  # name -> command line of `hpcprune ARGS` under it
    "mpirun -n 1": lambda *args: mpirun(1, *args),
    "mpirun -n 2": lambda *args: mpirun(2, *args),
    "mpirun -n 3": lambda *args: mpirun(3, *args),
    "torchrun --nproc_per_node 2": lambda *args: torchrun(2, *args),
}
REFERENCE = "mpirun -n 1"


def eval_text(source: Path, folder: Path, length: int, windows: int | None, out: Path) -> tuple[Path, int]:
    """`source`, or its shortest prefix of whole lines that gives at least `windows` windows; and the count."""
    if windows is None:
        return source, len(eval_windows(folder, str(source), length))
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    low, high = 1, len(lines)  # binary search: the windows a prefix gives grow with its lines
    while low < high:
        middle = (low + high) // 2
        out.write_text("".join(lines[:middle]), encoding="utf-8")
        if _windows(folder, out, length) >= windows:
            high = middle
        else:
            low = middle + 1
    out.write_text("".join(lines[:low]), encoding="utf-8")
    return out, _windows(folder, out, length)


def _windows(folder: Path, text: Path, length: int) -> int:
    try:
        return len(eval_windows(folder, str(text), length))
    except UsageError:  # fewer tokens than one window
        return 0


def overrides(args: argparse.Namespace, text: Path, archive: Path, criterion: str) -> list[str]:
    settings = {"model.name": f"hf:{args.model}", "prune.criterion": criterion, "prune.rule": "row",
                "prune.sparsity": args.sparsity, "calibration.text": args.texts / "calibration.txt",
                "calibration.samples": args.samples, "calibration.sequence_length": args.sequence_length,
                "eval.text": text, "eval.sequence_length": args.sequence_length, "output.path": archive,
                "progress": "false", "sequential.threads": 1}
    return ["prune", "--config", str(CONFIG), *(part for key, value in settings.items()
                                               for part in ("--set", f"{key}={value}")), "--force", "-q"]


def run(name: str, command: list[str], archive: Path) -> dict:
    from hpcprune.archive.reader import open_archive

    launched = launch(command, name)
    attrs = open_archive(archive).rounds()[-1]
    return {"launcher": name, "archive": str(archive), "wall_seconds": launched.wall_seconds,
            "peak_rss_bytes": launched.peak_rss_bytes, "perplexity_dense": float(attrs["eval_dense"]),
            "perplexity_pruned": float(attrs["eval_pruned"]), "achieved_sparsity": float(attrs["achieved_sparsity"]),
            "kept": int(attrs["kept"])}


def measure(args: argparse.Namespace) -> dict:
    from hpcprune.read.diff import diff

    missing = [path for path in (args.model / "config.json", args.texts / "calibration.txt", args.texts / "eval.txt")
               if not path.is_file()]
    if missing:
        raise SystemExit(f"llm_wanda: {missing[0]} is missing; build it with tests/build_smollm2.py "
                         f"{CACHE / 'smollm2-135m'} and tests/build_texts.py {CACHE / 'texts'}")
    args.dir.mkdir(parents=True, exist_ok=True)
    text, windows = eval_text(args.texts / "eval.txt", args.model, args.sequence_length, args.eval_windows,
                              args.dir / "eval.txt")
    archive = args.dir / "magnitude.h5"
    magnitude = run("magnitude, mpirun -n 1", mpirun(1, *overrides(args, text, archive, "magnitude")), archive)
    wanda = {}
    for name, command in LAUNCHERS.items():
        archive = args.dir / f"wanda-{name.replace(' ', '').replace('--nproc_per_node', '')}.h5"
        wanda[name] = run(name, command(*overrides(args, text, archive, "wanda")), archive)
    reference = wanda[REFERENCE]
    for result in wanda.values():
        result["masks_identical_to_reference"] = bool(diff(reference["archive"], result["archive"])["identical"])
        result["perplexities_equal_to_reference"] = (
            (result["perplexity_dense"], result["perplexity_pruned"])
            == (reference["perplexity_dense"], reference["perplexity_pruned"]))
    return {
        "model": str(args.model), "samples": args.samples, "sequence_length": args.sequence_length,
        "eval_windows": windows, "eval_text": str(text), "sparsity": args.sparsity, "rule": "row",
        "perplexity_dense": reference["perplexity_dense"], "perplexity_magnitude": magnitude["perplexity_pruned"],
        "perplexity_wanda": reference["perplexity_pruned"],
        "wanda_over_magnitude": reference["perplexity_pruned"] / magnitude["perplexity_pruned"],
        "dense_equal_in_every_run": len({run_result["perplexity_dense"]
                                         for run_result in [magnitude, *wanda.values()]}) == 1,
        "masks_identical_every_launcher": all(result["masks_identical_to_reference"] for result in wanda.values()),
        "magnitude": magnitude, "wanda": list(wanda.values()),
        "cores": os.cpu_count(), "load_average_before": args.load, "python": platform.python_version(),
        "torch": torch.__version__,
        # The calibration is 64 windows of 256 tokens; the evaluation windows are stated in the
        # text either way (a prefix of eval.txt is still held-out text), so they alone do not make it small.
        "small_size": (args.samples, args.sequence_length) != (64, 256) or (args.eval_windows or 64) < 16,
    }


def render(result: dict) -> str:
    gib = 2**30
    label = " (SMALL SIZE: a proof that the benchmark runs, not the figures)" if result["small_size"] else ""
    lines = [
        f"# Wanda against magnitude on SmolLM2-135M, and its masks under every launcher{label}",
        "",
        f"{100 * result['sparsity']:.0f} % unstructured per output row of every Linear layer in the 30 blocks; "
        f"{result['samples']} calibration windows x {result['sequence_length']} tokens of calibration.txt; "
        f"perplexity over {result['eval_windows']} consecutive windows of {result['sequence_length']} tokens of the "
        f"held-out eval.txt; one thread per rank, {result['cores']} cores (load average "
        f"{result['load_average_before']:.2f} before).",
        "",
        "| model | perplexity | / dense |",
        "|---|---:|---:|",
        f"| dense | {result['perplexity_dense']:.3f} | 1.00 |",
        f"| magnitude 50 % | {result['perplexity_magnitude']:.3f} | {result['perplexity_magnitude'] / result['perplexity_dense']:.2f} |",
        f"| Wanda 50 % | {result['perplexity_wanda']:.3f} | {result['perplexity_wanda'] / result['perplexity_dense']:.2f} |",
        "",
        f"Wanda / magnitude perplexity: {result['wanda_over_magnitude']:.3f}.",
        "",
        "| Wanda run | wall s | peak RSS per rank (GiB) | masks = mpirun -n 1 | perplexities = mpirun -n 1 |",
        "|---|---:|---|---|---|",
    ]
    for run_result in result["wanda"]:
        peaks = ", ".join(f"{peak / gib:.2f}" for peak in run_result["peak_rss_bytes"])
        lines.append(f"| {run_result['launcher']} | {run_result['wall_seconds']:.1f} | {peaks} | "
                     f"{'identical' if run_result['masks_identical_to_reference'] else 'DIFFER'} | "
                     f"{'equal' if run_result['perplexities_equal_to_reference'] else 'DIFFER'} |")
    lines += [
        "",
        f"- Masks bit-identical under every launcher: {result['masks_identical_every_launcher']}.",
        f"- Dense perplexity the same in every run (magnitude's included): {result['dense_equal_in_every_run']}.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=CACHE / "smollm2-135m", help="the SmolLM2-135M folder")
    parser.add_argument("--texts", type=Path, default=CACHE / "texts", help="folder of calibration.txt and eval.txt")
    parser.add_argument("--samples", type=int, default=64, help="calibration windows")
    parser.add_argument("--sequence-length", type=int, default=256, help="tokens per window")
    parser.add_argument("--eval-windows", type=int, default=None, help="evaluation windows (default: all of eval.txt)")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/hpcprune-llm-wanda"), help="archives go here")
    parser.add_argument("--out", default=str(RESULTS / "llm_wanda"), help="results stem, or - to only print")
    args = parser.parse_args()
    args.load = os.getloadavg()[0]
    publish(measure(args), render, args.out)


if __name__ == "__main__":
    main()
