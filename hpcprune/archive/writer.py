"""Step 10 — record: one HDF5 archive per run, written by rank 0 with plain (serial) h5py.

    hpcprune prune --config configs/quickstart.yaml      # writes runs/hpcprune.h5
    hpcprune inspect runs/hpcprune.h5                    # reads it back

Layout, format 1 (readable with plain h5py, h5dump or HDFView; nothing is pickled):

    /                      attrs format="hpcprune", format_version, hpcprune_version, created, world_size, backend, host
    /config                scalar string: the resolved config YAML
    /model                 attrs name, num_params; /model/params table (name, shape "300x784", numel, prunable)
    /dense                 attrs accuracy, loss, seconds, status, [state_file]; /dense/history table
    /rounds/<NNNN>/        attrs criterion, rule, target_sparsity, achieved_sparsity, threshold (nan: none),
                           kept, total, accuracy, loss, seconds_select, seconds_finetune, seconds_record, seconds_write,
                           state_file, status ("writing", then "complete")
    /rounds/<NNNN>/masks/<tensor>   np.packbits of the flattened bool mask (True = keep, first element in the
                           highest bit), uint8, chunked + gzip + fletcher32; attrs name, shape, kept
    /rounds/<NNNN>/metrics table (name, numel, kept, sparsity)
    /rounds/<NNNN>/history table (epoch, train_loss, eval_loss, eval_accuracy)
    /checkpoint            attrs round (last complete), state_file; after a stop mid-training also
                           training_stage (0: dense training, r: fine-tuning of round r), training_epoch (epochs
                           done), training_model_file (safetensors), training_state_file (optimizer, LR
                           schedule, epoch records, RNG; torch.save read with weights_only): see epoch_checkpoint
/events                table (time, kind, detail), one row per start, resume, interruption and finish,
                       appended by rank 0: the run's provenance
/exports/<NNNN>        attrs only, one group per `hpcprune export` (numbered from 1): format, round, path (of the
                       file, relative), parameters, nonzero_parameters, bytes, dense_bytes, flops, nonzero_flops,
                       accuracy (nan: no data), recorded_accuracy, details (JSON), created

Tensor names become HDF5 names as they are ("fc1.weight"), except that "%" is written "%25" and "/"
is written "%2F" (HDF5 would read "/" as a subgroup); the `name` attr always holds the real name.
Model states live in files beside the archive (`state_path`); the archive stores their paths relative
to its own folder, so a run folder can be moved as a whole, and the reader returns absolute paths.

Crash safety: every update is made on a copy of the archive that replaces it once closed and synced
(`archive_reader.ReplacingFile`): a kill or a full disk mid-update leaves the previous archive as it was.
Within an update, a round is marked "complete" only after
its data has been flushed, so a killed run leaves the earlier complete rounds readable; an incomplete
round is ignored by readers and replaced on resume.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import yaml

import hpcprune
from hpcprune.archive.atomic import replace_atomically
from hpcprune.archive.codec import EncodedMask, encode_mask
from hpcprune.archive.reader import (
    FORMAT,
    FORMAT_VERSION,
    open_archive,
    round_groups,
    round_name,
)
from hpcprune.archive.update import open_h5
from hpcprune.config import load_config_text
from hpcprune.errors import UsageError
from hpcprune.progress import bar

# Keys that may change between the original run and its resume without changing the results.
RESUME_IGNORED_KEYS = ("output.path", "progress")

REQUIRED_ROUND_ATTRS = ("criterion", "rule", "target_sparsity", "achieved_sparsity", "kept", "total")
ROUND_DEFAULTS = {
    "threshold": None, "accuracy": math.nan, "loss": math.nan, "seconds_record": math.nan,
    "seconds_select": math.nan, "seconds_finetune": math.nan, "state_file": None,
}

STRING = h5py.string_dtype()
PARAMS_DTYPE = np.dtype([("name", STRING), ("shape", STRING), ("numel", "i8"), ("prunable", "?")])
LAYERS_DTYPE = np.dtype([("name", STRING), ("numel", "i8"), ("kept", "i8"), ("sparsity", "f8")])
HISTORY_DTYPE = np.dtype([("epoch", "i8"), ("train_loss", "f8"), ("eval_loss", "f8"), ("eval_accuracy", "f8")])
EVENTS_DTYPE = np.dtype([("time", STRING), ("kind", STRING), ("detail", STRING)])
EVENT_KINDS = ("start", "resume", "interrupt", "requeue", "finish")

RoundMask = tuple[np.ndarray | EncodedMask, Sequence[int], int]  # (packed bits or encoded chunks, shape, kept)


def state_path(archive_path: str | Path, label: str) -> Path:
    """Where a model state of this run lives: `<archive stem>.states/<label>.safetensors` beside it."""
    archive_path = Path(archive_path)
    return archive_path.parent / f"{archive_path.stem}.states" / f"{label}.safetensors"


def escape_name(name: str) -> str:
    """A tensor name as an HDF5 link name ("/" would open a subgroup)."""
    return name.replace("%", "%25").replace("/", "%2F")


# --- writer ----------------------------------------------------------------------------------


class Archive:
    """Rank 0's handle on a run's archive; every method opens and closes the file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def at(cls, path: str | Path) -> Archive:
        """A writer for an archive this run already created or validated (no checks)."""
        return cls(path)

    @classmethod
    def create(cls, path: str | Path, *, config_yaml: str, model_name: str,
               params: Sequence[tuple[str, Sequence[int], bool]], world_size: int, backend: str,
               force: bool = False) -> Archive:
        """Write a new archive holding the config and the model's parameter table.

        The file is built under a temporary name in the same folder and renamed at the end, so a
        failed create leaves nothing behind, and with `force` the old archive survives until then.
        """
        path = Path(path)
        if path.is_dir():
            raise UsageError(f"{path} is a directory; output.path must name the archive file")
        if path.exists() and not force:
            raise UsageError(f"{path} exists; pass --resume to continue it or --force to overwrite")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(f"cannot create the folder of {path}: {error.strerror or error}") from None
        with replace_atomically(path) as temporary, open_h5(temporary, "w") as file:
            _write_header(file, config_yaml, model_name, params, world_size, backend)
        return cls(path)

    @classmethod
    def open_resume(cls, path: str | Path, *, config_yaml: str, world_size: int) -> Archive:
        """Reopen an archive to continue its run with the same config (output.path and progress may differ)."""
        path = Path(path)
        reader = open_archive(path)
        difference = _first_difference(_flatten(_resolved_tree(reader.config_yaml)), _flatten(_yaml_tree(config_yaml)))
        if difference is not None:
            key, stored, given = difference
            raise UsageError(f"{path}: cannot resume with a different config: {key} is {stored!r} in the archive "
                             f"and {given!r} now; resume with the same config or pass --force to start over")
        _check_world_size(path, reader, world_size)
        _check_resumable(path, reader)
        try:
            with open_h5(path, "a") as file:
                file.attrs["world_size"] = world_size
                file.attrs["resumed"] = _now()
        except OSError as error:
            raise UsageError(f"cannot open {path} for writing: {error}") from None
        return cls(path)

    def write_dense(self, *, accuracy: float, loss: float, seconds: float, history: Sequence[Any],
                    state_file: str | None) -> None:
        """Record the dense model's test figures, its training curve and (archive-relative) state file."""
        with open_h5(self.path, "a") as file:
            if "dense" in file:
                del file["dense"]
            dense = file.create_group("dense")
            dense.attrs.update(status="writing", accuracy=float(accuracy), loss=float(loss), seconds=float(seconds))
            if state_file is not None:
                dense.attrs["state_file"] = self._relative(state_file)
            dense.create_dataset("history", data=_table(history, HISTORY_DTYPE))
            _commit(file, dense)

    def write_round(self, index: int, *, attrs: Mapping[str, Any],
                    masks: Mapping[str, RoundMask] | Iterable[tuple[str, RoundMask]],
                    layers: Sequence[Mapping[str, Any]], history: Sequence[Any], progress: bool = False) -> None:
        """Record one round; `masks` maps tensor name -> (packed uint8 bits or their encoded chunks,
        shape, kept count), or gives (name, that) pairs one at a time, each written before the next
        is asked for (masks streamed from the ranks). `progress`: a bar over the masks written (when
        stderr is a terminal), one per row of `layers`.

        Replaces an incomplete round of the same index (left by a killed run); a complete one is a bug.
        """
        missing = [key for key in REQUIRED_ROUND_ATTRS if key not in attrs]
        if missing:
            raise ValueError(f"round {index}: attrs lack {', '.join(missing)}")
        started = time.perf_counter()
        with open_h5(self.path, "a") as file:
            rounds = file.require_group("rounds")
            name = round_name(index)
            if name in rounds:
                if rounds[name].attrs.get("status") == "complete":
                    raise ValueError(f"round {index} is already complete in {self.path}")
                del rounds[name]
            group = rounds.create_group(name)
            group.attrs.update(self._round_attrs(attrs))
            group.attrs["status"] = "writing"
            masks_group = group.create_group("masks", track_order=True)  # keep the plan's tensor order
            pairs = masks.items() if isinstance(masks, Mapping) else masks
            for tensor, (packed, shape, kept) in bar(pairs, enabled=progress, total=len(layers),
                                                     description=f"round {index}: write", unit="mask"):
                _write_mask(masks_group, tensor, packed, tuple(shape), kept)
            group.create_dataset("metrics", data=_table(layers, LAYERS_DTYPE))
            group.create_dataset("history", data=_table(history, HISTORY_DTYPE))
            group.attrs["seconds_write"] = time.perf_counter() - started
            _commit(file, group)

    def mark_checkpoint(self, round_index: int, state_file: str | None) -> None:
        """Resume continues after `round_index` from `state_file` (archive-relative)."""
        with open_h5(self.path, "a") as file:
            checkpoint = file.require_group("checkpoint")
            checkpoint.attrs["round"] = int(round_index)
            checkpoint.attrs["state_file"] = "" if state_file is None else self._relative(state_file)
            file.flush()

    def mark_training(self, stage: int, epoch: int, model_file: str | Path, state_file: str | Path) -> None:
        """Resume continues training stage `stage` after `epoch` epochs from these files."""
        with open_h5(self.path, "a") as file:
            checkpoint = file.require_group("checkpoint")
            checkpoint.attrs.update(training_stage=int(stage), training_epoch=int(epoch),
                                    training_model_file=self._relative(model_file),
                                    training_state_file=self._relative(state_file))
            file.flush()

    def record_event(self, kind: str, detail: str = "") -> None:
        """Append one provenance row to /events (kind one of EVENT_KINDS); flushed at once."""
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        row = np.array([(_now(), kind, detail)], dtype=EVENTS_DTYPE)
        with open_h5(self.path, "a") as file:
            if "events" not in file:
                file.create_dataset("events", data=row, maxshape=(None,), chunks=(64,))
            else:
                events = file["events"]
                events.resize((events.shape[0] + 1,))
                events[-1] = row[0]
            file.flush()

    def write_export(self, attrs: Mapping[str, Any]) -> int:
        """Append the figures of one export as /exports/<NNNN>; returns its number."""
        with open_h5(self.path, "a") as file:
            exports = file.require_group("exports")
            number = len(exports) + 1
            group = exports.create_group(round_name(number))
            group.attrs.update({**attrs, "path": self._relative(attrs["path"]), "created": _now()})
            file.flush()
        return number

    def completed_rounds(self) -> list[int]:
        with open_h5(self.path, "r") as file:
            return [index for index, group in round_groups(file) if group.attrs.get("status") == "complete"]

    def dense_done(self) -> bool:
        with open_h5(self.path, "r") as file:
            return "dense" in file and file["dense"].attrs.get("status") == "complete"

    def _relative(self, state_file: str | Path) -> str:
        """Relative paths are taken as already relative to the archive's folder; absolute ones are made so."""
        state_file = Path(state_file)
        if state_file.is_absolute():
            state_file = Path(os.path.relpath(state_file, self.path.parent.absolute()))
        return state_file.as_posix()

    def _round_attrs(self, attrs: Mapping[str, Any]) -> dict[str, Any]:
        merged = {**ROUND_DEFAULTS, **attrs}
        merged["threshold"] = math.nan if merged["threshold"] is None else float(merged["threshold"])
        merged["state_file"] = "" if not merged["state_file"] else self._relative(merged["state_file"])
        return merged


