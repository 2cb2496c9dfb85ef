"""Step 10 — record: one HDF5 archive per run, written by rank 0 with plain (serial) h5py.

    hpcprune prune --config configs/quickstart.yaml      # writes runs/hpcprune.h5
    hpcprune inspect runs/hpcprune.h5                    # reads it back

The layout (format 2) is described in `hpcprune.archive.layout`; the masks live in part files beside
the archive (`mask_parts`), model states in its states folder (`side_files`).

One writer: an `Archive` holds the archive's lock (`lock`) from `create`/`open_resume` until
`close`, so a second run, resume or export of the same archive is refused in one line that names the
holder. Within a process `Archive.at(path)` gives the archive it holds.

Crash safety: every update is made on a copy of the archive that replaces it once closed and synced
(`update.ReplacingFile`), and the copy is cheap because the masks are not in it: a part file is
written whole before the update that links it. A round is marked "complete" only in the update
that links all its masks, after its data has been flushed, so a killed run leaves the earlier
complete rounds readable; an incomplete round is ignored by readers and replaced on resume.

`--force` over an existing archive: the new run is written under a temporary name, with side folders
of a new generation, and replaces the old archive only once it has recorded its first complete step
(the dense model or round 1), or when it is stopped to be requeued; a run killed or refused before
that leaves the old archive and its files as they were. The replaced run's folders are removed then,
and whatever killed writers left beside the archive is removed by the next one to hold it (`leftovers`).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hpcprune.archive import layout
from hpcprune.archive.atomic import (
    TEMPORARY_SUFFIX,
    fsync_file,
    fsync_folder,
    replace_atomically,
    write_error,
)
from hpcprune.archive.config_diff import (
    check_world_size,
    first_difference,
    flatten,
    resolved_tree,
    yaml_tree,
)
from hpcprune.archive.layout import (
    EVENT_KINDS,
    EVENTS_DTYPE,
    HISTORY_DTYPE,
    ROUND_DEFAULTS,
    table,
)
from hpcprune.archive.leftovers import discard_unfinished, remove_leftovers
from hpcprune.archive.lock import ArchiveLock, lock_archive
from hpcprune.archive.mask_parts import (
    escape_name,
    linked_parts,
)
from hpcprune.archive.reader import (
    FORMAT_VERSION,
    ArchiveReader,
    open_archive,
    round_groups,
    round_name,
)
from hpcprune.archive.round_recording import RoundRecording
from hpcprune.archive.side_files import SideFiles, generation_folders
from hpcprune.archive.update import file_system_failure, open_h5
from hpcprune.errors import UsageError

__all__ = ["Archive", "escape_name", "state_path"]


def state_path(archive_path: str | Path, label: str) -> Path:
    """Where model state `label` of the first generation of the archive at `archive_path` lives
    (`<archive name>.states/<label>.safetensors`); a held archive knows its own: `Archive.side`."""
    return SideFiles.new(archive_path, 1).state(label)


_HELD: dict[str, Archive] = {}  # absolute archive path -> the Archive this process holds there


class Archive(RoundRecording):
    """Rank 0's handle on the archive it holds; every method opens and closes the file. Rounds are
    recorded through `RoundRecording`'s methods (write_round; add_masks, finish_round)."""

    def __init__(self, path: Path, side: SideFiles, lock: ArchiveLock, staged: Path | None = None):
        self.path, self.side, self.lock = Path(path), side, lock
        self.staged = staged  # the new archive of a --force run until it replaces the old one
        _HELD[_key(self.path)] = self

    @property
    def file(self) -> Path:
        """Where the run's archive is now: its path, or the temporary of a --force run not yet in place."""
        return self.staged or self.path

    @classmethod
    def held(cls, path: str | Path) -> Archive | None:
        """The archive this process holds at `path`, if any."""
        return _HELD.get(_key(path))

    @classmethod
    def at(cls, path: str | Path) -> Archive:
        """The archive this process holds at `path`; else that existing archive, locked now (an export
        records into it). Refused if it is not an archive or another process writes it."""
        held = _HELD.get(_key(path))
        if held is not None:
            return held
        reader = open_archive(path)
        return cls(Path(path), reader.side, lock_archive(path))

    @classmethod
    def create(cls, path: str | Path, *, config_yaml: str, model_name: str,
               params: Sequence[tuple[str, Sequence[int], bool]], world_size: int, backend: str,
               force: bool = False) -> Archive:
        """Write a new archive holding the config and the model's parameter table, and hold it.

        A new archive is built under a temporary name and renamed at the end, so a failed create leaves
        nothing behind. With `force` over an existing archive the new one stays under its temporary name,
        and the old one in place, until `replace_previous_run` (see the top).
        """
        path = Path(path)
        _refuse_existing_archive(path, force)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(f"cannot create the folder of {path}: {error.strerror or error}") from None
        lock = _take_lock(path)
        header = dict(config_yaml=config_yaml, model_name=model_name, params=params, world_size=world_size,
                      backend=backend)
        try:
            _refuse_existing_archive(path, force)  # again: a writer that held the lock until now may have made it
            if not path.exists():
                side = SideFiles.new(path, 1)
                with replace_atomically(path) as temporary, h5py.File(temporary, "w") as file:
                    layout.write_header(file, side=side, **header)
                archive = cls(path, side, lock)
                archive._remove_leftovers()
                return archive
            side = SideFiles.new(path, _next_generation(path))
            staged = _reserve_temporary(path)
            try:
                with open_h5(staged, "w") as file:  # not the archive yet: written where it is
                    layout.write_header(file, side=side, **header)
            except BaseException as error:
                staged.unlink(missing_ok=True)
                if file_system_failure(error):
                    raise write_error(path, error) from None
                raise
            return cls(path, side, lock, staged=staged)
        except BaseException:
            lock.release()
            raise

    @classmethod
    def open_resume(cls, path: str | Path, *, config_yaml: str, world_size: int) -> Archive:
        """Hold an archive to continue its run with the same config (output.path and progress may differ)."""
        path = Path(path)
        lock = _take_lock(path)
        try:
            reader = open_archive(path)
            difference = first_difference(flatten(resolved_tree(reader.config_yaml)), flatten(yaml_tree(config_yaml)))
            if difference is not None:
                key, stored, given = difference
                raise UsageError(f"{path}: cannot resume with a different config: {key} is {stored!r} in the archive "
                                 f"and {given!r} now; resume with the same config or pass --force to start over")
            check_world_size(path, reader.config_yaml, int(reader.attrs.get("world_size", world_size)), world_size)
            _check_resumable(reader)
            archive = cls(path, reader.side, lock)
            with archive._update() as file:
                file.attrs.update(world_size=world_size, resumed=layout.now(), format_version=FORMAT_VERSION,
                                  **reader.side.attrs())  # a format-1 archive continues as format 2
        except BaseException:
            _HELD.pop(_key(path), None)
            lock.release()
            raise
        archive._remove_leftovers()
        return archive

    def close(self) -> None:
        """Let the archive go. A --force run that never replaced the old archive leaves no trace of itself."""
        if self.staged is not None:
            discard_unfinished(self.staged, self.side)
            self.staged = None
        _HELD.pop(_key(self.path), None)
        self.lock.release()

    def replace_previous_run(self) -> None:
        """A --force run takes the archive's place: its temporary becomes the archive (one rename),
        then the replaced run's folders and leftovers go. Nothing to do for any other run."""
        if self.staged is None:
            return
        try:
            fsync_file(self.staged)
            os.replace(self.staged, self.path)
            fsync_folder(self.path.parent)
        except OSError as error:
            raise write_error(self.path, error) from None
        self.staged = None
        self._remove_leftovers()

    # --- recording ---------------------------------------------------------------------------

    def write_dense(self, *, accuracy: float, loss: float, seconds: float, history: Sequence[Any],
                    state_file: str | None) -> None:
        """Record the dense model's test figures, its training curve and (archive-relative) state file."""
        with self._update() as file:
            if "dense" in file:
                del file["dense"]
            dense = file.create_group("dense")
            dense.attrs.update(status="writing", accuracy=float(accuracy), loss=float(loss), seconds=float(seconds))
            if state_file is not None:
                dense.attrs["state_file"] = self._relative(state_file)
            dense.create_dataset("history", data=table(history, HISTORY_DTYPE))
            layout.commit(file, dense)
        self.replace_previous_run()

    def mark_checkpoint(self, round_index: int, state_file: str | None) -> None:
        """Resume continues after `round_index` from `state_file` (archive-relative)."""
        with self._update() as file:
            checkpoint = file.require_group("checkpoint")
            checkpoint.attrs["round"] = int(round_index)
            checkpoint.attrs["state_file"] = "" if state_file is None else self._relative(state_file)
            file.flush()

    def mark_training(self, stage: int, epoch: int, model_file: str | Path, state_file: str | Path) -> None:
        """Resume continues training stage `stage` after `epoch` epochs from these files."""
        with self._update() as file:
            checkpoint = file.require_group("checkpoint")
            checkpoint.attrs.update(training_stage=int(stage), training_epoch=int(epoch),
                                    training_model_file=self._relative(model_file),
                                    training_state_file=self._relative(state_file))
            file.flush()

    def record_event(self, kind: str, detail: str = "") -> None:
        """Append one provenance row to /events (kind one of EVENT_KINDS); flushed at once."""
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        row = np.array([(layout.now(), kind, detail)], dtype=EVENTS_DTYPE)
        with self._update() as file:
            if "events" not in file:
                file.create_dataset("events", data=row, maxshape=(None,), chunks=(64,))
            else:
                events = file["events"]
                events.resize((events.shape[0] + 1,))
                events[-1] = row[0]
            file.flush()

    def write_export(self, attrs: Mapping[str, Any]) -> int:
        """Append the figures of one export as /exports/<NNNN>; returns its number."""
        with self._update() as file:
            exports = file.require_group("exports")
            number = len(exports) + 1
            group = exports.create_group(round_name(number))
            group.attrs.update({**attrs, "path": self._relative(attrs["path"]), "created": layout.now()})
            file.flush()
        return number

    def completed_rounds(self) -> list[int]:
        with open_h5(self.file, "r") as file:
            return [index for index, group in round_groups(file) if group.attrs.get("status") == "complete"]

    def dense_done(self) -> bool:
        with open_h5(self.file, "r") as file:
            return "dense" in file and file["dense"].attrs.get("status") == "complete"

    # --- helpers -----------------------------------------------------------------------------

    def _update(self) -> h5py.File:
        # The new archive of a --force run is updated on copies too: a full disk then fails the copy,
        # before HDF5 writes (a write HDF5 sees fail leaves its library in a state it may not close).
        return open_h5(self.file, "a", temporaries=f".{self.path.name}.")

    def _remove_leftovers(self) -> None:
        with open_h5(self.path, "r") as file:
            linked = set().union(*(linked_parts(group["masks"]) for _, group in round_groups(file) if "masks" in group))
        remove_leftovers(self.path, self.side, linked)

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


