"""`hpcprune inspect`: what a run recorded, as text for people or JSON for scripts.

    hpcprune inspect runs/quickstart.h5                 # summary: provenance, rounds, last round's layers
    hpcprune inspect layers runs/quickstart.h5 --round 2 --json

`summary` is the archive header, the run's provenance (config, versions, world, host, start, end,
interruptions and resumes), the dense model's test figures, one row per complete round with its
stage times, and the per-layer table of the last complete round. `layers` is one round's per-tensor
table with score statistics recomputed from the recorded weights (`hpcprune.read.score_stats`). The
other views live beside this module: `diff`, `plots`, `mask_export`, `report`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from hpcprune.archive.config_diff import RESUME_IGNORED_KEYS, flatten, yaml_tree
from hpcprune.archive.reader import ArchiveReader, complete_round, open_archive
from hpcprune.config import RunConfig
from hpcprune.read.score_stats import round_scores
from hpcprune.read.sequential_summary import render_sequential, sequential_facts

STAGES = ("select", "finetune", "record", "write")  # select includes scoring (scores are computed inside its passes)
SETBACKS = ("interrupt", "requeue")
SCORE_COLUMNS = {"score_min": "score min", "score_mean": "mean", "score_std": "std", "score_max": "max",
                 "max_pruned": "max pruned", "min_kept": "min kept", "error": "reconstruction error"}


def summary(path: str | Path) -> dict[str, Any]:
    """The archive's facts as plain JSON-able values (NaN becomes None)."""
    reader = open_archive(path)
    rounds = reader.rounds()
    layers = reader.layers(rounds[-1]["index"]) if rounds else []
    dense = reader.dense
    config = yaml_tree(reader.config_yaml)
    kinds = [event["kind"] for event in reader.events]
    sequential = sequential_facts(path, rounds[-1]) if rounds else None  # schedule sequential: figures, blocks
    return finite({
        "path": str(path),
        "format_version": reader.attrs.get("format_version"),
        "hpcprune_version": reader.attrs.get("hpcprune_version"),
        "created": reader.attrs.get("created"),
        "world_size": reader.attrs.get("world_size"),
        "backend": reader.attrs.get("backend"),
        "host": reader.attrs.get("host"),
        "started": _first_time(reader.events, ("start",)) or reader.attrs.get("created"),
        "finished": _first_time(reader.events[::-1], ("finish",)),
        "resumes": kinds.count("resume"),
        "interruptions": sum(kinds.count(kind) for kind in SETBACKS),
        "events": reader.events,
        "config": config,
        "config_changes": config_changes(config),
        "model": reader.model.get("name"),
        "num_params": reader.model.get("num_params"),
        "dense": None if dense is None else {key: dense[key] for key in ("accuracy", "loss", "seconds")},
        "rounds": [_round_row(attrs) for attrs in rounds],
        "layers": [{"shape": _shapes(reader).get(layer["name"], "?"), **layer, **_error(sequential, layer)}
                   for layer in layers],
        "sequential": sequential,
    })


def layers(path: str | Path, round_index: int | None = None) -> dict[str, Any]:
    """One round's per-tensor table (default: the last complete round) with its score statistics."""
    reader = open_archive(path)
    attrs = complete_round(reader, round_index)
    scores = round_scores(reader, attrs["index"])
    stats = {tensor.name: tensor for tensor in scores.tensors}
    rows = []
    for layer in reader.layers(attrs["index"]):
        tensor = stats.get(layer["name"])
        rows.append({"shape": _shapes(reader).get(layer["name"], "?"), **layer,
                     **{f"score_{key}": getattr(tensor, key, None) for key in ("min", "mean", "std", "max")},
                     "max_pruned": getattr(tensor, "max_pruned", None), "min_kept": getattr(tensor, "min_kept", None),
                     "consistent": getattr(tensor, "consistent", None)})
    return finite({
        "path": str(path), "round": attrs["index"], "criterion": attrs["criterion"], "rule": attrs["rule"],
        "threshold": attrs["threshold"],
        "scores": {"source": scores.source, "unavailable": scores.unavailable,
                   "consistent": None if scores.unavailable else scores.consistent},
        "layers": rows,
    })


def config_changes(config: dict[str, Any]) -> dict[str, Any]:
    """The dotted keys whose value differs from the default config's."""
    defaults = flatten(RunConfig().model_dump(mode="json"))
    return {key: value for key, value in flatten(config).items()
            if defaults.get(key) != value and key not in RESUME_IGNORED_KEYS}


def _round_row(attrs: dict[str, Any]) -> dict[str, Any]:
    stages = {stage: attrs.get(f"seconds_{stage}", math.nan) for stage in STAGES}  # NaN: not measured
    keys = ("index", "criterion", "rule", "target_sparsity", "achieved_sparsity", "kept", "total",
            "threshold", "accuracy", "loss")
    return {**{key: attrs.get(key) for key in keys}, "stages": stages,
            "seconds": sum(value for value in stages.values() if not math.isnan(value))}


