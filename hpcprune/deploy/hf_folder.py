"""`--format hf`: a pruned round as a Hugging Face folder that the model's own class loads.

    hpcprune export runs/llm.h5 --format hf --out pruned-smollm2/
    python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('pruned-smollm2')"

The archive's model is `model.name: hf:<folder>`. The export is that folder with its weights pruned:
every file of it that is not weights (config.json, generation_config.json, the tokenizer's files,
a chat template, a README) is copied as it is, and the weights are written as safetensors shards
`model-0000i-of-0000n.safetensors`, one per weight file of the original folder (a single
model.safetensors becomes one shard) with the same tensors, plus model.safetensors.index.json.
Each tensor is, in its stored dtype:

    the block's updated weights, when a block-sequential method changed them (the `weights_file`
        of the round's /blocks table; cast to the stored dtype if the file holds another);
    else the original folder's tensor;
    and where the round has a mask of that name, its pruned positions set to exactly 0.0.

Tensors are read, masked and written one at a time (`hpcprune.models.safetensors_stream`), a mask
is read from the archive only when its tensor is written: memory holds one tensor and its mask,
never the model. Every file goes through hpcprune.archive.atomic; the index is written after the
shards. Before anything is written, the whole export is planned from the files' headers and the
masks' shapes, so what cannot be exported (not an `hf:` run, the folder gone or without safetensors,
a mask or an update naming a tensor the folder does not store or of another shape, an existing
--out without --force) is refused in one line and leaves nothing behind.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from hpcprune import registry
from hpcprune.archive.atomic import refuse_own_input, replace_atomically
from hpcprune.archive.reader import ArchiveReader, complete_round, open_archive
from hpcprune.config import load_config_text
from hpcprune.deploy.formats import FOLDER_FORMAT
from hpcprune.deploy.measure import NOT_MEASURED, ExportReport
from hpcprune.errors import UsageError
from hpcprune.models.safetensors_stream import TORCH_DTYPES, TensorSpec, write_streamed

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
"""Files of a folder that hold (or index) weights: written anew or left out, never copied."""
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


@dataclass
class FolderPlan:
    """Everything an export will write, decided from headers and mask shapes before anything is written."""

    reader: ArchiveReader
    round: int
    folder: Path
    shards: list[tuple[Path, list[TensorSpec]]]  # per original weight file: its tensors, in its order
    updated: dict[str, Path]  # tensor -> the block weights file that holds its new values
    masked: dict[str, tuple[int, ...]]  # tensor -> mask shape
    copied: list[Path]  # the folder's files that are not weights
    recorded_accuracy: float = math.nan
    stale: list[Path] = field(default_factory=list)  # weight files of an earlier export in --out

    @property
    def shard_names(self) -> list[str]:
        count = len(self.shards)
        return [f"model-{number:05d}-of-{count:05d}.safetensors" for number in range(1, count + 1)]


def plan_folder_export(archive: str | Path, out: Path, round_index: int | None, force: bool) -> FolderPlan:
    """Check everything the export needs; UsageError (nothing written) for what cannot be exported."""
    reader = open_archive(archive)
    attrs = complete_round(reader, round_index)
    folder = _model_folder(reader)
    _check_out(out, force)
    refuse_own_input(out, folders=[folder])  # the run's model folder, which the export reads
    sources = _weight_files(folder)
    shards = [(source, _specs(source)) for source in sources]
    stored = {spec.name: spec for _, specs in shards for spec in specs}
    masked = reader.mask_shapes(attrs["index"])
    for name, shape in masked.items():
        _check_stored(stored, name, shape, f"round {attrs['index']} has a mask of {name!r}", folder)
    updated = _updated_weights(reader, attrs["index"], stored, folder)
    copied = sorted(path for path in folder.iterdir() if path.is_file() and not _is_weights(path)
                    and not path.name.startswith("."))
    stale = [path for path in out.iterdir() if _is_weights(path)] if out.is_dir() else []
    return FolderPlan(reader, attrs["index"], folder, shards, updated, masked, copied,
                      float(attrs.get("accuracy", math.nan)), stale)


def write_folder(plan: FolderPlan, out: Path) -> None:
    """Write the planned folder: shards tensor by tensor, then the index, the copied files, stale ones removed."""
    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total = 0

    def make(spec: TensorSpec, source: Path) -> torch.Tensor:
        tensor = read_tensor(plan.updated.get(spec.name, source), spec.name).to(spec.dtype)
        if spec.name in plan.masked:
            tensor = tensor.masked_fill(~plan.reader.read_mask(plan.round, spec.name), 0)
        return tensor

    for (source, specs), shard in zip(plan.shards, plan.shard_names):
        total += write_streamed(out / shard, specs, lambda spec, source=source: make(spec, source), {"format": "pt"})
        weight_map.update((spec.name, shard) for spec in specs)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with replace_atomically(out / INDEX) as temporary:
        temporary.write_text(json.dumps(index, indent=2) + "\n")
    for path in plan.copied:
        with replace_atomically(out / path.name) as temporary:
            shutil.copyfile(path, temporary)
    for path in plan.stale:  # a model.safetensors left there would be loaded instead of the index
        if path.name not in (*plan.shard_names, INDEX):
            path.unlink()


def export_folder(archive: str | Path, out: Path, round_index: int | None, force: bool) -> ExportReport:
    """Plan, write and measure `--format hf` (see the module docstring)."""
    plan = plan_folder_export(archive, out, round_index, force)
    write_folder(plan, out)
    details = {"folder": str(plan.folder.absolute()), "shards": len(plan.shards), "masked_tensors": len(plan.masked),
               "updated_tensors": len(plan.updated), "copied": [path.name for path in plan.copied]}
    return ExportReport(FOLDER_FORMAT, plan.round, str(out), **measure_folder(out, plan), flops=math.nan,
                        nonzero_flops=math.nan, accuracy=math.nan, recorded_accuracy=plan.recorded_accuracy,
                        details=details, not_measured=NOT_MEASURED)


def measure_folder(out: Path, plan: FolderPlan) -> dict[str, int]:
    """Figures of the folder as written, read back shard by shard: stored and nonzero parameters, bytes."""
    parameters = nonzero = 0
    for (_, specs), shard in zip(plan.shards, plan.shard_names):
        for spec in specs:
            tensor = read_tensor(out / shard, spec.name)
            if tensor.is_floating_point():
                parameters += tensor.numel()
                nonzero += int(tensor.count_nonzero())
    return {"parameters": parameters, "nonzero_parameters": nonzero,
            "bytes": sum((out / shard).stat().st_size for shard in plan.shard_names),
            "dense_bytes": sum(spec.nbytes for _, specs in plan.shards for spec in specs)}


def read_tensor(path: Path, name: str) -> torch.Tensor:
    """One tensor of a safetensors file, the file mapped only while it is read: a file kept open would
    keep every page read from it resident, and a shard of a large model is gigabytes."""
    with safe_open(str(path), framework="pt", device="cpu") as file:
        return file.get_tensor(name)


# --- planning ------------------------------------------------------------------------------------


def _model_folder(reader: ArchiveReader) -> Path:
    name = load_config_text(reader.config_yaml, f"{reader.path}:/config").model.name
    if not name.startswith(registry.HF_PREFIX):
        raise UsageError(f"--format hf: {reader.path} was run on model.name {name!r}, not on a Hugging Face "
                         f"folder (model.name {registry.HF_PREFIX}<folder>)")
    folder = Path(name.removeprefix(registry.HF_PREFIX))
    if not (folder / "config.json").is_file():
        raise UsageError(f"--format hf: the run's model folder {folder} has no config.json (moved or deleted?); "
                         f"the export copies it and reads the weights that were not changed from it")
    return folder


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is a file; --format hf writes a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"--out {out}: exists and is not empty; pass --force to overwrite it")
    parent = out if out.is_dir() else out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"--out {out}: cannot write there ({parent} is not a folder)")


def _weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors files: those its index names (sorted), or its one model.safetensors."""
    if (folder / INDEX).is_file():
        try:
            names = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise UsageError(f"--format hf: {folder / INDEX} is not a readable index ({error})") from None
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            raise UsageError(f"--format hf: {folder} lacks {missing[0]}, which its {INDEX} names")
        return [folder / name for name in names]
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    raise UsageError(f"--format hf: {folder} has no safetensors weights ({SINGLE} or {INDEX})")


