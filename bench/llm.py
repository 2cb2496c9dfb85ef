"""SparseGPT, Wanda and magnitude on a causal LM: hpcprune against llm-compressor in one run.

    python bench/llm.py --model ~/.cache/hpcprune/smollm2-135m --texts ~/.cache/hpcprune/texts
    python bench/llm.py --model DIR --texts DIR --methods sparsegpt --eval-windows 32   # a short run
    python bench/llm.py ... --hpcprune-set sequential.errors=false --name llm-no-errors  # hpcprune measuring no errors

Both sides prune the same model (float32) on the same calibration windows, drawn once here from
TEXTS/calibration.txt and handed to each side as a file: `--samples` windows of `--sequence-length`
tokens at seeded offsets, drawn by hpcprune.models.text_windows. Each method of each side runs
in a process of its own, with `--threads` threads, and reports its pruning seconds and its peak RSS
(VmHWM, which starts again at exec; ru_maxrss would carry this process's own memory into every side):

    anchor     llm-compressor's `oneshot` (SparseGPTModifier, WandaPruningModifier; sequential
               pipeline) in the benchmark's own environment, bench/.venv-llmcompressor, which this
               script creates when it is missing (python -m venv; pip install torch==ANCHOR_TORCH,
               then llmcompressor==ANCHOR_VERSION): never a dependency of hpcprune. See bench/llm_anchor.py.
    solve      hpcprune's decisions (hpcprune.prune.sparsegpt, Wanda and magnitude with hpcprune's
               row and N:M rules) in a block loop of the benchmark's own, the whole model in memory:
               bench/llm_blocks.py (the solvers alone, no pipeline around them).
    hpcprune   `hpcprune prune` with `schedule.kind: sequential` on 1 rank, and hpcprune-2 the same
    hpcprune-2 under `mpirun -n 2`: the real pipeline, block by block (bench/llm_pipeline.py); seconds
               are the whole run's, start-up and reading the model included; peak RSS is the largest
               rank's, CPU seconds the ranks' sum. hpcprune-2's ratio to hpcprune is in the table too.

Two kinds of seconds, each like for like: `run s`, every side's whole process as this script
launches it (interpreter start-up, imports, reading the model, writing what it pruned: the
anchor's weights file, hpcprune's archive), and `blocks s`, the pruning alone: the anchor's
`oneshot` call, and hpcprune's per-block seconds from its archive summed (each block from loading
its weights to recording it: start-up, the model index, tokenizing and the first inputs left out).

Then this process loads each side's pruned weights into the dense model and measures, with one
function for all, the achieved sparsity (exact zeros among the blocks' Linear weights) and the
perplexity on TEXTS/eval.txt: consecutive windows of --sequence-length tokens (the last partial
one dropped; --eval-windows keeps the first N), exp of the mean next-token loss over all of them.

Results: bench/results/<name>.json (every cell, written after each one) and <name>.md, with the
ratios of every side to the anchor for the same method (both seconds, CPU seconds, peak RSS, perplexity).

The full-size figures (64 windows x 256 tokens, all eval windows, one thread per rank), on a quiet machine:

    python bench/llm.py --model ~/.cache/hpcprune/smollm2-135m --texts ~/.cache/hpcprune/texts \
        --sides anchor hpcprune hpcprune-2 --methods sparsegpt wanda sparsegpt-2:4 wanda-2:4 magnitude
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from llm_pipeline import RANKS, SETTINGS, clean, run_pipeline
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
RESULTS = HERE / "results"
ANCHOR_ENV = HERE / ".venv-llmcompressor"
ANCHOR_TORCH = "2.13.0"  # the CPU wheel these machines have on disk
ANCHOR_VERSION = "0.14.*"
ANCHOR_METHODS = ("sparsegpt", "sparsegpt-2:4", "wanda", "wanda-2:4", "magnitude")
METHODS = ("sparsegpt", "wanda", "sparsegpt-2:4", "magnitude")
SIDES = ("anchor", "solve", "hpcprune", "hpcprune-2")
EVAL_BATCH = 4  # eval windows per forward pass
RATIOS = ("run_seconds", "blocks_seconds", "cpu_seconds", "peak_rss_bytes", "perplexity")


def anchor_python(env: Path = ANCHOR_ENV) -> Path:
    """The anchor environment's interpreter, created (venv, CPU torch, llmcompressor) if missing."""
    python = env / "bin" / "python"
    if not python.exists():
        print(f"creating {env} (CPU torch {ANCHOR_TORCH}, llmcompressor {ANCHOR_VERSION})", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, f"torch=={ANCHOR_TORCH}"], check=True)  # first: llmcompressor must not pull a CUDA torch
        subprocess.run([*pip, f"llmcompressor=={ANCHOR_VERSION}"], check=True)
    return python


