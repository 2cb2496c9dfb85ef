"""What killed writers leave beside an archive, removed by the next one that holds its lock.

    hpcprune prune --config configs/quickstart.yaml --resume    # removes what the killed run left behind

A SIGKILL leaves temporaries (`.<name>.<random>.tmp` of `hpcprune.archive.atomic`: a state file half
written, an update's copy of the archive, the new archive of a `--force` run that had not replaced
the old one yet), mask parts that nothing links to (a step killed between writing its part and
linking it), and folders of a generation that is not the archive's (a `--force` run killed before
it replaced the archive, or one killed while it removed the files of the run it replaced).

Only the holder of the archive's lock removes them, so no live writer of this archive is at work,
and only names that belong to this archive: temporaries and folders that start with its full name,
temporaries inside its own folders. Other archives' files are never touched, nor a format-1
`<stem>.states/` folder, which two archives of different suffixes may share.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from hpcprune.archive.atomic import TEMPORARY_SUFFIX
from hpcprune.archive.side_files import (
    SideFiles,
    generation_folders,
    temporaries_pattern,
)


def remove_leftovers(archive: Path, side: SideFiles, linked_parts: set[str]) -> list[Path]:
    """Remove what killed writers of `archive` left (see above); returns what was removed.
    `linked_parts`: the part files the archive links to, as the links name them."""
    removed = []
    temporaries = temporaries_pattern(archive.name)
    removed += [entry for entry in archive.parent.iterdir() if temporaries.fullmatch(entry.name) and entry.is_file()]
    current = (side.states_name, side.masks_name)
    stale = [folder for _, folder in generation_folders(archive) if folder.name not in current]
    for folder in (side.states, side.masks):
        if folder.name.startswith(f"{archive.name}.") and folder.is_dir():
            removed += [entry for entry in folder.iterdir()
                        if entry.name.startswith(".") and entry.name.endswith(TEMPORARY_SUFFIX) and entry.is_file()]
    if side.masks.is_dir():
        removed += [part for part in side.masks.glob("round-*.part-*.h5")
                    if f"{side.masks_name}/{part.name}" not in linked_parts]
    for path in removed:
        path.unlink(missing_ok=True)
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    return removed + stale


def discard_unfinished(staged: Path, side: SideFiles) -> None:
    """A replacing run that ends before it replaced the archive: its new archive and its own folders
    are nobody's (the archive it was to replace never linked them)."""
    staged.unlink(missing_ok=True)
    for folder in (side.states, side.masks):
        shutil.rmtree(folder, ignore_errors=True)
