"""The settings of the block-sequential pipeline (`schedule.kind: sequential`) and what it refuses.

    hpcprune prune --config configs/llm_wanda.yaml --set sequential.threads=4

`sequential` says how the blocks are run (which activations feed the next block, how much of them a
rank keeps in memory, how many threads a rank computes with); `sparsegpt` holds the solve's settings
of `prune.criterion: sparsegpt`; `eval` (hpcprune.config.sections)
names the held-out text the run measures before and after pruning. `check_sequential` holds the
cross-section rules: what the pipeline cannot do is refused with one line before anything runs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from hpcprune import registry
from hpcprune.config.sections import Section


class SequentialConfig(Section):
    """schedule.kind sequential: one block of the model resident at a time (hpcprune.run.sequential)."""

    propagate: Literal["pruned", "dense"] = "pruned"
    """Inputs of block b+1: the outputs of block b once pruned (pruning errors carry on, as in SparseGPT),
    or of block b dense (every block is calibrated on the dense model's activations)."""
    activation_budget_mb: float = Field(1024.0, gt=0)
    """Per rank: activations of the rank's windows (calibration and evaluation) held in memory up to
    this many MiB; above it they are spilled to `<archive>.states/activations/rank-<r>/` (the run's states folder)."""
    window_group: int | None = Field(None, gt=0)
    """Calibration windows whose statistics a rank adds in float64 before they enter the exact sum
    (hpcprune.dist.exact_sum): group g, windows [g·n, (g+1)·n), goes whole to rank g mod world size.
    Each exact-sum term costs a few passes over a statistic as large as a layer's Hessian, so fewer,
    larger terms save time; ranks beyond the number of groups hold no calibration windows. None:
    4 windows a group from 64 windows on, fewer below, so there are at least 16 groups. Changing
    it may change masks (the float64 sums round differently); resume refuses a changed value."""
    errors: bool = True
    """Each layer's reconstruction error, measured on a second pass of the pruned block over the
    calibration windows (hpcprune.prune.sequential.reconstruction): on SmolLM2-135M (64 windows of
    256 tokens, one thread, 2-core AMD EPYC) 1-rank Wanda runs one after the other took 115 s with
    them and 92 s without. false leaves
    the errors out (NaN in the table) and runs the pruned block only where its outputs feed the next
    block; masks and weights are the same."""
    threads: int = Field(1, gt=0)
    """torch (and scipy BLAS) threads per rank. Fixed by the config, not by the core count, because a matrix product's
    last bits can depend on how many threads share it; the default 1 also keeps ranks on shared
    nodes from fighting over cores. Changing it may change masks; resume refuses a changed value."""


class SparseGPTConfig(Section):
    """prune.criterion sparsegpt (hpcprune.prune.sparsegpt): the OBS solve of each Linear layer."""

    damping: float = Field(0.01, ge=0, lt=1)
    """λ added to the Hessian's diagonal, as a fraction of its mean diagonal (the paper's 1 %): more
    damping when a layer's Hessian has no Cholesky factor (too few windows, nearly dead inputs)."""
    block_size: int = Field(128, gt=0)
    """Input columns solved together (lazy batches of updates, and the span over which rule row/layer
    chooses each mask adaptively); a multiple of prune.m for rule nm."""


def check_sequential(config) -> None:
    """The block-sequential pipeline's limits (`config` is a RunConfig); ValueError names the key."""
    kind = config.schedule.kind
    criterion = config.prune.criterion
    if kind != registry.SEQUENTIAL:
        if criterion not in registry.CRITERIA[config.prune.granularity]:
            raise ValueError(f"prune.criterion {criterion!r} runs only in the block-sequential pipeline: "
                             f"set schedule.kind: {registry.SEQUENTIAL}")
        return
    if not config.model.name.startswith(registry.HF_PREFIX):
        raise ValueError(f"schedule.kind {kind} prunes Hugging Face folders block by block: model.name must be "
                         f"hf:<folder>, not {config.model.name!r}")
    if config.pretrain.epochs or config.finetune.epochs:
        raise ValueError(f"schedule.kind {kind} prunes without training: set pretrain.epochs: 0 and finetune.epochs: 0")
    if config.fanout.backend != registry.IN_WORLD:
        raise ValueError(f"schedule.kind {kind} runs in this job's own ranks: fanout.backend must be "
                         f"{registry.IN_WORLD!r}, not {config.fanout.backend!r}")
    if config.prune.granularity != "weight":
        raise ValueError(f"schedule.kind {kind} prunes single weights: prune.granularity must be 'weight'")
    if criterion not in registry.BLOCK_CRITERIA:
        raise ValueError(f"schedule.kind {kind}: prune.criterion {criterion!r} is not one of its criteria "
                         f"({', '.join(registry.BLOCK_CRITERIA)})")
    if config.prune.rule not in registry.BLOCK_RULES:
        raise ValueError(f"schedule.kind {kind} decides each layer as its block comes: prune.rule must be one of "
                         f"{', '.join(registry.BLOCK_RULES)}, not {config.prune.rule!r}")
    if config.schedule.rewind_epoch is not None:
        raise ValueError(f"schedule.kind {kind} does not train: schedule.rewind_epoch must be left out")
    if criterion == "sparsegpt" and config.prune.rule == "nm" and config.sparsegpt.block_size % config.prune.m:
        raise ValueError(f"sparsegpt.block_size {config.sparsegpt.block_size} must be a multiple of prune.m "
                         f"{config.prune.m} (each n:m group is chosen within one block)")
    if criterion in registry.BLOCK_CALIBRATED and config.calibration.text is None:
        raise ValueError(f"prune.criterion {criterion!r} reads calibration windows: set calibration.text to a text file")
