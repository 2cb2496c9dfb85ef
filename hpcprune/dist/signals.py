"""Preemption: stop at a safe point on SIGUSR1/SIGTERM, checkpoint, requeue, exit with status 75.

    sbatch slurm/prune.sh configs/quickstart.yaml      # SLURM sends SIGUSR1 before the time limit
    scancel --signal=USR1 <job id>                      # or ask for it by hand
    hpcprune prune ...   then Ctrl-C                    # SIGINT: the same stop, no requeue, status 130

A signal only raises a flag (`listen`); the run looks at it at its safe points — between rounds and
after each fine-tuning epoch — through `agreed_to_stop`, one allreduce of the flags, so every rank
stops at the same point even though the signal reached each rank at a different moment. What is
running when the signal lands (scoring, selection, an epoch) finishes first. At the safe point
rank 0 records what resume needs (a complete round is already on disk; mid-fine-tuning see
`hpcprune.train.checkpoint`), then every rank raises `Preempted`.

`exits_when_preempted` turns that into the end of the process: rank 0 appends an "interrupt" event
to the archive, requeues the job when it runs under SLURM (`scontrol requeue $SLURM_JOB_ID`, then a
"requeue" event), lets the archive's lock go, and every rank exits with `PREEMPTED_EXIT` (75,
EX_TEMPFAIL: try again later). The requeued job, or `hpcprune prune --resume` by hand, continues
from the archive; a `--force` run stopped before its first step has replaced the old archive first,
so that what the resume continues is the new run.

SIGINT (Ctrl-C) stops the same way and records the same "interrupt" event, but someone asked the
run to stop rather than the scheduler to make room: nothing is requeued and the status is 130
(128 + SIGINT), unless a preemption signal came too. A second SIGINT stops at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from hpcprune.archive.writer import Archive
from hpcprune.dist.world import World

log = logging.getLogger("hpcprune")

PREEMPTED_EXIT = 75  # sysexits.h EX_TEMPFAIL: the run stopped cleanly and can be continued
INTERRUPTED_EXIT = 128 + signal.SIGINT  # what a shell reports for a command stopped by Ctrl-C
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
# Every signal a run may listen to (submitit's jobs add SIGUSR2): the flags' fixed order in the allreduce.
KNOWN_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)

_received = dict.fromkeys(KNOWN_SIGNALS, 0)  # signal number -> times this process received it


class Preempted(Exception):
    """Every rank stopped at the same safe point; what resume needs is in the archive."""

    def __init__(self, archive: Path, where: str, signals: str):
        super().__init__(f"stopped {where} on {signals}")
        self.archive, self.where, self.signals = Path(archive), where, signals

    @property
    def asked_by_user(self) -> bool:
        """Only SIGINT stopped the run: someone wants it stopped, not requeued."""
        return all(part.startswith(signal.SIGINT.name + " ") for part in self.signals.split(", "))


def listen(signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
    """From now on `signals` ask the run to stop at its next safe point instead of ending the process."""
    for number in signals:
        signal.signal(number, _remember)
        # Restart interrupted system calls: a signal must not fail a blocking read in gloo, MPI or HDF5.
        signal.siginterrupt(number, False)


def _remember(number: int, frame) -> None:
    _received[number] += 1
    if number == signal.SIGINT and _received[number] > 1:  # Ctrl-C twice: do not wait for the safe point
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise KeyboardInterrupt


def agreed_to_stop(world: World) -> str | None:
    """Collective, at a safe point: the signals any rank received (e.g. "SIGUSR1 on 1 rank(s)"), or None."""
    mine = np.array([1 if _received[number] else 0 for number in KNOWN_SIGNALS], dtype=np.int64)
    ranks = world.allreduce_sum(mine)
    if not ranks.any():
        return None
    return ", ".join(f"{number.name} on {int(count)} rank(s)" for number, count in zip(KNOWN_SIGNALS, ranks) if count)


def stop_here(world: World, archive: Path, where: str, save: Callable[[], None] | None = None) -> None:
    """A safe point: if any rank was signalled, rank 0 runs `save` and every rank raises `Preempted`."""
    signals = agreed_to_stop(world)
    if signals is None:
        return
    if save is not None and world.is_root:
        save()
    world.barrier()  # nobody leaves before the checkpoint is on disk
    raise Preempted(archive, where, signals)


# --- leaving: interrupt event, requeue, exit status --------------------------------------------

Requeue = Callable[[], "str | None"]  # requeues this job; says what it did, or None when it could not


def scontrol_requeue() -> str | None:
    """`scontrol requeue $SLURM_JOB_ID` when running as a SLURM batch job; None elsewhere or on failure."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as error:
        detail = str(getattr(error, "stderr", "") or error).strip()
        if "pending execution" in detail:  # `scontrol requeue` from outside: SLURM requeued it already
            return f"job {job} requeued by SLURM"
        log.warning("could not requeue job %s (%s): continue it with --resume", job, detail)
        return None
    return f"scontrol requeue {job}"


@contextlib.contextmanager
def exits_when_preempted(world: World, requeue: Requeue = scontrol_requeue) -> Iterator[None]:
    """Around a run: on `Preempted`, record it, requeue (rank 0) and exit every rank with PREEMPTED_EXIT."""
    try:
        yield
    except Preempted as stop:
        if world.is_root:
            log.warning("%s: %s", stop.archive, stop)
            archive = Archive.at(stop.archive)
            archive.replace_previous_run()
            archive.record_event("interrupt", str(stop))
            # The event comes after the requeue succeeded: the requeue is what SLURM may kill us for
            # (SIGTERM, then SIGKILL after KillWait), and writing a row takes milliseconds.
            requeued = None if stop.asked_by_user else requeue()
            if requeued:
                archive.record_event("requeue", requeued)
            archive.close()
        world.close()
        raise SystemExit(INTERRUPTED_EXIT if stop.asked_by_user else PREEMPTED_EXIT) from None
