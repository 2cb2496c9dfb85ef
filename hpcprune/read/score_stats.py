"""Score statistics of a recorded round, recomputed from the weights the round started from.

    hpcprune inspect layers runs/quickstart.h5 --round 2

The archive keeps masks, not scores: recording them would cost every run a further pass over its
scores for figures that are only sometimes looked at. A round's scores are a pure function of what
the archive already records: the weights the round started from (the dense state for round 1, the
previous round's state after that, the checkpoint of a masks-only run), the criterion, the seed and
the previous round's masks (weights pruned earlier score -inf). So they are recomputed here with the
pipeline's own `LazyScores`, one tensor at a time: memory is one tensor's scores plus fixed-size
histograms.

Each tensor's recomputed scores are checked against its recorded mask: no pruned score may exceed
a kept one, and the round's threshold (when it has one) must lie between them. A state file that no
longer matches the run is reported as inconsistent rather than trusted; a missing one leaves the
statistics out with the reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hpcprune.archive.reader import ArchiveReader
from hpcprune.config import CHECKPOINT_MODEL, RunConfig, load_config_text
from hpcprune.models.weights import CheckpointWeights
from hpcprune.prune.plan import TensorSpec
from hpcprune.prune.scoring import LazyScores, ScoreContext
from hpcprune.registry import needs_calibration

CHECKED_RULES = ("global", "layer", "threshold")  # a tensor's pruned scores never exceed its kept ones


@dataclass
class TensorScores:
    name: str
    alive: int  # weights scored in this round: not pruned by an earlier one (finite scores)
    min: float | None
    mean: float | None
    std: float | None
    max: float | None
    max_pruned: float | None  # highest score pruned in this round (None: nothing pruned)
    min_kept: float | None  # lowest score kept (None: nothing kept)
    consistent: bool | None  # the recorded mask is what these scores select (None: not checked for this rule)
    histogram: list[int] | None = None  # counts over RoundScores.edges


@dataclass
class RoundScores:
    round: int
    criterion: str
    threshold: float | None  # the round's boundary score (global and threshold rules)
    source: str | None  # the weights that were scored
    unavailable: str | None = None  # why there are no statistics
    edges: list[float] | None = None  # histogram bin edges shared by all tensors
    tensors: list[TensorScores] = field(default_factory=list)

    @property
    def consistent(self) -> bool | None:
        checked = [tensor.consistent for tensor in self.tensors if tensor.consistent is not None]
        return all(checked) if checked else None


def round_scores(reader: ArchiveReader, index: int, bins: int = 0) -> RoundScores:
    """Statistics (and, with `bins`, histograms over common edges) of round `index`'s scores."""
    attrs = next(r for r in reader.rounds() if r["index"] == index)
    config = load_config_text(reader.config_yaml, f"{reader.path}:/config")
    source = _scored_weights(reader, config, index)
    result = RoundScores(index, attrs["criterion"], attrs["threshold"], source)
    if config.prune.granularity != "weight":
        result.unavailable = f"granularity {config.prune.granularity} scores whole channels, not single weights"
        return result
    if needs_calibration(attrs["criterion"]):
        result.unavailable = f"criterion {attrs['criterion']} scores with calibration data, which the archive does not keep"
        return result
    if source is None or not Path(source).is_file():
        result.unavailable = f"the weights round {index} scored are not beside the archive ({source or 'not recorded'})"
        return result
    # Rules that decide by rows or groups, and protected layers, keep weights below the round's threshold.
    check = attrs["rule"] in CHECKED_RULES
    bound = attrs["threshold"] if check and not config.prune.min_density else None
    specs = _specs(reader, index)
    scores = LazyScores(attrs["criterion"], specs, CheckpointWeights(source), ScoreContext(seed=config.seed),
                        previous=reader.read_packed_masks(index - 1) if index > 1 else None)
    for spec, scored, kept in _scored(reader, index, specs, scores):
        result.tensors.append(_statistics(spec.name, scored, kept, check, bound))
    if bins:
        result.edges = _edges(result.tensors, bins)
        for tensor, (_, scored, _) in zip(result.tensors, _scored(reader, index, specs, scores)):
            tensor.histogram = np.histogram(scored[torch.isfinite(scored)].numpy(), bins=result.edges)[0].tolist()
    return result


def _scored_weights(reader: ArchiveReader, config: RunConfig, index: int) -> str | None:
    """The safetensors file holding the weights round `index` scored."""
    if config.model.name == CHECKPOINT_MODEL:
        return config.model.checkpoint
    if index == 1:
        return (reader.dense or {}).get("state_file")
    previous = [r for r in reader.rounds() if r["index"] == index - 1]
    return previous[0]["state_file"] if previous else None


def _specs(reader: ArchiveReader, index: int) -> list[TensorSpec]:
    """The round's tensors in plan order (the order of its per-layer table), numbered as the plan did."""
    shapes = reader.shapes()
    return [TensorSpec(position, layer["name"], shapes[layer["name"]]) for position, layer in enumerate(reader.layers(index))]


def _scored(reader: ArchiveReader, index: int, specs: list[TensorSpec],
            scores: LazyScores) -> Iterator[tuple[TensorSpec, torch.Tensor, torch.Tensor]]:
    """(spec, flat scores, flat kept bits) one tensor at a time; the scores live until the next step."""
    for spec, (_, packed, _) in zip(specs, reader.iter_packed_masks(index)):
        kept = torch.from_numpy(np.unpackbits(packed, count=spec.numel, bitorder="big").astype(bool))
        yield spec, scores[spec.name].reshape(-1), kept


def _statistics(name: str, scored: torch.Tensor, kept: torch.Tensor, check: bool, threshold: float | None) -> TensorScores:
    alive = torch.isfinite(scored)
    values = scored[alive].double()
    pruned_alive, kept_scores = scored[alive & ~kept], scored[kept]
    max_pruned = float(pruned_alive.max()) if pruned_alive.numel() else None
    min_kept = float(kept_scores.min()) if kept_scores.numel() else None
    bounds = [value for value in (max_pruned, threshold, min_kept) if value is not None]
    empty = not values.numel()
    return TensorScores(
        name=name, alive=int(values.numel()),
        min=None if empty else float(values.min()), mean=None if empty else float(values.mean()),
        std=None if empty else float(values.std(unbiased=False)), max=None if empty else float(values.max()),
        max_pruned=max_pruned, min_kept=min_kept,
        consistent=all(low <= high for low, high in zip(bounds, bounds[1:])) if check else None,
    )


def _edges(tensors: list[TensorScores], bins: int) -> list[float]:
    low = min((t.min for t in tensors if t.min is not None), default=0.0)
    high = max((t.max for t in tensors if t.max is not None), default=1.0)
    if not high > low:  # one value everywhere: give the bins a width
        high = low + max(abs(low), 1.0) * 1e-3
    return np.linspace(low, high, bins + 1).tolist()