def _key(path: str | Path) -> str:
    return str(Path(path).absolute())


def _refuse_existing_archive(path: Path, force: bool) -> None:
    if path.is_dir():
        raise UsageError(f"{path} is a directory; output.path must name the archive file")
    if path.exists() and not force:
        raise UsageError(f"{path} exists; pass --resume to continue it or --force to overwrite")


def _take_lock(path: Path) -> ArchiveLock:
    """The archive's lock; an Archive this process still holds there hands its lock over (same writer)."""
    previous = _HELD.pop(_key(path), None)
    if previous is not None and previous.staged is not None:
        discard_unfinished(previous.staged, previous.side)
    return previous.lock if previous is not None else lock_archive(path)


def _next_generation(path: Path) -> int:
    """One more than the archive's and than any folder named after it: never a name in use."""
    try:
        current = open_archive(path).side.generation
    except UsageError:  # a damaged or foreign file being replaced
        current = 0
    return max([current, *(generation for generation, _ in generation_folders(path))]) + 1


def _reserve_temporary(path: Path) -> Path:
    try:
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
    except OSError as error:
        raise write_error(path, error) from None
    os.close(handle)
    return Path(name)


def _check_resumable(reader: ArchiveReader) -> None:
    """Before the archive is touched, the last complete round's masks, which resume reads, must pass
    their checksums."""
    rounds = reader.rounds()
    if rounds:
        for _ in reader.iter_packed_masks(rounds[-1]["index"]):  # one mask in memory at a time
            pass
