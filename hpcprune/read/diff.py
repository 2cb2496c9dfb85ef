"""`hpcprune inspect diff`: how far two runs' masks agree, and their figures side by side.

    hpcprune inspect diff runs/magnitude.h5 runs/random.h5 [--round N] [--json]

Per tensor: whether the masks are bit-identical, and the Jaccard index of the kept sets
(|A ∩ B| / |A ∪ B|, 1 for two empty sets), counted on the packed bits one tensor at a time, so
memory is two tensors' masks at numel/8 bytes each. Without --round each archive's last complete
round is compared; with it, round N of both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hpcprune.archive.codec import packed_kept
from hpcprune.archive.config_diff import RESUME_IGNORED_KEYS, flatten, yaml_tree
from hpcprune.archive.reader import complete_round, open_archive
from hpcprune.errors import UsageError
from hpcprune.read.summary import finite, number, percent, table

METRICS = ("criterion", "rule", "target_sparsity", "achieved_sparsity", "kept", "total", "threshold", "accuracy", "loss")


def diff(path_a: str | Path, path_b: str | Path, round_index: int | None = None) -> dict[str, Any]:
    a, b = open_archive(path_a), open_archive(path_b)
    round_a, round_b = complete_round(a, round_index), complete_round(b, round_index)
    tensors = [_agreement(name, packed_a, packed_b)
               for name, packed_a, packed_b in _paired_masks(a, round_a["index"], b, round_b["index"])]
    both, either = sum(t["both"] for t in tensors), sum(t["either"] for t in tensors)
    config_a, config_b = flatten(yaml_tree(a.config_yaml)), flatten(yaml_tree(b.config_yaml))
    return finite({
        "a": str(path_a), "b": str(path_b), "round_a": round_a["index"], "round_b": round_b["index"],
        "identical": all(t["identical"] for t in tensors),
        "jaccard": jaccard(both, either),
        "tensors": tensors,
        "metrics": [{"name": key, "a": round_a.get(key), "b": round_b.get(key)} for key in METRICS],
        "config": [{"key": key, "a": config_a.get(key), "b": config_b.get(key)}
                   for key in sorted(set(config_a) | set(config_b))
                   if config_a.get(key) != config_b.get(key) and key not in RESUME_IGNORED_KEYS],
    })


def jaccard(both: int, either: int) -> float:
    return both / either if either else 1.0


def _paired_masks(a, index_a: int, b, index_b: int):
    """(name, packed A, packed B) in A's order; UsageError unless both prune the same tensors."""
    shapes_a = {layer["name"]: layer["numel"] for layer in a.layers(index_a)}
    shapes_b = {layer["name"]: layer["numel"] for layer in b.layers(index_b)}
    if shapes_a != shapes_b:
        only_a = sorted(set(shapes_a) - set(shapes_b)) or "none"
        only_b = sorted(set(shapes_b) - set(shapes_a)) or "none"
        raise UsageError(f"{a.path} and {b.path} prune different tensors (only in the first: {only_a}, "
                         f"only in the second: {only_b}, or different sizes): their masks cannot be compared")
    masks_b = b.iter_packed_masks(index_b)
    for name_a, packed_a, _ in a.iter_packed_masks(index_a):
        # Plans order tensors the same way for the same tensors, but do not rely on it: look B's up.
        name_b, packed_b, _ = next(masks_b)
        if name_b != name_a:
            packed_b = b.read_packed_masks(index_b)[name_a]
        yield name_a, packed_a, packed_b


def _agreement(name: str, packed_a: np.ndarray, packed_b: np.ndarray) -> dict[str, Any]:
    both, either = packed_kept(packed_a & packed_b), packed_kept(packed_a | packed_b)
    return {"name": name, "kept_a": packed_kept(packed_a), "kept_b": packed_kept(packed_b), "both": both,
            "either": either, "identical": bool(np.array_equal(packed_a, packed_b)), "jaccard": jaccard(both, either)}


def render_diff(facts: dict[str, Any]) -> str:
    verdict = "identical masks" if facts["identical"] else f"masks differ: Jaccard {facts['jaccard']:.4f} over all tensors"
    lines = [f"A  {facts['a']} round {facts['round_a']}", f"B  {facts['b']} round {facts['round_b']}", verdict, ""]
    lines += table(["tensor", "kept A", "kept B", "kept by both", "identical", "jaccard"],
                   [[t["name"], str(t["kept_a"]), str(t["kept_b"]), str(t["both"]), "yes" if t["identical"] else "no",
                     f"{t['jaccard']:.4f}"] for t in facts["tensors"]], {0, 4})
    lines += [""] + table(["metric", "A", "B"], [[m["name"], _metric(m["name"], m["a"]), _metric(m["name"], m["b"])]
                                                 for m in facts["metrics"]], {0, 1, 2})
    if facts["config"]:
        lines += ["", "config differences"]
        lines += table(["key", "A", "B"], [[c["key"], str(c["a"]), str(c["b"])] for c in facts["config"]], {0, 1, 2})
    return "\n".join(lines)


def _metric(name: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if name in ("target_sparsity", "achieved_sparsity", "accuracy"):
        return percent(value, 4 if name == "achieved_sparsity" else 2)
    return str(value) if isinstance(value, int) else number(value)
