"""The files beside an archive, named after its full name so that they belong to it alone.

    hpcprune prune --config configs/quickstart.yaml --out runs/run.h5

    runs/run.h5               the archive: config, tables, attributes, links to the masks
    runs/run.h5.states/       model states (dense, rewind, after each round, mid-training)
    runs/run.h5.masks/        each round's masks, one immutable HDF5 file per recording step
    runs/run.h5.lock          held by the one process that writes the archive (`hpcprune.archive.lock`)
    runs/run.h5.fanout/       work files of a fanned-out selection, and its backends' logs
    runs/run.h5.logs/         logs of `hpcprune submit` jobs

Every name keeps the archive's suffix: `run.h5` and `run.hdf5` side by side own `run.h5.states/` and
`run.hdf5.states/`, where the stem alone (`run.states/`, what format 1 used) would be shared.

The states and masks folders belong to one run of the archive, its generation: 1 for the first run
written at a path, then one more for each `--force` that replaced it. A replacing run writes its
files into `run.h5.states.2/` and `run.h5.masks.2/` while the archive it replaces (and that one's
files) stays whole, until the new run's first step is recorded (`hpcprune.archive.writer`). The
archive records the names of its folders (root attributes `states_folder`, `masks_folder`,
relative to its own folder), so a reader never derives them and a moved run folder keeps working.
A format-1 archive keeps its `<stem>.states/` folder, which a resume goes on using.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATES, MASKS = "states", "masks"


def beside(archive: str | Path, kind: str) -> Path:
    """`<archive's full name>.<kind>` in the archive's folder (run.h5 -> run.h5.states)."""
    archive = Path(archive)
    return archive.parent / f"{archive.name}.{kind}"


def lock_file(archive: str | Path) -> Path:
    return beside(archive, "lock")


def fanout_folder(archive: str | Path) -> Path:
    """Work files of fanned-out selections; every task must see them, so the path is absolute."""
    return beside(Path(archive).resolve(), "fanout")


def logs_folder(archive: str | Path) -> Path:
    return beside(Path(archive).absolute(), "logs")


@dataclass(frozen=True)
class SideFiles:
    """The states and masks folders of one run of an archive (names relative to the archive's folder)."""

    folder: Path  # the archive's folder
    states_name: str
    masks_name: str
    generation: int = 1

    @classmethod
    def new(cls, archive: str | Path, generation: int) -> SideFiles:
        """The folders of generation `generation` of the archive at `archive`."""
        archive = Path(archive)
        suffix = "" if generation == 1 else f".{generation}"
        return cls(archive.parent, f"{archive.name}.{STATES}{suffix}", f"{archive.name}.{MASKS}{suffix}", generation)

    @classmethod
    def recorded(cls, archive: str | Path, attrs: Mapping[str, Any]) -> SideFiles:
        """The folders an archive records in its root attributes; format 1 had `<stem>.states/` and no masks folder."""
        archive = Path(archive)
        if "states_folder" in attrs:
            return cls(archive.parent, str(attrs["states_folder"]), str(attrs["masks_folder"]),
                       int(attrs.get("generation", 1)))
        return cls(archive.parent, f"{archive.stem}.{STATES}", f"{archive.name}.{MASKS}", 1)

    @property
    def states(self) -> Path:
        return self.folder / self.states_name

    @property
    def masks(self) -> Path:
        return self.folder / self.masks_name

    def state(self, label: str) -> Path:
        """Where the model state `label` (dense, rewind, round-0003, training-...) of this run lives."""
        return self.states / f"{label}.safetensors"

    def mask_part(self, round_index: int, step: int) -> Path:
        """The masks recorded by step `step` of round `round_index` (one step per round unless recorded block by block)."""
        return self.masks / f"round-{round_index:04d}.part-{step:04d}.h5"

    def attrs(self) -> dict[str, Any]:
        return {"states_folder": self.states_name, "masks_folder": self.masks_name, "generation": self.generation}

    def owned_by_name(self, archive: str | Path) -> bool:
        """Whether both folders are named after `archive` (a format-1 `<stem>.states/` may be shared)."""
        prefix = f"{Path(archive).name}."
        return self.states_name.startswith(prefix) and self.masks_name.startswith(prefix)


def generation_folders(archive: str | Path) -> Iterator[tuple[int, Path]]:
    """(generation, folder) of every states or masks folder named after `archive` on disk."""
    archive = Path(archive)
    pattern = re.compile(rf"{re.escape(archive.name)}\.(?:{STATES}|{MASKS})(?:\.(\d+))?")
    if not archive.parent.is_dir():
        return
    for entry in archive.parent.iterdir():
        found = pattern.fullmatch(entry.name)
        if found and entry.is_dir():
            yield int(found.group(1) or 1), entry


def temporaries_pattern(name: str) -> re.Pattern[str]:
    """`hpcprune.archive.atomic`'s temporaries of a file called `name`: `.<name>.<random>.tmp`."""
    return re.compile(rf"\.{re.escape(name)}\.[^./]+\.tmp")
