"""The archive's layout: what each group holds, the columns of its tables, and the header a new archive starts with.

    h5dump -A runs/hpcprune.h5        # the attributes of every group below

Layout, format 2 (readable with plain h5py, h5dump or HDFView; nothing is pickled):

    /                      attrs format="hpcprune", format_version, hpcprune_version, created, world_size, backend,
                           host, states_folder, masks_folder, generation (`hpcprune.archive.side_files`)
    /config                scalar string: the resolved config YAML
    /model                 attrs name, num_params; /model/params table (name, shape "300x784", numel, prunable):
                           the plan, whose prunable rows every round holds a mask of (`structure`)
    /dense                 attrs accuracy, loss, seconds, status, [state_file]; /dense/history table
    /rounds/<NNNN>/        attrs criterion, rule, target_sparsity, achieved_sparsity, threshold (nan: none),
                           kept, total, accuracy, loss, seconds_select, seconds_finetune, seconds_record, seconds_write,
                           state_file, status ("writing", then "complete")
    /rounds/<NNNN>/masks/<tensor>   external link to the mask in a part file beside the archive
                           (`<masks_folder>/round-<NNNN>.part-<SSSS>.h5:/<tensor>`, `mask_parts`): np.packbits
                           of the flattened bool mask (True = keep, first element in the highest bit), uint8,
                           chunked + gzip + fletcher32; attrs name, shape, kept. Format 1 held it here inline.
    /rounds/<NNNN>/metrics table (name, numel, kept, sparsity)
    /rounds/<NNNN>/history table (epoch, train_loss, eval_loss, eval_accuracy)
    /checkpoint            attrs round (last complete), state_file; after a stop mid-training also
                           training_stage (0: dense training, r: fine-tuning of round r), training_epoch (epochs
                           done), training_model_file (safetensors), training_state_file (optimizer, LR
                           schedule, epoch records, RNG; torch.save read with weights_only): see train.checkpoint
    /events                table (time, kind, detail), one row per start, resume, interruption and finish,
                           appended by rank 0: the run's provenance
    /exports/<NNNN>        attrs only, one group per `hpcprune export` (numbered from 1): format, round, path (of the
                           file, relative), parameters, nonzero_parameters, bytes, dense_bytes, flops, nonzero_flops,
                           accuracy (nan: no data), recorded_accuracy, details (JSON), created

Tensor names become HDF5 names as they are ("fc1.weight"), except that "%" is written "%25" and "/"
is written "%2F" (HDF5 would read "/" as a subgroup); the `name` attr always holds the real name.
Model states and mask parts live in the archive's own folders beside it (`side_files`); the archive
stores every path relative to its own folder, so a run folder can be moved as a whole, and the
reader returns absolute paths. A format-1 archive is read as it is, and upgraded to format 2 when
a resume adds to it.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Sequence
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from typing import Any

import h5py
import numpy as np

import hpcprune
from hpcprune.archive.reader import FORMAT, FORMAT_VERSION
from hpcprune.archive.side_files import SideFiles

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


def write_header(file: h5py.File, *, side: SideFiles, config_yaml: str, model_name: str, params, world_size: int,
                 backend: str) -> None:
    """A new archive: root attrs, /config, /model with its parameter table (the plan), an empty /rounds."""
    file.attrs.update(format=FORMAT, format_version=FORMAT_VERSION, hpcprune_version=hpcprune.__version__,
                      created=now(), world_size=world_size, backend=backend, host=socket.gethostname(), **side.attrs())
    file.create_dataset("config", data=config_yaml, dtype=STRING)
    rows = [(name, "x".join(str(size) for size in shape), math.prod(shape), bool(prunable))
            for name, shape, prunable in params]
    model = file.create_group("model")
    model.attrs.update(name=model_name, num_params=sum(row[2] for row in rows))
    model.create_dataset("params", data=np.array(rows, dtype=PARAMS_DTYPE))
    file.create_group("rounds")


def planned_tensors(file: h5py.File) -> list[str]:
    """The prunable rows of /model/params: the tensors every round holds a mask of."""
    names = (row["name"] for row in file["model/params"][()] if row["prunable"])
    return [name.decode() if isinstance(name, bytes) else name for name in names]


def commit(file: h5py.File, group: h5py.Group) -> None:
    """Flush the data, then mark the group complete and flush again: "complete" never precedes its data."""
    file.flush()
    group.attrs["status"] = "complete"
    file.flush()


def table(rows: Sequence[Any], dtype: np.dtype) -> np.ndarray:
    """Rows (dicts or dataclasses) as a structured array with the columns of `dtype`."""
    rows = [asdict(row) if is_dataclass(row) else row for row in rows]
    return np.array([tuple(row[column] for column in dtype.names) for row in rows], dtype=dtype)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