def _error(sequential: dict[str, Any] | None, layer: dict[str, Any]) -> dict[str, Any]:
    return {} if sequential is None else {"error": sequential["errors"].get(layer["name"])}


def _shapes(reader: ArchiveReader) -> dict[str, str]:
    return {param["name"]: param["shape"] for param in reader.params}

def _first_time(events: list[dict[str, Any]], kinds: tuple[str, ...]) -> str | None:
    return next((event["time"] for event in events if event["kind"] in kinds), None)


# --- text ------------------------------------------------------------------------------------------


def render_summary(facts: dict[str, Any]) -> str:
    """`summary`'s facts as aligned plain-text tables."""
    dense = facts["dense"]
    changes = " ".join(f"{key}={value}" for key, value in facts["config_changes"].items())
    lines = [
        f"archive   {facts['path']} (format {facts['format_version']}, hpcprune {facts['hpcprune_version']}, "
        f"created {facts['created']})",
        f"run       world size {facts['world_size']}, backend {facts['backend']}, host {facts['host']}",
        f"when      started {facts['started']}, finished {facts['finished'] or 'not recorded'}; "
        f"{facts['resumes']} resume(s), {facts['interruptions']} interruption(s)",
        f"config    {changes or 'all defaults'}",
        f"model     {facts['model']}, {facts['num_params']} parameters",
        "dense     not recorded" if dense is None else
        f"dense     test accuracy {percent(dense['accuracy'])}, loss {number(dense['loss'])}",
        "",
    ]
    if facts["events"]:
        lines += ["events"] + table(*event_table(facts), {0, 1, 2}) + [""]
    lines += table(*round_table(facts), {1, 2}) if facts["rounds"] else ["no complete rounds"]
    if facts.get("sequential"):
        lines += [""] + render_sequential(facts["sequential"], table, percent, number)
    if facts["layers"]:
        lines += ["", f"layers of round {facts['rounds'][-1]['index']}"]
        lines += table(*layer_table(facts["layers"]), {0, 1})
    return "\n".join(lines)


def render_layers(facts: dict[str, Any]) -> str:
    """`layers`' facts: the per-tensor table, then where the score statistics come from."""
    lines = [f"round {facts['round']}: {facts['criterion']} scores, {facts['rule']} rule, "
             f"threshold {number(facts['threshold'])}"]
    lines += table(*layer_table(facts["layers"]), {0, 1})
    lines.append(score_verdict(facts))
    return "\n".join(lines)


def score_verdict(facts: dict[str, Any]) -> str:
    """Where `layers`' score statistics come from, and whether they select the recorded masks."""
    scores = facts["scores"]
    if scores["unavailable"]:
        return f"score statistics unavailable: {scores['unavailable']}"
    verdict = {True: "they select the recorded masks",
               False: "they do NOT select the recorded masks (was the state file replaced?)",
               None: f"masks of the {facts['rule']} rule are not checked against them"}[scores["consistent"]]
    return f"scores recomputed from {scores['source']}: {verdict}"


def event_table(facts: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    return ["time", "kind", "detail"], [[e["time"], e["kind"], e["detail"]] for e in facts["events"]]


def round_table(facts: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and text cells of the rounds of `summary`'s facts."""
    header = ["round", "criterion", "rule", "target", "sparsity", "kept/total", "threshold", "accuracy", "loss",
              *(f"{stage} s" for stage in STAGES)]
    return header, [[str(r["index"]), r["criterion"], r["rule"], percent(r["target_sparsity"]),
                     percent(r["achieved_sparsity"], 4), f"{r['kept']}/{r['total']}", number(r["threshold"]),
                     percent(r["accuracy"]), number(r["loss"]), *(seconds(r["stages"][s]) for s in STAGES)]
                    for r in facts["rounds"]]


def layer_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and text cells of per-tensor rows; score columns only where the rows have them."""
    header = ["name", "shape", "numel", "kept", "sparsity"]
    scored = [key for key in SCORE_COLUMNS if rows and key in rows[0]]
    return header + [SCORE_COLUMNS[key] for key in scored], [
        [row["name"], row["shape"], str(row["numel"]), str(row["kept"]), percent(row["sparsity"]),
         *(number(row[key]) for key in scored)] for row in rows]


def table(header: list[str], rows: list[list[str]], text_columns: set[int]) -> list[str]:
    """Columns two spaces apart: text left-aligned, numbers right-aligned."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(cell.ljust(width) if i in text_columns else cell.rjust(width)
                         for i, (cell, width) in enumerate(zip(cells, widths))).rstrip()

    return [line(header)] + [line(row) for row in rows]


def percent(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f} %"


def number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def seconds(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def finite(value: Any) -> Any:
    """NaN (a figure that was not measured) becomes None, so the facts are strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [finite(item) for item in value]
    return value