def _check_world_size(path: Path, reader, world_size: int) -> None:
    """Masks do not depend on the world size, but training does (each rank trains on its own batches),
    so a run that trains resumes only on the world size it trained on."""
    stored = int(reader.attrs.get("world_size", world_size))
    config = _flatten(_yaml_tree(reader.config_yaml))
    trains = config.get("finetune.epochs", 0) or (config.get("pretrain.epochs", 0) and not config.get("model.checkpoint"))
    if stored != world_size and trains:
        raise UsageError(f"{path}: cannot resume on {world_size} rank(s) a run that trains on {stored}: the training "
                         f"batches, and so the weights and masks, would differ; resume with {stored} rank(s) or pass --force")


def _check_resumable(path: Path, reader) -> None:
    """Before the archive is touched, the last complete round's masks, which resume reads, must pass
    their checksums."""
    rounds = reader.rounds()
    if rounds:
        for _ in reader.iter_packed_masks(rounds[-1]["index"]):  # one mask in memory at a time
            pass


def _write_header(file: h5py.File, config_yaml: str, model_name: str, params, world_size: int, backend: str) -> None:
    file.attrs.update(format=FORMAT, format_version=FORMAT_VERSION, hpcprune_version=hpcprune.__version__,
                      created=_now(), world_size=world_size, backend=backend, host=socket.gethostname())
    file.create_dataset("config", data=config_yaml, dtype=STRING)
    rows = [(name, "x".join(str(size) for size in shape), math.prod(shape), bool(prunable))
            for name, shape, prunable in params]
    model = file.create_group("model")
    model.attrs.update(name=model_name, num_params=sum(row[2] for row in rows))
    model.create_dataset("params", data=np.array(rows, dtype=PARAMS_DTYPE))
    file.create_group("rounds")


