"""One round of an archive rebuilt as a model: the architecture from /config, the weights from the
round's state file, the masks from the round.

    hpcprune export runs/quickstart.h5 --format masked --out model.safetensors   # starts here
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hpcprune import registry
from hpcprune.archive.reader import complete_round, open_archive
from hpcprune.config import CHECKPOINT_MODEL, ModelConfig, RunConfig, load_config_text
from hpcprune.errors import UsageError
from hpcprune.models.builders import build_model, load_checkpoint, load_state_file
from hpcprune.models.data import INPUT_SHAPE, NUM_CLASSES, Splits, load_data
from hpcprune.prune.masks import apply_masks


@dataclass
class RoundModel:
    """One round of a run, rebuilt: what every format starts from."""

    archive: Path
    round: int
    config: RunConfig
    masks: dict[str, torch.Tensor]
    state: dict[str, torch.Tensor]  # masked: pruned weights 0.0
    model: nn.Module | None  # the masked model; None for a checkpoint archive
    architecture: dict[str, Any]  # what build_model needs, as JSON
    recorded_accuracy: float  # the round's accuracy as the archive recorded it
    splits: Splits | None = None
    data_problem: str = ""  # why there is no accuracy, when the data cannot be loaded


def load_round(archive: str | Path, round_index: int | None = None) -> RoundModel:
    """The round's masked model (or tensors, for a checkpoint archive), its masks and the run's data."""
    reader = open_archive(archive)
    attrs = complete_round(reader, round_index)
    config = load_config_text(reader.config_yaml, f"{reader.path}:/config")
    masks = reader.read_masks(attrs["index"])
    common = dict(archive=reader.path, round=attrs["index"], config=config, masks=masks,
                  recorded_accuracy=float(attrs.get("accuracy", math.nan)))
    if config.model.name == CHECKPOINT_MODEL:
        state = load_state_file(config.model.checkpoint)
        _mask_state(state, masks)
        return RoundModel(state=state, model=None, architecture={"name": CHECKPOINT_MODEL}, **common)
    # A Hugging Face model reads text: the run's image data is neither loaded nor missed.
    splits, problem = (None, "") if config.model.name.startswith(registry.HF_PREFIX) else _try_data(config)
    architecture = {
        "name": config.model.name, "kwargs": dict(config.model.kwargs),
        "input_shape": list(splits.input_shape if splits else INPUT_SHAPE),
        "num_classes": splits.num_classes if splits else NUM_CLASSES,
    }
    model = build_architecture(architecture)
    if not attrs.get("state_file"):
        raise UsageError(f"{reader.path}: round {attrs['index']} has no state file to export")
    load_checkpoint(model, attrs["state_file"])
    apply_masks(model, masks)
    model.eval()
    return RoundModel(state=dict(model.state_dict()), model=model, architecture=architecture,
                      splits=splits, data_problem=problem, **common)


def build_architecture(architecture: Mapping[str, Any]) -> nn.Module:
    """A fresh model from the architecture recorded in an export (name, kwargs, input shape, classes)."""
    config = ModelConfig(name=architecture["name"], kwargs=architecture.get("kwargs", {}))
    return build_model(config, in_channels=architecture["input_shape"][0], num_classes=architecture["num_classes"])


def _try_data(config: RunConfig) -> tuple[Splits | None, str]:
    try:
        return load_data(config.data, config.seed), ""
    except UsageError as error:  # the model still exports; only its accuracy is missing
        return None, str(error)


def _mask_state(state: dict[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
    for name, mask in masks.items():
        if name not in state:
            raise UsageError(f"checkpoint has no tensor {name!r}, which the archive's masks name")
        state[name] = state[name].masked_fill(~mask, 0.0)
