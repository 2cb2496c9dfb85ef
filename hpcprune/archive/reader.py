"""Reading an archive back: validated open, round facts, masks and tables.

    hpcprune inspect runs/quickstart.h5

The layout is described in `hpcprune.archive.writer`. Every read checks the format first: a file that is
not an archive, is truncated, or was written by a newer hpcprune is refused with a one-line
`UsageError`. Then the archive is checked against its own table of contents (`structure`): a missing
round or mask, a mask whose shape is not the planned one, is refused before anything is read from
it, and a mask whose fletcher32 checksum fails is named with its round. Format 1 (masks inside the
archive) and format 2 (masks in part files, linked) read the same: h5py follows the links.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import yaml

from hpcprune.archive.atomic import refuse_own_input
from hpcprune.archive.codec import unpack_mask
from hpcprune.archive.mask_parts import escape_name
from hpcprune.archive.side_files import SideFiles, fanout_folder, lock_file, logs_folder
from hpcprune.archive.structure import check_mask, check_structure, planned_shapes
from hpcprune.errors import UsageError

FORMAT = "hpcprune"
FORMAT_VERSION = 2  # 2: masks in part files beside the archive, linked; 1: masks inside the archive
OLDEST_FORMAT = 1
DENSE_FIGURES = ("accuracy", "loss", "seconds")


def round_name(index: int) -> str:
    return f"{index:04d}"


class ArchiveReader:
    """What a run recorded; small facts are read on open, masks and tables on request."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open_checked(self.path) as file:
            self.attrs = _plain_attrs(file.attrs)
            self.config_yaml = file["config"].asstr()[()]
            if not isinstance(yaml.safe_load(self.config_yaml), dict):  # YAMLError, ValueError: damaged
                raise ValueError("/config is not a YAML mapping")
            self.model = _plain_attrs(file["model"].attrs)
            self.params = [_row(row) for row in file["model/params"][()]]
            self.planned = planned_shapes(self.params)
            self.side = SideFiles.recorded(self.path, self.attrs)
            self.dense = self._dense(file)
            self.checkpoint = self._checkpoint(file)
            self.events = [_row(row) for row in file["events"][()]] if "events" in file else []
            groups = round_groups(file)
            check_structure(self.path, groups, self.planned, (self.checkpoint or {}).get("round"))
            self._rounds = [self._round(index, group) for index, group in groups]
        self._links: dict[int, dict[str, tuple[str, tuple[int, ...]]]] = {}

    def rounds(self, include_incomplete: bool = False) -> list[dict[str, Any]]:
        """Round attrs (plus "index"), in round order; only complete rounds unless asked."""
        return [r for r in self._rounds if include_incomplete or r.get("status") == "complete"]

    def read_masks(self, index: int) -> dict[str, torch.Tensor]:
        """The round's masks as bool tensors (True = keep), in the plan's tensor order."""
        return {name: unpack_mask(packed, shape) for name, (packed, shape) in self._packed(index).items()}

    def read_packed_masks(self, index: int, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The round's masks as stored: np.packbits of the flat bool mask (numel/8 bytes each); only
        those of `names` when given (a block of a round recorded block by block)."""
        return {name: packed for name, packed, _ in self.iter_packed_masks(index, names)}

    def _packed(self, index: int) -> dict[str, tuple[np.ndarray, tuple[int, ...]]]:
        return {name: (packed, shape) for name, packed, shape in self.iter_packed_masks(index)}

    def iter_packed_masks(self, index: int, names: Sequence[str] | None = None
                          ) -> Iterator[tuple[str, np.ndarray, tuple[int, ...]]]:
        """(name, packed bits, shape) of the round's masks in plan order (or of `names`, in their order),
        one read at a time; every mask's dataset is checked against the plan before the first one is read."""
        links = self._mask_links(index)
        if names is not None:
            absent = [name for name in names if name not in links]
            if absent:
                raise UsageError(f"{self.path} is damaged: round {index} has no mask of {absent[0]}")
            links = {name: links[name] for name in names}
        with open_checked(self.path) as file:
            masks = self._group(file, index)["masks"]
            for tensor, (key, shape) in links.items():
                yield tensor, self._packed_bits(masks, key, index, tensor), shape

    def _packed_bits(self, masks: h5py.Group, key: str, index: int, tensor: str) -> np.ndarray:
        try:
            return self._mask(masks, key, index)[()]
        except OSError as error:  # fletcher32 or gzip found damaged bytes
            raise UsageError(f"{self.path}: round {index}, mask {tensor} is corrupted ({error})") from None

    def _mask(self, masks: h5py.Group, key: str, index: int) -> h5py.Dataset:
        try:
            return masks[key]  # follows the link into the round's part file
        except KeyError as error:
            raise UsageError(f"{self.path} is damaged: round {index}: the mask of {key} cannot be opened "
                             f"({str(error).splitlines()[0]})") from None

    def own_paths(self) -> tuple[list[Path], list[Path]]:
        """(files, folders) that are this archive or belong to it: what no command may write over."""
        recorded = [(self.dense or {}).get("state_file"), *(r.get("state_file") for r in self._rounds)]
        checkpoint = self.checkpoint or {}
        recorded += [checkpoint.get("state_file")] + [str(self.path.parent / checkpoint[key]) for key in
                                                      ("training_model_file", "training_state_file") if checkpoint.get(key)]
        files = [self.path, lock_file(self.path), *(Path(state) for state in recorded if state)]
        return files, [self.side.states, self.side.masks, fanout_folder(self.path), logs_folder(self.path)]

    def mask_shapes(self, index: int) -> dict[str, tuple[int, ...]]:
        """Each mask's tensor name and shape, in plan order, from attributes alone (no mask is read)."""
        return {name: shape for name, (_, shape) in self._mask_links(index).items()}

    def read_mask(self, index: int, name: str) -> torch.Tensor:
        """One mask of the round as a bool tensor (True = keep): a model's masks one at a time."""
        link, shape = self._mask_links(index)[name]
        with open_checked(self.path) as file:
            return unpack_mask(self._packed_bits(self._group(file, index)["masks"], link, index, name), shape)

    def _mask_links(self, index: int) -> dict[str, tuple[str, tuple[int, ...]]]:
        """name -> (HDF5 link name, shape) of the round's masks in recorded (plan) order, each mask's
        dataset checked against the plan; read once per round, no mask's bits read."""
        if index not in self._links:
            tensors = {escape_name(tensor): tensor for tensor in self.planned}
            with open_checked(self.path) as file:
                masks = self._group(file, index)["masks"]
                links = {}
                for key in (key for key in masks if key in tensors):  # the structure check saw them all planned
                    tensor = tensors[key]
                    check_mask(self.path, index, self._mask(masks, key, index), tensor, self.planned[tensor])
                    links[tensor] = (key, self.planned[tensor])
            self._links[index] = links
        return self._links[index]

    def blocks(self, index: int) -> list[dict[str, Any]]:
        """The round's /blocks table of a block-sequential run (block, seconds, weights_file: the absolute
        path of the safetensors file of the block's updated weights, None when the method changed none);
        empty for any other run."""
        with open_checked(self.path) as file:
            group = self._group(file, index)
            rows = [_row(row) for row in group["blocks"][()]] if "blocks" in group else []
        return [{**row, "weights_file": self._resolve(row["weights_file"])} for row in rows]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Each parameter's shape, from /model/params (stored as text: "300x784", "" for a scalar)."""
        return {param["name"]: tuple(int(size) for size in param["shape"].split("x") if size) for param in self.params}

    def layers(self, index: int) -> list[dict[str, Any]]:
        with open_checked(self.path) as file:
            return [_row(row) for row in self._group(file, index)["metrics"][()]]

    def history(self, index: int) -> list[dict[str, Any]]:
        with open_checked(self.path) as file:
            return [_row(row) for row in self._group(file, index)["history"][()]]

    def _group(self, file: h5py.File, index: int) -> h5py.Group:
        name = f"rounds/{round_name(index)}"
        if name not in file:
            raise UsageError(f"{self.path} has no round {index}")
        return file[name]

    def _round(self, index: int, group: h5py.Group) -> dict[str, Any]:
        attrs = {"index": index, **_plain_attrs(group.attrs)}
        attrs["threshold"] = None if math.isnan(attrs.get("threshold", math.nan)) else attrs["threshold"]
        attrs["state_file"] = self._resolve(attrs.get("state_file", ""))
        return attrs

    def _dense(self, file: h5py.File) -> dict[str, Any] | None:
        if "dense" not in file or file["dense"].attrs.get("status") != "complete":
            return None
        dense = _plain_attrs(file["dense"].attrs)
        for key in DENSE_FIGURES:
            dense[key] = float(dense[key])  # KeyError, ValueError, TypeError: damaged (CheckedFile)
        dense["state_file"] = self._resolve(dense.get("state_file", ""))
        dense["history"] = [_row(row) for row in file["dense/history"][()]]
        return dense

    def _checkpoint(self, file: h5py.File) -> dict[str, Any] | None:
        if "checkpoint" not in file:
            return None
        checkpoint = _plain_attrs(file["checkpoint"].attrs)
        checkpoint["state_file"] = self._resolve(checkpoint.get("state_file", ""))
        return checkpoint

    def _resolve(self, stored: str) -> str | None:
        return str((self.path.parent / stored).absolute()) if stored else None


def complete_round(reader: ArchiveReader, round_index: int | None) -> dict[str, Any]:
    """The attrs of complete round `round_index` (None: the last one); UsageError if there is none."""
    rounds = reader.rounds()
    if not rounds:
        raise UsageError(f"{reader.path} has no complete round")
    if round_index is None:
        return rounds[-1]
    for attrs in rounds:
        if attrs["index"] == round_index:
            return attrs
    raise UsageError(f"{reader.path} has no complete round {round_index} (complete: "
                     f"{', '.join(str(r['index']) for r in rounds)})")


def refuse_writing_over(reader: ArchiveReader, out: str | Path) -> None:
    """An output of a command that reads this archive must not be the archive or one of its own files."""
    files, folders = reader.own_paths()
    refuse_own_input(out, files=files, folders=folders)


def open_archive(path: str | Path) -> ArchiveReader:
    """Read an archive; UsageError if it is not one, is damaged, or was written by a newer hpcprune."""
    return ArchiveReader(path)


def open_checked(path: Path) -> h5py.File:
    """Open for reading and check that this is an archive this version understands."""
    if not path.is_file():
        raise UsageError(f"{path} is not a readable hpcprune archive (no such file)")
    try:
        file = CheckedFile(path)
    except OSError as error:
        raise UsageError(f"{path} is not a readable hpcprune archive ({error})") from None
    try:
        _check_format(path, file)
    except BaseException as error:
        file.close()
        if isinstance(error, DECODING_ERRORS) and not isinstance(error, UsageError):
            raise damaged(path, error) from None
        raise
    return file


# What h5py and the decoding of values raise when the bytes of a file are damaged.
DECODING_ERRORS = (OSError, KeyError, ValueError, RuntimeError, TypeError, IndexError, AttributeError, yaml.YAMLError)


class CheckedFile(h5py.File):
    """An archive open for reading: whatever fails while decoding it inside `with` is damage to the
    file (a flipped byte in its metadata, a missing attribute), refused as a UsageError that names it."""

    def __init__(self, path: Path):
        self.archive = path
        # best-effort: parallel file systems (Lustre, NFS) often refuse HDF5's file locks.
        super().__init__(path, "r", locking="best-effort")

    def __exit__(self, kind, error, traceback) -> None:
        super().__exit__(kind, error, traceback)
        if isinstance(error, DECODING_ERRORS) and not isinstance(error, UsageError):
            raise damaged(self.archive, error) from None


def damaged(path: Path, error: BaseException) -> UsageError:
    text = str(error).strip().splitlines()
    return UsageError(f"{path} is damaged ({type(error).__name__}: {text[0] if text else 'no detail'})")


def _check_format(path: Path, file: h5py.File) -> None:
    if file.attrs.get("format") != FORMAT:
        raise UsageError(f"{path} is an HDF5 file but not an hpcprune archive (no format='{FORMAT}' attribute)")
    version = int(file.attrs.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise UsageError(f"{path} was written by a newer hpcprune (format {version}, this reads "
                         f"{OLDEST_FORMAT} to {FORMAT_VERSION})")
    if version < OLDEST_FORMAT:
        raise UsageError(f"{path} was written in an older archive format ({version}) that this hpcprune cannot read "
                         f"(it reads formats {OLDEST_FORMAT} to {FORMAT_VERSION})")
    missing = [name for name in ("config", "model/params", "rounds") if name not in file]
    if missing:
        raise UsageError(f"{path} is not a readable hpcprune archive (format {version}, missing {', '.join(missing)})")


def round_groups(file: h5py.File) -> list[tuple[int, h5py.Group]]:
    """(index, group) of every round, in numeric order (names sort as text only up to 9999)."""
    rounds = file.get("rounds", {})
    return sorted(((int(name), rounds[name]) for name in rounds), key=lambda pair: pair[0])


def _plain(value: Any) -> Any:
    """HDF5/numpy values as plain Python (JSON-able) values."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return [_plain(item) for item in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _plain_attrs(attrs: h5py.AttributeManager) -> dict[str, Any]:
    return {key: _plain(value) for key, value in attrs.items()}


def _row(row: np.void) -> dict[str, Any]:
    return {column: _plain(row[column]) for column in row.dtype.names}