def _write_mask(group: h5py.Group, tensor: str, mask: np.ndarray | EncodedMask, shape: tuple[int, ...], kept: int) -> None:
    encoded = mask if isinstance(mask, EncodedMask) else encode_mask(mask)
    expected = (math.prod(shape) + 7) // 8
    if encoded.nbytes != expected:
        raise ValueError(f"mask {tensor}: {encoded.nbytes} packed bytes for shape {shape} (expected {expected})")
    # An empty tensor still gets the same filters; HDF5 then needs an extendible shape to hold one chunk.
    dataset = group.create_dataset(escape_name(tensor), shape=(encoded.nbytes,), dtype=np.uint8,
                                   chunks=(encoded.chunk_bytes,), compression="gzip", fletcher32=True,
                                   maxshape=None if encoded.nbytes else (None,))
    for position, chunk in enumerate(encoded.chunks):  # already compressed and checksummed (mask_codec)
        dataset.id.write_direct_chunk((position * encoded.chunk_bytes,), chunk)
    dataset.attrs.update(name=tensor, shape=np.array(shape, dtype=np.int64), kept=int(kept))


def _commit(file: h5py.File, group: h5py.Group) -> None:
    """Flush the data, then mark the group complete and flush again: "complete" never precedes its data."""
    file.flush()
    group.attrs["status"] = "complete"
    file.flush()