def _specs(path: Path) -> list[TensorSpec]:
    """Name, stored dtype and shape of each tensor of a safetensors file, from its header alone."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            slices = [(name, file.get_slice(name)) for name in file.keys()]
            found = [(name, piece.get_dtype(), tuple(piece.get_shape())) for name, piece in slices]
    except (SafetensorError, OSError) as error:
        raise UsageError(f"--format hf: {path} is not a readable safetensors file ({error})") from None
    unknown = [(name, dtype) for name, dtype, _ in found if dtype not in TORCH_DTYPES]
    if unknown:
        raise UsageError(f"--format hf: {path}: tensor {unknown[0][0]} has dtype {unknown[0][1]}, which the export "
                         f"cannot write")
    return [TensorSpec(name, TORCH_DTYPES[dtype], shape) for name, dtype, shape in found]


def _check_stored(stored: Mapping[str, TensorSpec], name: str, shape: tuple[int, ...], what: str, folder: Path) -> None:
    if name not in stored:
        raise UsageError(f"--format hf: {what}, which {folder} does not store (a tied or renamed tensor?)")
    if stored[name].shape != tuple(shape):
        raise UsageError(f"--format hf: {what} of shape {tuple(shape)}, but {folder} stores it as {stored[name].shape}")


def _updated_weights(reader: ArchiveReader, index: int, stored: Mapping[str, TensorSpec], folder: Path) -> dict[str, Path]:
    """tensor -> the block weights file with its new values, from the round's /blocks table."""
    updated: dict[str, Path] = {}
    for row in reader.blocks(index):
        path = row["weights_file"]
        if path is None:
            continue
        what = f"round {index}, block {row['block']}: weights file {path}"
        if not Path(path).is_file():
            raise UsageError(f"--format hf: {what} is missing")
        for spec in _specs(Path(path)):
            _check_stored(stored, spec.name, spec.shape, f"{what} holds {spec.name!r}", folder)
            if spec.name in updated:
                raise UsageError(f"--format hf: {what} updates {spec.name!r}, which {updated[spec.name]} updates too")
            updated[spec.name] = Path(path)
    return updated


def _is_weights(path: Path) -> bool:
    return path.name.endswith(WEIGHT_SUFFIXES) or bool(SHARD_NAME.fullmatch(path.name))
