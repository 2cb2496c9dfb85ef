"""The export formats: how each one writes a round's model into safetensors tensors, and reads it back.

    hpcprune export runs/quickstart.h5 --format sparse --out model.sparse.safetensors

    masked   the state dict with pruned weights 0.0
    compact  silent channels and neurons cut out: a smaller dense model (`hpcprune.deploy.compact`)
    sparse   masked tensors as bitmask + kept values or CSR (`hpcprune.deploy.sparse`)
    int8     dynamic int8 quantization of the masked or compacted model (`hpcprune.deploy.quantize`)

Every file's metadata (`hpcprune.export`, JSON) says how to rebuild the model, so `load_exported`
needs nothing pickled. Adding a format is one `Exporter` in `EXPORTERS`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from hpcprune.config import CHECKPOINT_MODEL
from hpcprune.deploy.compact import compact_model, compaction_groups, rebuild
from hpcprune.deploy.quantize import (
    float_state_of,
    int8_tensors,
    quantize_int8,
    restore_int8,
)
from hpcprune.deploy.round_model import RoundModel, build_architecture
from hpcprune.deploy.sparse import decode_sparse, encode_sparse, encoding_counts
from hpcprune.errors import UsageError

METADATA_KEY = "hpcprune.export"
FOLDER_FORMAT = "hf"  # the one format that is a folder, not a file (hpcprune.deploy.hf_folder)
INT8_BASES = ("masked", "compact")


@dataclass
class Artefact:
    """What a format writes: tensors plus the metadata that says how to read them."""

    tensors: dict[str, torch.Tensor]
    details: dict[str, Any] = field(default_factory=dict)  # format-specific, into the file's metadata
    extra_metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Exporter:
    build: Callable[[RoundModel, str], Artefact]
    load: Callable[[dict[str, torch.Tensor], dict[str, str], dict[str, Any]], "Loaded"]
    needs_module: bool


@dataclass
class Loaded:
    """An export read back: the model (None for a checkpoint archive) and/or its dense tensors."""

    model: nn.Module | None
    state: dict[str, torch.Tensor]
    metadata: dict[str, Any]


def _build_masked(job: RoundModel, int8_base: str) -> Artefact:
    return Artefact(dict(job.state))


def _load_masked(tensors, raw_metadata, metadata) -> Loaded:
    return Loaded(_model_with(metadata, tensors), tensors, metadata)


def _build_sparse(job: RoundModel, int8_base: str) -> Artefact:
    tensors, extra = encode_sparse(job.state, job.masks)
    return Artefact(tensors, {"encodings": encoding_counts(extra)}, extra)


def _load_sparse(tensors, raw_metadata, metadata) -> Loaded:
    state = decode_sparse(tensors, raw_metadata)
    return Loaded(_model_with(metadata, state), state, metadata)


def _build_compact(job: RoundModel, int8_base: str) -> Artefact:
    compaction = compact_model(_copy(job.model), compaction_groups(job.model))
    return Artefact(dict(compaction.model.state_dict()), {
        "module_sizes": compaction.module_sizes,
        "channels": [{"group": name, "kept": kept, "of": total} for name, kept, total in compaction.channels],
    })


def _load_compact(tensors, raw_metadata, metadata) -> Loaded:
    model = rebuild(build_architecture(metadata["architecture"]), metadata["details"]["module_sizes"], tensors)
    return Loaded(model.eval(), tensors, metadata)


def _build_int8(job: RoundModel, int8_base: str) -> Artefact:
    base = EXPORTERS[int8_base].build(job, int8_base)
    float_model = _model_with({"architecture": job.architecture, "details": base.details}, base.tensors, int8_base)
    quantized = quantize_int8(float_model)
    return Artefact(int8_tensors(quantized, base.tensors), {**base.details, "base": int8_base})


def _load_int8(tensors, raw_metadata, metadata) -> Loaded:
    base = metadata["details"]["base"]
    float_model = _model_with(metadata, float_state_of(tensors), base)
    return Loaded(restore_int8(float_model, tensors), tensors, metadata)


def _model_with(metadata: Mapping[str, Any], state: Mapping[str, torch.Tensor], base: str = "masked") -> nn.Module | None:
    """The float model of an export: the recorded architecture (compacted when `base` is) with `state`."""
    architecture = metadata["architecture"]
    if architecture["name"] == CHECKPOINT_MODEL:
        return None
    model = build_architecture(architecture)
    if base == "compact":
        return rebuild(model, metadata["details"]["module_sizes"], state).eval()
    model.load_state_dict(state, strict=True)
    return model.eval()


# Adding a format is one entry here (and its build/load pair above).
EXPORTERS: dict[str, Exporter] = {
    "masked": Exporter(_build_masked, _load_masked, needs_module=False),
    "compact": Exporter(_build_compact, _load_compact, needs_module=True),
    "sparse": Exporter(_build_sparse, _load_sparse, needs_module=False),
    "int8": Exporter(_build_int8, _load_int8, needs_module=True),
}


def load_exported(path: str | Path) -> Loaded:
    """Read any export: the rebuilt model (eval mode, CPU) and its tensors; nothing is unpickled."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            raw_metadata = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()}
    except (SafetensorError, OSError) as error:
        raise UsageError(f"{path}: not a readable export ({error})") from None
    if METADATA_KEY not in raw_metadata:
        raise UsageError(f"{path}: not an hpcprune export (no '{METADATA_KEY}' metadata)")
    metadata = json.loads(raw_metadata[METADATA_KEY])
    return exporter(metadata["format"]).load(tensors, raw_metadata, metadata)


def exported_model(path: str) -> nn.Module:
    """A model builder for `model.name: hpcprune.deploy.export:exported_model` with `model.kwargs.path`."""
    model = load_exported(path).model
    if model is None:
        raise UsageError(f"{path}: exported from a checkpoint archive, it holds tensors but no model")
    return model


def exporter(fmt: str) -> Exporter:
    if fmt not in EXPORTERS:
        raise UsageError(f"--format {fmt!r}: unknown format; expected one of {', '.join([*EXPORTERS, FOLDER_FORMAT])}")
    return EXPORTERS[fmt]


def _copy(model: nn.Module) -> nn.Module:
    """A copy to compact (compaction changes its model in place; int8 still needs the masked one)."""
    return copy.deepcopy(model)