def _table(rows: Sequence[Any], dtype: np.dtype) -> np.ndarray:
    """Rows (dicts or dataclasses) as a structured array with the columns of `dtype`."""
    rows = [asdict(row) if is_dataclass(row) else row for row in rows]
    return np.array([tuple(row[column] for column in dtype.names) for row in rows], dtype=dtype)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- config comparison for resume ------------------------------------------------------------


def _yaml_tree(text: str) -> dict[str, Any]:
    tree = yaml.safe_load(text) or {}
    return tree if isinstance(tree, dict) else {}


def _resolved_tree(text: str) -> dict[str, Any]:
    """A stored config as this version resolves it: keys added since it was written take their
    defaults, so an archive written before a new key still resumes under the same settings."""
    try:
        return load_config_text(text, "<archive>").model_dump(mode="json")
    except UsageError:  # a key this version no longer knows: compare as stored, and say which differs
        return _yaml_tree(text)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _first_difference(stored: dict[str, Any], given: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first dotted key (in the stored config's order) whose value differs, with both values."""
    missing = object()
    for key in [*stored, *(key for key in given if key not in stored)]:
        if key in RESUME_IGNORED_KEYS:
            continue
        old, new = stored.get(key, missing), given.get(key, missing)
        if old != new:
            return key, None if old is missing else old, None if new is missing else new
    return None
