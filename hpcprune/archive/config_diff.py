"""Configs compared key by key: what a resume must match (and its world size), and what `inspect diff` shows.

    hpcprune prune --config configs/quickstart.yaml --resume --set prune.sparsity=0.8   # names prune.sparsity
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from hpcprune.config import load_config_text
from hpcprune.errors import UsageError

# Keys that may change between the original run and its resume without changing the results.
RESUME_IGNORED_KEYS = ("output.path", "progress")


def yaml_tree(text: str) -> dict[str, Any]:
    tree = yaml.safe_load(text) or {}
    return tree if isinstance(tree, dict) else {}


def resolved_tree(text: str) -> dict[str, Any]:
    """A stored config as this version resolves it: keys added since it was written take their
    defaults, so an archive written before a new key still resumes under the same settings."""
    try:
        return load_config_text(text, "<archive>").model_dump(mode="json")
    except UsageError:  # a key this version no longer knows: compare as stored, and say which differs
        return yaml_tree(text)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def first_difference(stored: dict[str, Any], given: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first dotted key (in the stored config's order) whose value differs, with both values."""
    missing = object()
    for key in [*stored, *(key for key in given if key not in stored)]:
        if key in RESUME_IGNORED_KEYS:
            continue
        old, new = stored.get(key, missing), given.get(key, missing)
        if old != new:
            return key, None if old is missing else old, None if new is missing else new
    return None


def check_world_size(path: Path, config_yaml: str, stored: int, world_size: int) -> None:
    """Masks do not depend on the world size, but training does (each rank trains on its own batches),
    so a run that trains resumes only on the world size it trained on."""
    config = flatten(yaml_tree(config_yaml))
    trains = config.get("finetune.epochs", 0) or (config.get("pretrain.epochs", 0) and not config.get("model.checkpoint"))
    if stored != world_size and trains:
        raise UsageError(f"{path}: cannot resume on {world_size} rank(s) a run that trains on {stored}: the training "
                         f"batches, and so the weights and masks, would differ; resume with {stored} rank(s) or pass --force")
