"""One writer per archive: an exclusive OS lock on `<archive>.lock`, held by the writer for its whole life.

    hpcprune prune --config configs/quickstart.yaml --force &
    hpcprune prune --config configs/quickstart.yaml --force    # hpcprune: error: runs/hpcprune.h5 is in use by pid ...

The archive itself cannot carry the lock: every update replaces it by a rename, and a lock belongs to
the file it was taken on. So the writer (rank 0 of a run, or `hpcprune export` while it records)
takes a POSIX record lock (`fcntl.lockf`, F_SETLK) on a lock file beside the archive and writes its
host, pid and start time into it, which a refused writer quotes. Why this lock and not another:

- the kernel drops it when the process ends, SIGKILL and OOM kills included: nothing to clean up;
- a forked child (a DataLoader worker, a local dask worker) does not inherit it, so a child that
  outlives a killed run never keeps the archive locked (flock locks would be inherited);
- it is the lock that network file systems implement across nodes: NFSv3 through lockd (NLM),
  NFSv4 natively, Lustre when mounted with `-o flock` (`localflock` makes it node-local only),
  GPFS and BeeGFS cluster-wide. Where a file system refuses locks (Lustre's default `noflock`,
  an NFS mount without lockd) the writer goes on unlocked and says so in a warning, as HDF5's
  own `locking="best-effort"` does.

POSIX locks are per process and released when the process closes *any* descriptor of the file, so
the holder opens the lock file once and never again, and a second writer within one process shares
the first one's lock (it is the same writer). On a clean release the holder removes the lock file
while still holding it; a newcomer checks after locking that the name still leads to the file it
locked, so it never holds the lock of a removed file.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from hpcprune.archive.atomic import write_error
from hpcprune.archive.side_files import lock_file
from hpcprune.errors import UsageError

log = logging.getLogger("hpcprune")

HELD_ELSEWHERE = (errno.EACCES, errno.EAGAIN)
NO_LOCKS_HERE = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)
HOLDER_WAIT_S = 1.0  # how long a refused writer waits for a new holder to have written its line


class ArchiveLock:
    """This process's exclusive lock on one archive; `release` ends it (and the process's end does)."""

    def __init__(self, archive: Path, path: Path, descriptor: int, locked: bool):
        self.archive, self.path, self.descriptor, self.locked = archive, path, descriptor, locked

    def release(self) -> None:
        if self.descriptor < 0:
            return
        _HELD.pop(_key(self.path), None)
        try:
            if self.locked and _same_file(self.descriptor, self.path):
                self.path.unlink()  # while still locked: nobody can take the lock of the file being removed
        except OSError:
            pass
        finally:
            os.close(self.descriptor)
            self.descriptor = -1


_HELD: dict[str, ArchiveLock] = {}


def lock_archive(archive: str | Path) -> ArchiveLock:
    """Take the archive's lock, or refuse in one line naming the process that holds it. Within one
    process there is one lock per archive: asking again gives the same one (a second descriptor's
    close would end the first one's POSIX lock)."""
    archive = Path(archive)
    path = lock_file(archive)
    held = _HELD.get(_key(path))
    if held is not None:
        return held
    while True:
        descriptor = _open(archive, path)
        try:
            fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in HELD_ELSEWHERE:
                holder = _holder(descriptor)
                os.close(descriptor)
                raise UsageError(f"{archive} is in use by {holder}; wait until it ends or stop it") from None
            if error.errno not in NO_LOCKS_HERE:
                os.close(descriptor)
                raise UsageError(f"cannot lock {archive}: {path}: {os.strerror(error.errno)}") from None
            log.warning("%s: the file system refuses locks (%s): a second writer of this archive would not be "
                        "detected", path, os.strerror(error.errno))
            lock = ArchiveLock(archive, path, descriptor, locked=False)
            break
        if _same_file(descriptor, path):
            lock = ArchiveLock(archive, path, descriptor, locked=True)
            try:
                _write_holder(descriptor)
            except OSError as error:  # a full disk, a quota
                lock.release()
                raise write_error(path, error) from None
            break
        os.close(descriptor)  # its holder removed the file between our open and our lock: take the new one
    _HELD[_key(path)] = lock
    return lock


def holds(archive: str | Path) -> bool:
    """Whether this process holds the lock of `archive`."""
    return _key(lock_file(archive)) in _HELD


def _key(path: Path) -> str:
    return str(path.absolute())


def _open(archive: Path, path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as error:
        raise UsageError(f"cannot lock {archive}: cannot create {path}: {error.strerror or error}") from None


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        mine, named = os.fstat(descriptor), os.stat(path)
    except FileNotFoundError:
        return False
    return (mine.st_dev, mine.st_ino) == (named.st_dev, named.st_ino)


def _write_holder(descriptor: int) -> None:
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    program = Path(sys.argv[0])
    name = program.parent.name if program.name == "__main__.py" else program.name  # python -m hpcprune
    command = " ".join([name, *sys.argv[1:2]])  # "hpcprune prune", "hpcprune export": what holds the archive
    line = f"pid {os.getpid()} on {socket.gethostname()} since {started} ({command})\n".encode()
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, line, 0)
    os.fsync(descriptor)


def _holder(descriptor: int) -> str:
    """The holder's line; a holder that has just taken the lock may not have written it yet."""
    deadline = time.monotonic() + HOLDER_WAIT_S
    while True:
        line = os.pread(descriptor, 4096, 0).decode(errors="replace").strip()
        if line or time.monotonic() >= deadline:
            return line or "another process (which has not written its name yet)"
        time.sleep(0.05)