def draw_windows(folder: Path, text: Path, samples: int, length: int, seed: int) -> torch.Tensor:
    """[samples, length] calibration windows, drawn by hpcprune.models.text_windows as hpcprune draws them."""
    from hpcprune.config import CalibrationConfig
    from hpcprune.models.text_windows import calibration_windows

    config = CalibrationConfig(text=str(text), samples=samples, sequence_length=length, seed=seed)
    return calibration_windows(folder, config).contiguous()


def eval_windows(folder: Path, text: Path, length: int, limit: int | None) -> torch.Tensor:
    from hpcprune.models import text_windows

    windows = text_windows.eval_windows(folder, str(text), length)
    return windows[:limit] if limit else windows


def load_model(folder: Path, weights: Path | None = None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    if weights is not None:
        _, unexpected = model.load_state_dict(load_file(weights), strict=False)
        if unexpected:
            raise RuntimeError(f"{weights}: tensors the model does not have: {unexpected[:3]}")
    return model


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    """exp(mean next-token loss) over all windows, each scored alone (no context across windows)."""
    total, count = 0.0, 0
    for start in range(0, len(windows), EVAL_BATCH):
        ids = windows[start:start + EVAL_BATCH]
        logits = model(ids, use_cache=False).logits
        total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum"))
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def sparsity_of(model) -> float:
    """Exact zeros among the weights of the blocks' Linear layers (what every method prunes)."""
    from llm_side import block_weights

    tensors = block_weights(model).values()
    return sum(int((t == 0).sum()) for t in tensors) / sum(t.numel() for t in tensors)


def run_side(side: str, method: str, args, work: Path) -> dict:
    """One side's run of `method` in its own process(es); its report plus the pruned model's measures."""
    if side in RANKS:
        return _measured(side, method, args, run_pipeline(side, method, args, work), lambda: clean(work, side, method))
    script, python = {"anchor": ("llm_anchor.py", None), "solve": ("llm_blocks.py", sys.executable)}[side]
    python = python or str(anchor_python())
    stem = work / f"{side}-{method.replace(':', '_')}"
    command = [python, str(HERE / script), "--model", str(args.model), "--windows", str(work / "windows.safetensors"),
               "--method", method, "--weights", f"{stem}.safetensors", "--report", f"{stem}.json",
               "--sparsity", str(args.sparsity), "--threads", str(args.threads)]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads),
                   "PYTHONPATH": str(ROOT) if side == "solve" else ""}  # the anchor never sees hpcprune
    started = time.perf_counter()
    finished = subprocess.run(command, env=environment, capture_output=True, text=True)
    if finished.returncode:
        return {"side": side, "method": method, "failed": finished.stderr[-4000:]}
    report = json.loads(Path(f"{stem}.json").read_text())
    report["run_seconds"] = time.perf_counter() - started
    report.setdefault("blocks_seconds", report["prune_seconds"])  # oneshot: its first inputs and every layer
    weights = Path(f"{stem}.safetensors")
    return _measured(side, method, args, (report, load_model(args.model, weights)), weights.unlink)


def _measured(side: str, method: str, args, outcome, cleanup) -> dict:
    """The side's report with the achieved sparsity and perplexity of the model it pruned."""
    if isinstance(outcome, dict):  # failed
        return outcome
    report, model = outcome
    if isinstance(model, Path):  # an exported folder
        model = load_model(model)
    report.update(side=side, method=method, sparsity=sparsity_of(model), perplexity=perplexity(model, args.eval_ids))
    cleanup()
    return report


