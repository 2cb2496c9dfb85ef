"""What one run carries from stage to stage: the `Job`, and the `RunResult` it ends with.

    hpcprune prune --config configs/quickstart.yaml     # one Job per rank

Built by `hpcprune.run.pipeline` (a module and its data, or a checkpoint on disk), read and updated
by the stages in `hpcprune.run.rounds` and `hpcprune.run.resume`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hpcprune.archive.side_files import SideFiles
from hpcprune.config import RunConfig
from hpcprune.dist.world import World
from hpcprune.models.data import Splits
from hpcprune.models.weights import Weights
from hpcprune.prune.channels import ChannelPruning
from hpcprune.prune.plan import Plan
from hpcprune.train.checkpoint import SavedTraining

# tensor name -> np.packbits of the flat bool mask (True = keep); a rank's own masks may be kept on
# disk and read one at a time (hpcprune.prune.mask_store), so read them by name, never copy them all
PackedMasks = Mapping[str, np.ndarray]


@dataclass
class RunResult:
    archive: str
    dense_accuracy: float  # NaN without a model to evaluate
    final_accuracy: float
    target_sparsity: float
    achieved_sparsity: float
    kept: int
    total: int
    model: nn.Module | None  # the pruned, fine-tuned model (plain module, masks applied)
    target_unit: str = "weights"  # what target_sparsity counts: weights, or channels (prune.granularity)
    eval_metric: str | None = None  # schedule sequential: "perplexity" or "cosine" on eval.text (None: accuracy)
    eval_dense: float = math.nan
    eval_pruned: float = math.nan


@dataclass
class Job:
    """What every stage of one run needs."""

    config: RunConfig
    world: World
    path: Path  # the archive
    device: torch.device
    plan: Plan
    weights: Weights
    model: nn.Module | None = None  # None: masks only, from a checkpoint on disk
    splits: Splits | None = None
    masks: PackedMasks = field(default_factory=dict)  # every tensor's (module) or this rank's (checkpoint)
    channels: ChannelPruning | None = None  # prune.granularity channel: the model's channel groups
    saved_training: SavedTraining | None = None  # where an interrupted training stage continues
    side: SideFiles | None = None  # the run's states and masks folders, once the archive is held (every rank)

