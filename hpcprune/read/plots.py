"""`hpcprune inspect plot`: a run's figures as PNG files.

    hpcprune inspect plot runs/quickstart.h5 --out runs/quickstart-plots

One figure per question: how much of each layer every round pruned (`sparsity_per_layer`), what
accuracy and loss cost against sparsity (`accuracy_vs_sparsity`), how fine-tuning went (`finetune`),
and where each round's threshold fell among the scores (`scores_round_NNNN`, recomputed as in
`hpcprune.read.score_stats`). A figure with nothing to show (no accuracy in a masks-only run, weights
no longer beside the archive) is left out with the reason. Needs matplotlib (`pip install
'hpcprune[plot]'`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcprune.archive.atomic import refuse_existing, replace_atomically
from hpcprune.archive.reader import ArchiveReader, open_archive, refuse_writing_over
from hpcprune.errors import UsageError
from hpcprune.read.score_stats import round_scores

HISTOGRAM_BINS = 60


@dataclass
class Figures:
    """Named matplotlib figures, and the reason each left-out figure was left out."""

    figures: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def close(self) -> None:
        import matplotlib.pyplot as plt

        for figure in self.figures.values():
            plt.close(figure)


def figures(path: str | Path) -> Figures:
    """Every figure of the archive at `path`, drawn but not written."""
    _use_matplotlib()
    reader = open_archive(path)
    rounds = reader.rounds()
    result = Figures()
    if not rounds:
        result.skipped["all"] = "no complete round"
        return result
    for name, draw in FIGURES.items():
        _keep(result, name, draw(reader, rounds))
    for attrs in rounds:
        _keep(result, f"scores_round_{attrs['index']:04d}", _scores(reader, attrs))
    return result


def write_plots(path: str | Path, out: str | Path, *, force: bool = False) -> dict[str, Any]:
    """Write every figure of `path` as `<out>/<name>.png`; returns the files and the reasons for any left out."""
    out = Path(out)
    refuse_writing_over(open_archive(path), out)
    drawn = figures(path)
    try:
        targets = {name: out / f"{name}.png" for name in drawn.figures}
        for target in targets.values():
            refuse_existing(target, force)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(f"cannot create the plot folder {out}: {error.strerror or error}") from None
        for name, target in targets.items():
            with replace_atomically(target) as temporary:
                drawn.figures[name].savefig(temporary, format="png", dpi=110)
    finally:
        drawn.close()
    return {"archive": str(path), "files": [str(target) for target in targets.values()], "skipped": drawn.skipped}


def _keep(result: Figures, name: str, drawn: Any) -> None:
    if isinstance(drawn, str):
        result.skipped[name] = drawn
    else:
        result.figures[name] = drawn


def _use_matplotlib() -> None:
    try:
        import matplotlib
    except ImportError:
        raise UsageError("plots need matplotlib: pip install 'hpcprune[plot]'") from None
    except ValueError as error:  # matplotlib reads $MPLBACKEND when imported and refuses an unknown one
        raise UsageError(f"MPLBACKEND={os.environ.get('MPLBACKEND', '')!r} is not a matplotlib backend "
                         f"({str(error).split(';')[0]}); unset it: hpcprune draws into files with Agg") from None
    matplotlib.use("Agg")  # files only: no display on a cluster node


# --- the figures: each returns a figure, or why there is none --------------------------------------


def _sparsity_per_layer(reader: ArchiveReader, rounds: list[dict[str, Any]]):
    import matplotlib.pyplot as plt

    names = [layer["name"] for layer in reader.layers(rounds[-1]["index"])]
    figure, axes = plt.subplots(figsize=(max(6.0, 0.9 * len(names) + 2), 4.2), layout="constrained")
    width = 0.8 / len(rounds)
    for position, attrs in enumerate(rounds):
        sparsity = {layer["name"]: 100 * layer["sparsity"] for layer in reader.layers(attrs["index"])}
        offsets = [i + (position - (len(rounds) - 1) / 2) * width for i in range(len(names))]
        axes.bar(offsets, [sparsity[name] for name in names], width, label=f"round {attrs['index']}")
    axes.set_xticks(range(len(names)), names, rotation=30 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
    axes.set_ylabel("sparsity (%)")
    axes.set_ylim(0, 100)
    axes.set_title("Per-layer sparsity by round")
    axes.legend(fontsize="small")
    axes.grid(axis="y", alpha=0.3)
    return figure


def _accuracy_vs_sparsity(reader: ArchiveReader, rounds: list[dict[str, Any]]):
    import matplotlib.pyplot as plt

    points = [(0.0, reader.dense["accuracy"], reader.dense["loss"], "dense")] if reader.dense else []
    points += [(r["achieved_sparsity"], r["accuracy"], r["loss"], f"round {r['index']}") for r in rounds]
    points = [p for p in points if not (math.isnan(p[1]) or math.isnan(p[2]))]
    if not points:
        return "no accuracy was measured (a masks-only run)"
    figure, (accuracy_axes, loss_axes) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    sparsity = [100 * p[0] for p in points]
    for axes, values, label in ((accuracy_axes, [100 * p[1] for p in points], "test accuracy (%)"),
                                (loss_axes, [p[2] for p in points], "test loss")):
        axes.plot(sparsity, values, marker="o")
        for x, y, point in zip(sparsity, values, points):
            axes.annotate(point[3], (x, y), textcoords="offset points", xytext=(4, 4), fontsize="small")
        axes.set_xlabel("sparsity (%)")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
    figure.suptitle("Accuracy and loss against sparsity")
    return figure


def _finetune(reader: ArchiveReader, rounds: list[dict[str, Any]]):
    import matplotlib.pyplot as plt

    stretches = [("dense", (reader.dense or {}).get("history", []))]
    stretches += [(f"round {r['index']}", reader.history(r["index"])) for r in rounds]
    rows, starts = [], []  # every epoch in order, numbered across stretches; where each stretch starts
    for label, history in stretches:
        if history:
            starts.append((len(rows) + 0.5, label))
            rows += history
    if not rows:
        return "no training was recorded (no epochs)"
    epochs = range(1, len(rows) + 1)
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    loss_axes.plot(epochs, [row["train_loss"] for row in rows], marker="o", label="training")
    loss_axes.plot(epochs, [row["eval_loss"] for row in rows], marker="s", linestyle="--", label="validation")
    loss_axes.set_yscale("log")
    loss_axes.legend(fontsize="small")
    accuracy_axes.plot(epochs, [100 * row["eval_accuracy"] for row in rows], marker="o", color="tab:green")
    loss_axes.set(xlabel="epoch (all training, in order)", ylabel="loss", title="Loss")
    accuracy_axes.set(xlabel="epoch (all training, in order)", ylabel="validation accuracy (%)",
                      title="Validation accuracy")
    for axes in (loss_axes, accuracy_axes):
        for position, label in starts:  # a dotted line where the dense training and each round begin
            axes.axvline(position, color="grey", linewidth=0.8, linestyle=":")
            axes.annotate(label, (position, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                          textcoords="offset points", fontsize="x-small", color="dimgrey")
        axes.grid(alpha=0.3)
    return figure


def _scores(reader: ArchiveReader, attrs: dict[str, Any]):
    import matplotlib.pyplot as plt

    scores = round_scores(reader, attrs["index"], bins=HISTOGRAM_BINS)
    if scores.unavailable:
        return scores.unavailable
    figure, axes = plt.subplots(figsize=(8, 4.2), layout="constrained")
    edges, bottom = scores.edges, [0] * HISTOGRAM_BINS
    widths = [high - low for low, high in zip(edges, edges[1:])]
    for tensor in scores.tensors:
        axes.bar(edges[:-1], tensor.histogram, widths, bottom=bottom, align="edge", label=tensor.name)
        bottom = [b + c for b, c in zip(bottom, tensor.histogram)]
        if scores.threshold is None and tensor.max_pruned is not None:  # per-layer rule: each tensor's own boundary
            axes.axvline(tensor.max_pruned, color=axes.patches[-1].get_facecolor(), linestyle="--", linewidth=1)
    if scores.threshold is not None:
        axes.axvline(scores.threshold, color="black", linestyle="--", linewidth=1.5,
                     label=f"threshold {scores.threshold:.4g}")
    axes.set_yscale("symlog", linthresh=1)
    axes.set(xlabel=f"{scores.criterion} score", ylabel="weights",
             title=f"Round {attrs['index']}: scores of the weights still in play ({attrs['rule']} rule)")
    axes.legend(fontsize="small")
    return figure


FIGURES: dict[str, Callable[[ArchiveReader, list[dict[str, Any]]], Any]] = {
    "sparsity_per_layer": _sparsity_per_layer,
    "accuracy_vs_sparsity": _accuracy_vs_sparsity,
    "finetune": _finetune,
}
