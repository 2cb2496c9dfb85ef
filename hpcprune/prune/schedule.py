"""Schedules: the sparsity each round aims at.

    hpcprune prune --config configs/quickstart.yaml   # iterative, 3 rounds to 90 %

One-shot prunes once to the target. Iterative removes the same fraction of the *remaining* weights
each round (density shrinks geometrically), so early rounds prune gently and the last round lands
exactly on the target. Gradual is one round whose masks move during fine-tuning (Zhu & Gupta 2017):
pruned to s_i before it, then every Δt optimizer steps from t0 to
s_t = s_f + (s_i - s_f)(1 - (t - t0)/(nΔt))^3, reaching s_f at step t0 + nΔt (hpcprune.prune.gradual).
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


def gradual(schedule: ScheduleConfig, target: float) -> list[float]:
    return [target]  # one round; its mask updates happen inside fine-tuning


def sequential(schedule: ScheduleConfig, target: float) -> list[float]:
    return [target]  # one round, decided block by block (hpcprune.run.sequential)


SCHEDULES: dict[str, Callable[[ScheduleConfig, float], list[float]]] = {
    "oneshot": oneshot,
    "iterative": iterative,
    "gradual": gradual,
    "sequential": sequential,
}


def round_targets(schedule: ScheduleConfig, target: float) -> list[float]:
    """Sparsity to reach at the end of each round, non-decreasing, last == target."""
    return SCHEDULES[schedule.kind](schedule, target)


def gradual_sparsity(schedule: ScheduleConfig, target: float, step: int) -> float | None:
    """s_t after optimizer step `step` (1-based) when that step ends a mask update interval, else None."""
    since_start = step - schedule.start_step
    if since_start <= 0 or since_start % schedule.interval:
        return None
    update = since_start // schedule.interval
    if update > schedule.updates:
        return None
    if update == schedule.updates:
        return target  # the last update is the target itself, not a float approximation of it
    return target + (schedule.initial_sparsity - target) * (1 - update / schedule.updates) ** 3


def gradual_update_within(schedule: ScheduleConfig, target: float, after: int, upto: int) -> tuple[int, float] | None:
    """The last mask update whose step lies in (after, upto], and its s_t: on several ranks one
    optimizer step covers several schedule steps (hpcprune.prune.gradual), and may cross an update."""
    if upto <= schedule.start_step:
        return None
    update = min((upto - schedule.start_step) // schedule.interval, schedule.updates)
    step = schedule.start_step + update * schedule.interval
    if update < 1 or step <= after:
        return None
    return step, gradual_sparsity(schedule, target, step)


def gradual_end(schedule: ScheduleConfig) -> int:
    """The optimizer step of the last mask update: t0 + nΔt."""
    return schedule.start_step + schedule.updates * schedule.interval
