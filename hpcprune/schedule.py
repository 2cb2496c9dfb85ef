"""Schedules: the sparsity each round aims at.

    hpcprune prune --config configs/quickstart.yaml   # iterative, 3 rounds to 90 %

One-shot prunes once to the target. Iterative removes the same fraction of the *remaining* weights
each round (density shrinks geometrically), so early rounds prune gently and the last round lands
exactly on the target.
"""

from __future__ import annotations

from collections.abc import Callable

from hpcprune.config import ScheduleConfig


def oneshot(schedule: ScheduleConfig, target: float) -> list[float]:
    return [target]


def iterative(schedule: ScheduleConfig, target: float) -> list[float]:
    rounds = schedule.rounds
    density = 1.0 - target
    steps = [1.0 - density ** ((step + 1) / rounds) for step in range(rounds - 1)]
    return steps + [target]  # the last round is the target itself, not a float approximation of it


SCHEDULES: dict[str, Callable[[ScheduleConfig, float], list[float]]] = {
    "oneshot": oneshot,
    "iterative": iterative,
}


def round_targets(schedule: ScheduleConfig, target: float) -> list[float]:
    """Sparsity to reach at the end of each round, non-decreasing, last == target."""
    return SCHEDULES[schedule.kind](schedule, target)