def with_ratios(cells: list[dict]) -> list[dict]:
    """Each cell's seconds, peak RSS and perplexity over the anchor's for the same method."""
    anchors = {cell["method"]: cell for cell in cells if cell["side"] == "anchor" and "failed" not in cell}
    one_rank = {cell["method"]: cell for cell in cells if cell["side"] == "hpcprune" and "failed" not in cell}
    for cell in cells:
        if "failed" in cell:
            continue
        if cell["side"] == "hpcprune-2" and cell["method"] in one_rank:
            cell["seconds_vs_1_rank"] = cell["run_seconds"] / one_rank[cell["method"]]["run_seconds"]
        anchor = anchors.get(cell["method"].replace("sparsegpt-layer", "sparsegpt"))
        if anchor is None or cell["side"] == "anchor":
            continue
        cell["ratios"] = {key: cell[key] / anchor[key] for key in RATIOS if key in cell and key in anchor}
    return cells


def table(result: dict) -> str:
    lines = [f"# {result['name']}: hpcprune against llm-compressor", "",
             f"{result['model']}, {result['windows'][0]} windows x {result['windows'][1]} tokens, "
             f"{result['threads']} thread(s), eval {result['eval_windows']} windows; dense perplexity "
             f"{result['dense_perplexity']:.2f}. {result['note']}",
             *([f"hpcprune's sides with {', '.join(result['hpcprune_set'])}."] if result.get("hpcprune_set") else []), "",
             "| method | side | run s | blocks s | CPU s | peak RSS GiB | sparsity | perplexity | run s / anchor "
             "| blocks s / anchor | CPU s / anchor | RSS / anchor | ppl / anchor | s / 1 rank |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for cell in result["cells"]:
        if "failed" in cell:
            lines.append(f"| {cell['method']} | {cell['side']} | failed: {cell['failed'].splitlines()[-1][:80]} |")
            continue
        ratios = cell.get("ratios", {})
        shown = [f"{ratios[key]:.3f}" if key in ratios else "" for key in RATIOS]
        shown.append(f"{cell['seconds_vs_1_rank']:.3f}" if "seconds_vs_1_rank" in cell else "")
        cpu = f"{cell['cpu_seconds']:.0f}" if "cpu_seconds" in cell else ""
        blocks = f"{cell['blocks_seconds']:.0f}" if "blocks_seconds" in cell else ""
        lines.append(f"| {cell['method']} | {cell['side']} | {cell['run_seconds']:.0f} | {blocks} | {cpu} | "
                     f"{cell['peak_rss_bytes'] / 2 ** 30:.2f} | {100 * cell['sparsity']:.4f} % | "
                     f"{cell['perplexity']:.2f} | {' | '.join(shown)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a causal LM folder (safetensors)")
    parser.add_argument("--texts", type=Path, required=True, help="folder with calibration.txt and eval.txt")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-windows", type=int, default=0, help="first N eval windows (0: all)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    parser.add_argument("--work", type=Path, default=Path("/tmp/hpcprune-bench-llm"))
    parser.add_argument("--name", default="llm")
    parser.add_argument("--note", default="")
    parser.add_argument("--hpcprune-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for the hpcprune sides (repeatable), e.g. sequential.errors=false")
    args = parser.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    windows = draw_windows(args.model, args.texts / "calibration.txt", args.samples, args.sequence_length, args.seed)
    save_file({"input_ids": windows}, args.work / "windows.safetensors")
    args.eval_ids = eval_windows(args.model, args.texts / "eval.txt", args.sequence_length, args.eval_windows)
    result = {"name": args.name, "model": str(args.model), "windows": list(windows.shape), "threads": args.threads,
              "eval_windows": len(args.eval_ids), "note": args.note, "host": platform.node(),
              "hpcprune_set": args.hpcprune_set, "cells": [],
              "dense_perplexity": perplexity(load_model(args.model), args.eval_ids)}
    print(f"dense perplexity {result['dense_perplexity']:.2f} on {len(args.eval_ids)} windows", flush=True)
    for method in args.methods:
        for side in args.sides:
            if (side == "anchor" and method not in ANCHOR_METHODS) or (side in RANKS and method not in SETTINGS):
                continue
            cell = run_side(side, method, args, args.work)
            print(f"  {method} {side}: " + (f"failed\n{cell['failed']}" if "failed" in cell else
                  f"{cell['run_seconds']:.0f} s, {cell['peak_rss_bytes'] / 2 ** 30:.2f} GiB, "
                  f"sparsity {100 * cell['sparsity']:.2f} %, perplexity {cell['perplexity']:.2f}"), flush=True)
            result["cells"] = with_ratios([*result["cells"], cell])
            RESULTS.mkdir(exist_ok=True)
            (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
            (RESULTS / f"{args.name}.md").write_text(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
