"""Test accuracy against sparsity on Fashion-MNIST for every criterion, before and after fine-tuning.

    python bench/quality.py                                   # the whole grid, both models
    python bench/quality.py --models lenet300 --criteria magnitude --sparsities 0.92 0.95 --finetune-epochs 2

Every cell is a real `hpcprune.run.pipeline.run` in this process (calibration, selection, fine-tuning,
archive), all starting from one dense model per architecture: it is trained once (`--dense-epochs`,
SGD as in configs) and saved as a safetensors checkpoint, and each cell names it in
`model.checkpoint`, so the cells differ only by what they measure. For each model, criterion and
sparsity the bench records the test accuracy right after one-shot pruning (`finetune.epochs: 0`)
and after `--finetune-epochs` epochs of masked fine-tuning; at `--gradual-at` sparsities it also
runs the gradual schedule (Zhu & Gupta; magnitude, s_i = 0, ten mask updates over the first two
thirds of the same fine-tuning steps) against one-shot with the same fine-tuning.

Criteria run with their default rules: magnitude, random, taylor and lamp with the exact global
rule, wanda with its per-row comparison. Calibration (taylor, wanda): 8 batches of 128 training
images. Target (issue 5, after Han et al. 2015): LeNet-300-100 after fine-tuning within 0.5 pp of
dense at 92 % sparsity and within 1 pp at 95 %.

Results: bench/results/quality.json (every cell, written after each one, so a cut-short run keeps
what it measured), quality.md (tables) and quality.png (accuracy against sparsity).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from hpcprune.config import validate_tree
from hpcprune.dist.world import SingleWorld
from hpcprune.run.pipeline import run

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ["lenet300", "lenet5"]
CRITERIA = ["magnitude", "random", "taylor", "lamp", "wanda"]
SPARSITIES = [0.5, 0.8, 0.9, 0.92, 0.95, 0.98]
GRADUAL_AT = [0.95, 0.98]
TARGETS = {0.92: 0.005, 0.95: 0.01}  # LeNet-300-100 after fine-tuning: largest loss against dense
TRAIN_IMAGES = 55000  # Fashion-MNIST's 60000 minus the 5000 held out for validation


def base_config(model: str, work: Path, seed: int) -> dict:
    return {
        "seed": seed, "device": "cpu", "progress": False,
        "model": {"name": model},
        "data": {"dataset": "fashion-mnist", "batch_size": 128},
        "pretrain": {"epochs": 0},
        "finetune": {"epochs": 0, "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9}},
        "calibration": {"batches": 8, "batch_size": 128},
        "output": {"path": str(work / "scratch.h5")},
    }


def run_cell(tree: dict, name: str) -> tuple[float, float, float]:
    """(dense accuracy, final accuracy, achieved sparsity) of one pipeline run; seconds logged."""
    started = time.perf_counter()
    result = run(validate_tree(tree, name), SingleWorld(), force=True)
    print(f"  {name}: {100 * result.final_accuracy:.2f} % at {100 * result.achieved_sparsity:.2f} % "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    return result.dense_accuracy, result.final_accuracy, result.achieved_sparsity


def dense_model(model: str, work: Path, args) -> tuple[Path, float]:
    tree = base_config(model, work, args.seed)
    tree["pretrain"] = {"epochs": args.dense_epochs, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}}
    tree["prune"] = {"sparsity": 0.0}
    tree["output"] = {"path": str(work / f"{model}-dense.h5")}
    accuracy, _, _ = run_cell(tree, f"{model} dense")
    return work / f"{model}-dense.h5.states" / "dense.safetensors", accuracy


def pruned_tree(model: str, work: Path, args, checkpoint: Path, criterion: str, sparsity: float, epochs: int) -> dict:
    tree = base_config(model, work, args.seed)
    tree["model"]["checkpoint"] = str(checkpoint)
    tree["prune"] = {"criterion": criterion, "sparsity": sparsity}
    tree["finetune"]["epochs"] = epochs
    return tree


def gradual_schedule(epochs: int, batch_size: int = 128) -> dict:
    steps = math.ceil(TRAIN_IMAGES / batch_size) * epochs
    updates = 10
    return {"kind": "gradual", "initial_sparsity": 0.0, "start_step": 0, "updates": updates,
            "interval": max(1, (2 * steps) // (3 * updates))}


def measure(args, work: Path, results: dict, save) -> None:
    for model in args.models:
        checkpoint, dense = dense_model(model, work, args)
        entry = results["models"][f"{model} {args.tag}".strip()] = {"dense": dense, "settings": settings(args), "cells": []}
        save()
        for criterion in args.criteria:
            for sparsity in args.sparsities:
                cell = {"criterion": criterion, "sparsity": sparsity, "schedule": "oneshot"}
                for key, epochs in (("oneshot", 0), ("finetuned", args.finetune_epochs)):
                    tree = pruned_tree(model, work, args, checkpoint, criterion, sparsity, epochs)
                    _, cell[key], cell["achieved"] = run_cell(tree, f"{model} {criterion} {sparsity:g} {key}")
                entry["cells"].append(cell)
                save()
        for sparsity in args.gradual_at:
            tree = pruned_tree(model, work, args, checkpoint, "magnitude", sparsity, args.finetune_epochs)
            tree["schedule"] = gradual_schedule(args.finetune_epochs)
            _, accuracy, achieved = run_cell(tree, f"{model} magnitude {sparsity:g} gradual")
            entry["cells"].append({"criterion": "magnitude", "sparsity": sparsity, "schedule": "gradual",
                                   "finetuned": accuracy, "achieved": achieved})
            save()


# --- reports ---------------------------------------------------------------------------------------


def pct(value: float | None) -> str:
    return "—" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def settings(args) -> dict:
    return {"argv": " ".join(sys.argv[1:]), "dense_epochs": args.dense_epochs,
            "finetune_epochs": args.finetune_epochs, "seed": args.seed, "machine": machine()}


def machine() -> str:
    return f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"


def markdown(results: dict) -> str:
    lines = ["# Accuracy against sparsity on Fashion-MNIST", "",
             "Test accuracy in %, `one-shot → after fine-tuning`, from `python bench/quality.py`. Criteria with "
             "their default rules (wanda per output row, the others global).", ""]
    for model, entry in results["models"].items():
        oneshot = [c for c in entry["cells"] if c["schedule"] == "oneshot"]
        sparsities = sorted({c["sparsity"] for c in oneshot})
        run = entry["settings"]
        lines += [f"## {model} (dense {pct(entry['dense'])} %)", "",
                  f"`python bench/quality.py {run['argv']}` on {run['machine']}: dense {run['dense_epochs']} "
                  f"epochs, fine-tuning {run['finetune_epochs']} epoch(s), seed {run['seed']}.", "",
                  "| criterion | " + " | ".join(f"{100 * s:g} %" for s in sparsities) + " |",
                  "|---|" + "---|" * len(sparsities)]
        for criterion in dict.fromkeys(c["criterion"] for c in oneshot):
            by_sparsity = {c["sparsity"]: c for c in oneshot if c["criterion"] == criterion}
            row = [f"{pct(by_sparsity[s]['oneshot'])} → {pct(by_sparsity[s]['finetuned'])}" if s in by_sparsity else "—"
                   for s in sparsities]
            lines.append(f"| {criterion} | " + " | ".join(row) + " |")
        gradual = [c for c in entry["cells"] if c["schedule"] == "gradual"]
        if gradual:
            lines += ["", "One-shot against gradual (magnitude, same fine-tuning):", "",
                      "| sparsity | one-shot + fine-tuning | gradual |", "|---|---|---|"]
            for cell in gradual:
                match = next((c for c in oneshot if c["criterion"] == "magnitude" and c["sparsity"] == cell["sparsity"]), None)
                lines.append(f"| {100 * cell['sparsity']:g} % | {pct(match['finetuned'] if match else None)} | "
                             f"{pct(cell['finetuned'])} |")
        lines.append("")
    lines += target_lines(results)
    return "\n".join(lines) + "\n"


def target_lines(results: dict) -> list[str]:
    entries = {name: entry for name, entry in results["models"].items() if name.startswith("lenet300")}
    if not entries:
        return []
    lines = ["## Target: LeNet-300-100 after fine-tuning", "",
             "| run | sparsity | criterion | schedule | loss against dense (pp) | allowed | met |", "|---|---|---|---|---|---|---|"]
    for name, entry in entries.items():
        for sparsity, allowed in TARGETS.items():
            for cell in entry["cells"]:
                if cell["sparsity"] == sparsity:
                    loss = entry["dense"] - cell["finetuned"]
                    lines.append(f"| {name} | {100 * sparsity:g} % | {cell['criterion']} | {cell['schedule']} | "
                                 f"{100 * loss:.2f} | {100 * allowed:g} | {'yes' if loss <= allowed + 1e-9 else 'no'} |")
    return lines + [""]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    columns = min(2, len(models))
    rows = -(-len(models) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(7 * columns, 4.8 * rows), squeeze=False)
    for axis in axes.flat[len(models):]:
        axis.set_visible(False)
    for axis, model in zip(axes.flat, models):
        entry = results["models"][model]
        for criterion in dict.fromkeys(c["criterion"] for c in entry["cells"]):
            cells = sorted((c for c in entry["cells"] if c["criterion"] == criterion and c["schedule"] == "oneshot"),
                           key=lambda c: c["sparsity"])
            colour = f"C{CRITERIA.index(criterion) if criterion in CRITERIA else len(CRITERIA)}"  # same in every panel
            xs = [100 * c["sparsity"] for c in cells]
            axis.plot(xs, [100 * c["finetuned"] for c in cells], "-o", color=colour, label=f"{criterion} fine-tuned")
            axis.plot(xs, [100 * c["oneshot"] for c in cells], "--", color=colour, alpha=0.6, label=f"{criterion} one-shot")
        gradual = [c for c in entry["cells"] if c["schedule"] == "gradual"]
        if gradual:
            axis.plot([100 * c["sparsity"] for c in gradual], [100 * c["finetuned"] for c in gradual], "k*",
                      markersize=12, label="magnitude gradual")
        axis.axhline(100 * entry["dense"], color="grey", linewidth=1, label="dense")
        axis.set(title=f"{model} on Fashion-MNIST", xlabel="sparsity (%)", ylabel="test accuracy (%)")
        axis.set_ylim(max(0, 100 * entry["dense"] - 40), 100 * entry["dense"] + 3)
        axis.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7, loc="lower left", ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--criteria", nargs="+", default=CRITERIA)
    parser.add_argument("--sparsities", nargs="+", type=float, default=SPARSITIES)
    parser.add_argument("--gradual-at", nargs="*", type=float, default=GRADUAL_AT)
    parser.add_argument("--dense-epochs", type=int, default=10)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (small models: 1 wastes least)")
    parser.add_argument("--append", action="store_true", help="keep the other models already in quality.json")
    parser.add_argument("--tag", default="", help="names this run's entries '<model> <tag>' (e.g. longer fine-tuning)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    args.out.mkdir(parents=True, exist_ok=True)
    results = {"models": {}}
    if args.append and (args.out / "quality.json").exists():
        results = json.loads((args.out / "quality.json").read_text())

    def save() -> None:
        (args.out / "quality.json").write_text(json.dumps(results, indent=1) + "\n")
        (args.out / "quality.md").write_text(markdown(results))

    with tempfile.TemporaryDirectory(prefix="hpcprune-quality-") as work:
        measure(args, Path(work), results, save)
    save()
    plot(results, args.out / "quality.png")
    print((args.out / "quality.md").read_text())


if __name__ == "__main__":
    main()
