"""Failures every rank learns of at the same point: one report, every rank leaves, nobody waits.

    mpirun -n 4 hpcprune prune --config configs/quickstart.yaml --set data.path=/nowhere   # one line, exit 2

A step that may fail on some ranks and not on others (building the job from the user's files, a
pass of selection over a rank's own tensors) ends in a collective that carries each rank's outcome
next to its data: an array of one slot per rank, holding the exit status of a rank that failed.
After that allreduce every rank knows who failed, so all of them raise at the same point: a rank
that failed raises `AgreedFailure` around its own exception (the first of them reports it), every
other rank raises `AgreedFailure` without one. hpcprune.cli then lets the ranks leave together with
the failing rank's status. A failure anywhere else ends the job through `World.abort` instead.

With one rank there is nobody to tell: the exception itself is raised, as without this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np

from hpcprune.dist.world import World
from hpcprune.errors import UsageError

Result = TypeVar("Result")
BUG_EXIT = 1


class AgreedFailure(Exception):
    """Every rank stopped at the same collective because rank `failed_rank` failed.

    `cause` is this rank's own exception when it failed too (None on the ranks that did not), and
    `reports` is True on the one rank that tells the user (the first that failed).
    """

    def __init__(self, failed_rank: int, exit_code: int, cause: BaseException | None, reports: bool):
        super().__init__(f"rank {failed_rank} failed" if cause is None else str(cause))
        self.failed_rank, self.exit_code, self.cause, self.reports = failed_rank, exit_code, cause, reports


def shared(world: World, error: Exception) -> Exception:
    """`error`, to be carried to the other ranks at the next agreed collective; raised at once instead
    where a failed rank is started again alone, unless it refuses the input (a restart would too)."""
    if world.restarts_failed_ranks and not isinstance(error, (UsageError, ValueError)):
        raise error
    return error


def exit_code_of(error: BaseException) -> int:
    return error.exit_code if isinstance(error, UsageError) else BUG_EXIT


def outcome(world: World, failure: BaseException | None) -> np.ndarray:
    """This rank's slots for the allreduce: zeros, or its exit status at its own rank."""
    slots = np.zeros(world.size, dtype=np.int64)
    if failure is not None:
        slots[world.rank] = exit_code_of(failure)
    return slots


def raise_if_any(world: World, failure: BaseException | None, outcomes: np.ndarray) -> None:
    """After the allreduce of every rank's `outcome`: raise on every rank if any rank failed."""
    failed = np.flatnonzero(outcomes)
    if failed.size == 0:
        return
    if world.size == 1:
        raise failure
    first = int(failed[0])
    if failure is not None:
        raise AgreedFailure(first, exit_code_of(failure), failure, reports=world.rank == first) from failure
    raise AgreedFailure(first, int(outcomes[first]), None, reports=False)


def raise_on_every_rank(world: World, error: BaseException) -> None:
    """Raise `error`, which every rank found at the same point from the same figures (sums over all
    ranks): no collective is needed to agree, and rank 0 reports it."""
    if world.size == 1:
        raise error
    raise AgreedFailure(0, exit_code_of(error), error, reports=world.is_root) from error


def agreed(world: World, action: Callable[[], Result]) -> Result:
    """`action()` on every rank, then one allreduce: a failure on any rank is raised on all of them."""
    try:
        result, failure = action(), None
    except Exception as error:  # whatever it is, the other ranks must hear of it rather than wait
        result, failure = None, shared(world, error)
    raise_if_any(world, failure, world.allreduce_sum(outcome(world, failure)))
    return result
