"""Export: turn one round of an archive into a file a user deploys, and measure what it saves.

    hpcprune export runs/quickstart.h5 --format sparse --out runs/quickstart.sparse.safetensors
    hpcprune export runs/structured.h5 --round 2 --format compact --out model.safetensors

The round's model is rebuilt from the archive: the architecture from /config (the model registry),
the weights from the round's state file, the masks from the round. Every format is one safetensors
file whose metadata (`hpcprune.export`, JSON) says how to rebuild the model, so `load_exported`
needs nothing pickled:

    masked   the state dict with pruned weights 0.0
    compact  silent channels and neurons cut out: a smaller dense model (`hpcprune.compact`)
    sparse   masked tensors as bitmask + kept values or CSR (`hpcprune.sparse_format`)
    int8     dynamic int8 quantization of the masked or compacted model (`hpcprune.quantize`)

After writing, the file is loaded back and measured: parameters (stored and nonzero), bytes on disk,
FLOPs per sample, and test accuracy when the run's data is available. The figures are printed and
appended to the archive as /exports/<NNNN>. An archive of `model.name: checkpoint` has no module:
it exports masked and sparse only.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from hpcprune.archive import Archive
from hpcprune.archive_reader import open_archive
from hpcprune.compact import ChannelGroup, compact_model, rebuild
from hpcprune.config import CHECKPOINT_MODEL, ModelConfig, RunConfig, load_config_text
from hpcprune.data import INPUT_SHAPE, NUM_CLASSES, Splits, load_data
from hpcprune.errors import UsageError
from hpcprune.finetune import evaluate
from hpcprune.inspect import complete_round
from hpcprune.masks import apply_masks
from hpcprune.models import build_model, load_checkpoint, load_state_file
from hpcprune.quantize import float_state_of, int8_parameters, int8_tensors, quantize_int8, restore_int8
from hpcprune.sparse_format import decode_sparse, encode_sparse, encoding_counts
from hpcprune.world import SingleWorld

log = logging.getLogger("hpcprune")

METADATA_KEY = "hpcprune.export"
INT8_BASES = ("masked", "compact")


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


@dataclass
class Artefact:
    """What a format writes: tensors plus the metadata that says how to read them."""

    tensors: dict[str, torch.Tensor]
    details: dict[str, Any] = field(default_factory=dict)  # format-specific, into the file's metadata
    extra_metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class ExportReport:
    format: str
    round: int
    path: str
    parameters: int  # elements of the stored model's parameters (int8 weights included)
    nonzero_parameters: int
    bytes: int  # the file on disk
    dense_bytes: int  # the round's full dense state as float tensors, for comparison
    flops: float  # per sample, 2 x multiply-accumulates of Conv2d and Linear; NaN without a module
    nonzero_flops: float  # the same, counting only nonzero weights
    accuracy: float  # test accuracy of the exported model as loaded back; NaN without data
    recorded_accuracy: float
    details: dict[str, Any] = field(default_factory=dict)

    def render(self) -> str:
        def ratio(part: float, whole: float) -> str:
            return f"{part / whole:.3f}x" if whole and not math.isnan(part) else "n/a"

        missing = "no module" if math.isnan(self.flops) else "no data"
        accuracy = f"n/a ({missing})" if math.isnan(self.accuracy) else f"{100 * self.accuracy:.2f} %"
        recorded = "" if math.isnan(self.recorded_accuracy) else f" (round {self.round} recorded {100 * self.recorded_accuracy:.2f} %)"
        flops = "n/a (no module)" if math.isnan(self.flops) else f"{self.flops:,.0f} per sample, {self.nonzero_flops:,.0f} with nonzero weights"
        return (
            f"export     {self.path} ({self.format}, round {self.round})\n"
            f"parameters {self.parameters:,} stored, {self.nonzero_parameters:,} nonzero\n"
            f"bytes      {self.bytes:,} on disk ({ratio(self.bytes, self.dense_bytes)} the dense {self.dense_bytes:,})\n"
            f"flops      {flops}\n"
            f"accuracy   {accuracy}{recorded}"
        )


# --- the command -----------------------------------------------------------------------------


def export(archive: str | Path, *, fmt: str, out: str | Path, round_index: int | None = None,
           force: bool = False, int8_base: str = "masked", record: bool = True) -> ExportReport:
    """Write round `round_index` (default: the last complete one) of `archive` as `fmt` to `out`."""
    exporter = _exporter(fmt)
    if int8_base not in INT8_BASES:
        raise UsageError(f"--int8-base {int8_base!r}: expected one of {', '.join(INT8_BASES)}")
    out = _check_out(Path(out), force)
    job = load_round(archive, round_index)
    if exporter.needs_module and job.model is None:
        raise UsageError(f"--format {fmt}: {job.archive} was run on model.name '{CHECKPOINT_MODEL}' (no module); "
                         f"it exports as: {', '.join(name for name, e in EXPORTERS.items() if not e.needs_module)}")
    artefact = exporter.build(job, int8_base)
    _write(out, artefact, _metadata(job, fmt, artefact))
    report = measure(job, fmt, out, artefact.details)
    if record:
        Archive.at(job.archive).write_export(_export_attrs(report, out))
    return report


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
    splits, problem = _try_data(config)
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


# --- the formats -----------------------------------------------------------------------------


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
    compaction = compact_model(_copy(job.model), channel_groups(job))
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


def channel_groups(job: RoundModel) -> list[ChannelGroup]:
    """The model's channel groups, from the channel graph of `hpcprune.structure`."""
    try:
        from hpcprune import structure
    except ImportError:
        raise UsageError("--format compact needs the channel graph of hpcprune.structure, "
                         "which this installation lacks") from None
    return structure.compaction_groups(job.model, tuple(job.architecture["input_shape"]))


