"""`hpcprune inspect run.h5`: what a run recorded, as a short text report (or JSON with --json).

    hpcprune inspect runs/hpcprune.h5

The report is the archive header, the dense model's test figures, one row per complete round and
the per-layer table of the last complete round.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from hpcprune.archive_reader import open_archive


def summary(path: str | Path) -> dict[str, Any]:
    """The archive's facts as plain JSON-able values (NaN becomes None)."""
    reader = open_archive(path)
    rounds = reader.rounds()
    shapes = {param["name"]: param["shape"] for param in reader.params}
    layers = reader.layers(rounds[-1]["index"]) if rounds else []
    dense = reader.dense
    return _finite({
        "path": str(path),
        "format_version": reader.attrs.get("format_version"),
        "hpcprune_version": reader.attrs.get("hpcprune_version"),
        "created": reader.attrs.get("created"),
        "world_size": reader.attrs.get("world_size"),
        "backend": reader.attrs.get("backend"),
        "model": reader.model.get("name"),
        "num_params": reader.model.get("num_params"),
        "dense": None if dense is None else {key: dense[key] for key in ("accuracy", "loss", "seconds")},
        "rounds": [_round_row(attrs) for attrs in rounds],
        "layers": [{"shape": shapes.get(layer["name"], "?"), **layer} for layer in layers],
    })


def _round_row(attrs: dict[str, Any]) -> dict[str, Any]:
    # select includes scoring (scores are computed inside selection's passes); NaN: not measured.
    stages = (attrs.get(f"seconds_{stage}", math.nan) for stage in ("select", "finetune", "record", "write"))
    seconds = sum(value for value in stages if not math.isnan(value))
    keys = ("index", "criterion", "rule", "target_sparsity", "achieved_sparsity", "kept", "total",
            "threshold", "accuracy", "loss")
    return {**{key: attrs.get(key) for key in keys}, "seconds": seconds}


def render_summary(facts: dict[str, Any]) -> str:
    """`summary`'s facts as aligned plain-text tables."""
    dense = facts["dense"]
    lines = [
        f"archive   {facts['path']} (format {facts['format_version']}, hpcprune {facts['hpcprune_version']}, "
        f"created {facts['created']})",
        f"run       world size {facts['world_size']}, backend {facts['backend']}",
        f"model     {facts['model']}, {facts['num_params']} parameters",
        "dense     not recorded" if dense is None else
        f"dense     test accuracy {_percent(dense['accuracy'])}, loss {_number(dense['loss'])}",
        "",
    ]
    round_rows = [[str(r["index"]), r["criterion"], r["rule"], _percent(r["target_sparsity"]),
                   _percent(r["achieved_sparsity"], 4), f"{r['kept']}/{r['total']}", _number(r["threshold"]),
                   _percent(r["accuracy"]), _number(r["loss"]), f"{r['seconds']:.1f}"] for r in facts["rounds"]]
    lines += _table(["round", "criterion", "rule", "target", "sparsity", "kept/total", "threshold", "accuracy",
                     "loss", "seconds"], round_rows, {1, 2}) if round_rows else ["no complete rounds"]
    if facts["layers"]:
        last = facts["rounds"][-1]["index"]
        layer_rows = [[layer["name"], layer["shape"], str(layer["numel"]), str(layer["kept"]),
                       _percent(layer["sparsity"])] for layer in facts["layers"]]
        lines += ["", f"layers of round {last}"]
        lines += _table(["name", "shape", "numel", "kept", "sparsity"], layer_rows, {0, 1})
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[str]], text_columns: set[int]) -> list[str]:
    """Columns two spaces apart: text left-aligned, numbers right-aligned."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(cell.ljust(width) if i in text_columns else cell.rjust(width)
                         for i, (cell, width) in enumerate(zip(cells, widths))).rstrip()

    return [line(header)] + [line(row) for row in rows]


def _percent(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f} %"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _finite(value: Any) -> Any:
    """NaN (a figure that was not measured) becomes None, so the summary is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value
