"""How rank 0 opens an archive to change it: on a copy that replaces the archive once complete.

    hpcprune prune --config configs/quickstart.yaml --resume    # every update goes through open_h5

HDF5 updates a file in place, so a kill or a full disk mid-update could leave a file no reader
opens. `open_h5(path, "a")` instead copies the archive beside itself (a temporary of
`hpcprune.archive.atomic`), lets the caller change the copy, and renames it over the archive only
once it is closed and on disk. The copy costs what the archive weighs, so the archive holds only
what is small (config, tables, attributes, links): the masks live in part files beside it
(`hpcprune.archive.mask_parts`), written once, and an update costs the same after 50 rounds as
after one (bench/archive_updates.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import h5py

from hpcprune.archive.atomic import (
    TEMPORARY_SUFFIX,
    discard,
    fsync_file,
    fsync_folder,
    write_error,
)


def open_h5(path: Path, mode: str, *, temporaries: str | None = None) -> h5py.File:
    """Open an HDF5 file; an existing file opened to update ("a") is updated on a copy (`ReplacingFile`),
    named `<temporaries><random>.tmp` (default `.<file name>.`) beside it."""
    if mode == "a" and Path(path).is_file():
        return ReplacingFile(Path(path), temporaries or f".{Path(path).name}.")
    # best-effort: parallel file systems (Lustre, NFS) often refuse HDF5's file locks.
    return h5py.File(path, mode, locking="best-effort")


class ReplacingFile(h5py.File):
    """An update made on a copy of the file, which replaces the file only once closed and on disk.

    HDF5 updates a file in place: a process killed, or a disk that fills, in the middle of an update
    can leave a file that no reader opens any more. Here readers see the old file or the new one,
    never a mix; a failed update leaves the old file untouched and names it in a one-line UsageError.
    """

    def __init__(self, target: Path, prefix: str):
        self.target = target
        try:
            handle, copy = tempfile.mkstemp(dir=target.parent, prefix=prefix, suffix=TEMPORARY_SUFFIX)
            os.close(handle)
        except OSError as error:
            raise write_error(target, error) from None
        self.copy = Path(copy)
        try:
            shutil.copyfile(target, self.copy)
            shutil.copymode(target, self.copy)  # the archive keeps its mode (mkstemp's is 0600)
            super().__init__(self.copy, "a", locking="best-effort")
        except OSError as error:
            discard(self.copy)
            raise write_error(target, error) from None

    def __exit__(self, kind, error, traceback) -> None:
        try:
            super().__exit__(kind, error, traceback)  # closing writes what HDF5 still caches
            if error is None:
                fsync_file(self.copy)  # on disk before the rename makes it the file
                os.replace(self.copy, self.target)
                fsync_folder(self.target.parent)
                return
        except (OSError, RuntimeError) as failure:
            error = error or failure
        finally:
            discard(self.copy)
        if file_system_failure(error):
            raise write_error(self.target, error) from None


def file_system_failure(error: BaseException | None) -> bool:
    """An OSError, or HDF5's RuntimeError for a write the file system refused ("file write failed ...
    errno = 28"): a full disk or a quota, not a bug."""
    return isinstance(error, OSError) or (isinstance(error, RuntimeError) and "file write failed" in str(error))