# --- reading an export back ------------------------------------------------------------------


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
    return _exporter(metadata["format"]).load(tensors, raw_metadata, metadata)


def exported_model(path: str) -> nn.Module:
    """A model builder for `model.name: hpcprune.export:exported_model` with `model.kwargs.path`."""
    model = load_exported(path).model
    if model is None:
        raise UsageError(f"{path}: exported from a checkpoint archive, it holds tensors but no model")
    return model


# --- measuring -------------------------------------------------------------------------------


def measure(job: RoundModel, fmt: str, out: Path, details: dict[str, Any]) -> ExportReport:
    """Figures of the export as written: loaded back from `out`, so the file itself is what is measured."""
    loaded = load_exported(out)
    model = loaded.model
    parameters, nonzero = _parameter_counts(model, loaded.state)
    flops, nonzero_flops = (math.nan, math.nan) if model is None else count_flops(model, job.architecture["input_shape"])
    accuracy = math.nan
    if model is not None and job.splits is not None:
        accuracy = evaluate(model, job.splits.test, world=SingleWorld(), device=torch.device("cpu"),
                            batch_size=job.config.data.eval_batch_size)[1]
    elif job.data_problem:
        log.warning("no accuracy for the export: %s", job.data_problem)
    dense_bytes = sum(tensor.nbytes for tensor in job.state.values())
    return ExportReport(fmt, job.round, str(out), parameters, nonzero, out.stat().st_size, dense_bytes,
                        flops, nonzero_flops, accuracy, job.recorded_accuracy, details)


def _parameter_counts(model: nn.Module | None, state: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(stored, nonzero) parameter elements; int8 weights count as parameters too."""
    if model is None:
        tensors = [tensor for tensor in state.values() if tensor.is_floating_point()]
    else:
        tensors = [param.detach() for param in model.parameters()]
        tensors += [tensor for module in model.modules() for tensor in int8_parameters(module)]
    return sum(t.numel() for t in tensors), sum(int(t.count_nonzero()) for t in tensors)


@torch.no_grad()
def count_flops(model: nn.Module, input_shape) -> tuple[float, float]:
    """(FLOPs, FLOPs of nonzero weights) of one sample: 2 per multiply-accumulate of Conv2d and Linear."""
    totals = [0.0, 0.0]

    def weight_of(module: nn.Module) -> torch.Tensor | None:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            return module.weight
        quantized = int8_parameters(module)
        return quantized[0] if quantized else None

    def count(module: nn.Module, inputs, output) -> None:
        weight = weight_of(module)
        # Each weight is used once per output position: per pixel for a conv, once for a Linear.
        positions = output[0, 0].numel() if isinstance(module, nn.Conv2d) else output.numel() // output.shape[-1]
        totals[0] += 2.0 * weight.numel() * positions
        totals[1] += 2.0 * int(weight.count_nonzero()) * positions

    hooks = [module.register_forward_hook(count) for module in model.modules() if weight_of(module) is not None]
    try:
        model.eval()(torch.zeros(1, *input_shape))
    finally:
        for hook in hooks:
            hook.remove()
    return totals[0], totals[1]


# --- helpers ---------------------------------------------------------------------------------


def _exporter(fmt: str) -> Exporter:
    if fmt not in EXPORTERS:
        raise UsageError(f"--format {fmt!r}: unknown format; expected one of {', '.join(EXPORTERS)}")
    return EXPORTERS[fmt]


def _check_out(out: Path, force: bool) -> Path:
    """Refuse an output that would overwrite without --force or cannot be written, before any work."""
    if out.is_dir():
        raise UsageError(f"--out {out}: is a directory; name the file to write")
    if out.exists() and not force:
        raise UsageError(f"--out {out}: exists; pass --force to overwrite it")
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise UsageError(f"--out {out}: cannot write there ({folder} is not a writable folder)")
    return out


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


def _copy(model: nn.Module) -> nn.Module:
    """A copy to compact (compaction changes its model in place; int8 still needs the masked one)."""
    return copy.deepcopy(model)


def _metadata(job: RoundModel, fmt: str, artefact: Artefact) -> dict[str, str]:
    description = {"format": fmt, "archive": str(job.archive), "round": job.round,
                   "architecture": job.architecture, "details": artefact.details}
    return {"format": "pt", METADATA_KEY: json.dumps(description), **artefact.extra_metadata}


def _write(out: Path, artefact: Artefact, metadata: dict[str, str]) -> None:
    """Write atomically: a reader (or a failed export) leaves the old file or the complete new one."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    except OSError as error:
        raise UsageError(f"--out {out}: cannot write there ({error.strerror or error})") from None
    os.close(handle)
    try:
        save_file({name: tensor.contiguous() for name, tensor in artefact.tensors.items()}, temporary, metadata=metadata)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp's 0600 is for the temporary only
        os.replace(temporary, out)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _export_attrs(report: ExportReport, out: Path) -> dict[str, Any]:
    attrs = asdict(report)
    attrs["details"] = json.dumps(attrs["details"])
    attrs["path"] = str(out.absolute())  # the archive stores it relative to its own folder
    return attrs
