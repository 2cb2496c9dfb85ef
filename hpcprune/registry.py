"""The names a config may use, for validation without importing the code behind them.

    hpcprune prune --set prune.criterion=wanda     # checked against WEIGHT_CRITERIA here

`hpcprune.config` sits below every floor that implements these names (criteria and rules need torch,
backends need submitit or dask), so it validates against these tuples instead of importing the
implementations. Each implementing table is checked against its tuple by tests/test_layers.py, so a
name added in one place and not the other fails the tests rather than a user's run.
"""

from __future__ import annotations

WEIGHT_CRITERIA = ("magnitude", "relative", "random", "taylor", "snip", "wanda", "lamp")
"""prune.criterion for prune.granularity weight (hpcprune.prune.scoring.CRITERIA)."""

CHANNEL_CRITERIA = ("l1", "l2")
"""prune.criterion for prune.granularity channel (hpcprune.prune.channels.CHANNEL_CRITERIA)."""

CRITERIA = {"weight": WEIGHT_CRITERIA, "channel": CHANNEL_CRITERIA}
"""What config accepts per granularity, read at validation time: code that adds a criterion of its
own to hpcprune.prune.scoring.CRITERIA adds its name here too."""

CALIBRATED_CRITERIA = ("taylor", "snip", "wanda")
"""Criteria that read statistics of the model over calibration data (hpcprune.prune.calibrate.NEEDS)."""

WEIGHT_RULES = ("global", "layer", "threshold", "row", "nm")
"""prune.rule for single weights (hpcprune.prune.rules.RULES)."""

CHANNEL_RULES = ("global", "layer", "threshold")
"""prune.rule for whole channels (hpcprune.prune.channels.CHANNEL_RULES)."""

SCHEDULES = ("oneshot", "iterative", "gradual", "sequential")
"""schedule.kind (hpcprune.prune.schedule.SCHEDULES)."""

SEQUENTIAL = "sequential"
"""schedule.kind of the block-sequential pipeline for large transformers (hpcprune.run.sequential)."""

BLOCK_CRITERIA = ("magnitude", "wanda", "sparsegpt")
"""prune.criterion under schedule.kind sequential (hpcprune.prune.sequential.methods.METHODS); a name
here and not in WEIGHT_CRITERIA exists only in that pipeline."""

BLOCK_CALIBRATED = ("wanda", "sparsegpt")
"""Block criteria that read statistics of the calibration windows (METHODS' `statistics` not empty)."""

BLOCK_ROW_DEFAULT = ("wanda", "sparsegpt")
"""Criteria whose prune.rule is `row` (the same sparsity in every output row) unless one is given."""

BLOCK_RULES = ("row", "layer", "nm")
"""prune.rule under schedule.kind sequential: rules that decide each layer alone, as blocks come."""

CHANNEL_SCHEDULES = ("oneshot", "iterative")
"""Schedules that select channels: once per round, between fine-tuning stages."""

IN_WORLD = "world"
"""fanout.backend of the ordinary path: selection in this process's own ranks, nothing fanned out."""

FANOUT_BACKENDS = {
    "inline": ("hpcprune.run.fanout:InlineBackend", None),
    "slurm-array": ("hpcprune.run.slurm_array:SlurmArray", "submitit"),
    "dask": ("hpcprune.run.dask_tasks:DaskWorkers", "distributed"),
}
"""fanout.backend other than IN_WORLD -> (class as "module:attribute", the package it needs);
imported only when chosen (hpcprune.run.fanout.open_backend)."""

EXTRAS = {"submitit": "slurm", "distributed": "dask"}
"""The pip extra of hpcprune that installs each optional package."""

CHECKPOINT_MODEL = "checkpoint"
"""model.name for masks only: no module, the weights are read from model.checkpoint tensor by tensor."""

HF_PREFIX = "hf:"
"""model.name prefix of a Hugging Face style folder (hpcprune.models.hf)."""


def needs_calibration(criterion: str) -> bool:
    return criterion in CALIBRATED_CRITERIA
