"""Files that appear whole or not at all, and the one way hpcprune refuses to touch an output.

    hpcprune export run.h5 --format sparse --out model.safetensors   # written beside, then renamed

Every file hpcprune writes for a later reader (model states, training states, exports, plots, the
report, masks files, fan-out messages, a new archive) is written under a temporary name in the
target's own folder, flushed to disk (fsync), renamed over the target, and the folder's entry is
flushed too: after a kill, a full disk or a power cut, a reader finds the old file or the complete
new one, never a mix, and on a shared filesystem the data is there before the name. The temporary
is created by `mkstemp` (a unique name, so concurrent writers never share one) and then given the
mode the umask gives a new file, since mkstemp's 0600 would otherwise stay on the result.

A write that fails for a reason of the filesystem (full, read-only, a quota, a path through a
file) is refused with one `UsageError` naming the file; the temporary is removed either way. And no
command writes over one of its own inputs (`refuse_own_input`): an export, a masks file, a report or
plots aimed at the archive they read, or into its side folders, are refused before any work.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from hpcprune.errors import UsageError

TEMPORARY_SUFFIX = ".tmp"
RANDOM_PART = 8  # characters mkstemp puts between the prefix and the suffix
NAME_MAX = 255  # bytes in one name, where the filesystem does not say (Linux, macOS and most others)


@contextlib.contextmanager
def replace_atomically(target: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary path beside `target` to write to; once the block succeeds it becomes `target`."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=target.parent, prefix=_temporary_prefix(target), suffix=TEMPORARY_SUFFIX)
        os.close(handle)
    except OSError as error:
        raise write_error(target, error) from None
    temporary = Path(name)
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~current_umask())
        fsync_file(temporary)
        os.replace(temporary, target)
        fsync_folder(target.parent)
    except OSError as error:
        raise write_error(target, error) from None
    finally:
        discard(temporary)


def write_atomically(target: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """`write(file)` into a temporary beside `target`, which then replaces `target` (see above)."""
    with replace_atomically(target) as temporary, open(temporary, "wb") as file:
        write(file)


def _temporary_prefix(target: Path) -> str:
    return f".{target.name}."


def refuse_existing(out: str | os.PathLike, force: bool) -> None:
    """Without --force an existing output file is never touched."""
    check_output_path(out)
    if Path(out).exists() and not force:
        raise UsageError(f"{out} exists; pass --force to overwrite it")


def check_output_path(out: str | os.PathLike, *side_paths: str | os.PathLike) -> None:
    """Refuse in one line, before anything is written, an output (or a path derived from it: its
    temporary, its side folders) with a name longer than its filesystem holds."""
    out = Path(out)
    limit = _name_max(out)
    for path in (out, *map(Path, side_paths)):
        for part in path.parts:
            if len(os.fsencode(part)) > limit:
                raise UsageError(f"{out}: the name {_shortened(part)} is {len(os.fsencode(part))} bytes; "
                                 f"the filesystem holds names of at most {limit}")
    temporary = len(os.fsencode(_temporary_prefix(out))) + RANDOM_PART + len(TEMPORARY_SUFFIX)
    if temporary > limit:
        raise UsageError(f"{out}: the name is {len(os.fsencode(out.name))} bytes, too long to be written "
                         f"under a temporary name first; use at most {limit - temporary + len(os.fsencode(out.name))}")


def _name_max(path: Path) -> int:
    """The longest name (in bytes) the filesystem of `path`'s nearest existing folder holds."""
    folder = path.absolute().parent
    while not _is_folder(folder) and folder != folder.parent:
        folder = folder.parent
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return NAME_MAX


def _is_folder(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a component of it is too long, or not a folder
        return False


def _shortened(name: str) -> str:
    return repr(name if len(name) <= 40 else f"{name[:20]}...{name[-12:]}")


def refuse_own_input(out: str | os.PathLike, *, files: Iterable[str | os.PathLike] = (),
                     folders: Iterable[str | os.PathLike] = (), option: str = "--out") -> None:
    """Refuse an output that is one of the command's input `files`, or is or lies inside one of its
    input `folders` (an archive's side folders, a model folder). Paths are compared resolved (links, "..", another
    spelling of the same path) and, for files that exist, with os.path.samefile (hard links)."""
    out = Path(out)
    target = out.resolve()
    for source in map(Path, files):
        if target == source.resolve() or _same_existing(out, source):
            raise UsageError(f"{option} {out}: is {source}, which this command reads; write the output elsewhere")
    for folder in map(Path, folders):
        inside = folder.resolve()
        if target == inside or inside in target.parents:
            raise UsageError(f"{option} {out}: lies in {folder}, which this command reads; write the output elsewhere")


def _same_existing(first: Path, second: Path) -> bool:
    try:
        return os.path.samefile(first, second)
    except OSError:  # either does not exist (yet): only the resolved paths can tell
        return False


def fsync_file(path: Path) -> None:
    """The file's data on disk (a read-only descriptor is enough for fsync)."""
    with open(path, "rb") as written:
        os.fsync(written.fileno())


def fsync_folder(folder: Path) -> None:
    """The folder's entries on disk: a rename is durable only once its folder is synced."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError:  # some filesystems (and Windows) cannot sync a folder; the rename itself stands
        pass
    finally:
        os.close(descriptor)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def discard(path: Path) -> None:
    """Remove a temporary file if it is there (unlink(missing_ok) still fails on a read-only file system)."""
    if path.exists():
        path.unlink()


def write_error(path: Path, error: OSError | RuntimeError) -> UsageError:
    """A full disk, a quota, a read-only folder: one line with the file and the system's reason."""
    found = re.search(r"errno = (\d+)", str(error))
    code = getattr(error, "errno", None) or (int(found.group(1)) if found else None)
    return UsageError(f"cannot write {path}: {os.strerror(code) if code else str(error).splitlines()[0]}")
