"""What `hpcprune inspect` adds for a block-sequential round: the text figures, per-block sparsity, errors.

    hpcprune inspect runs/llm_wanda.h5 [--json]

From the round's attrs (eval_metric, eval_dense, eval_pruned) and its tables (hpcprune.archive.blocks):
one row per block (layers, kept of total, sparsity, seconds) and each layer's reconstruction error
‖WX − ŴX‖² / ‖WX‖², which the summary shows beside the layer's sparsity.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hpcprune.archive.blocks import round_tables


def sequential_facts(path: str | Path, attrs: dict[str, Any]) -> dict[str, Any] | None:
    """The round's sequential facts, or None for a round of another schedule."""
    if not attrs.get("eval_metric") and "blocks" not in attrs:
        return None
    tables = round_tables(path, attrs["index"])
    errors = {row["name"]: (row["block"], row["error"]) for row in tables.get("reconstruction", [])}
    blocks = {row["block"]: {"block": row["block"], "seconds": row["seconds"], "layers": 0, "kept": 0, "numel": 0}
              for row in tables.get("blocks", [])}
    for layer in tables.get("metrics", []):
        block = blocks.get(errors.get(layer["name"], (None,))[0])
        if block is not None:
            block["layers"] += 1
            block["kept"] += layer["kept"]
            block["numel"] += layer["numel"]
    for block in blocks.values():
        block["sparsity"] = 1.0 - block["kept"] / block["numel"] if block["numel"] else None
    return {"eval": {"metric": attrs.get("eval_metric"), "dense": attrs.get("eval_dense"),
                     "pruned": attrs.get("eval_pruned")},
            "blocks": list(blocks.values()),
            "errors": {name: error for name, (_, error) in errors.items()}}


def render_sequential(facts: dict[str, Any], table, percent, number) -> list[str]:
    """Text lines: the evaluation, then the blocks table (`table`, `percent`, `number` from summary)."""
    figures = facts["eval"]
    lines = [f"eval      {figures['metric'] or 'not measured'}: dense {number(figures['dense'])}, "
             f"pruned {number(figures['pruned'])}", "", "blocks"]
    rows = [[str(block["block"]), str(block["layers"]), f"{block['kept']}/{block['numel']}",
             percent(block["sparsity"], 4), f"{block['seconds']:.2f}"] for block in facts["blocks"]]
    return lines + table(["block", "layers", "kept/total", "sparsity", "seconds"], rows, set())
