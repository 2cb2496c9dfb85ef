"""Step 4 — plan: which tensors are prunable, in which fixed global order, and which rank owns each.

The global order (the model's `named_parameters` order) decides tie-breaking in selection, so it
must be the same on every rank; the owner of a tensor is the only rank that scores it.
"""

from __future__ import annotations

import fnmatch
import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from hpcprune.config import PruneConfig
from hpcprune.errors import UsageError

PRUNABLE_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class TensorSpec:
    index: int  # position in the global order
    name: str  # parameter name, e.g. "fc1.weight"
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Plan:
    tensors: tuple[TensorSpec, ...]
    owners: tuple[int, ...]  # owners[i] is the rank that scores tensors[i]

    @property
    def total(self) -> int:
        return sum(spec.numel for spec in self.tensors)

    def local(self, rank: int) -> list[TensorSpec]:
        """The tensors `rank` scores, in global order."""
        return [spec for spec, owner in zip(self.tensors, self.owners) if owner == rank]

    def by_name(self, name: str) -> TensorSpec:
        return next(spec for spec in self.tensors if spec.name == name)


def module_candidates(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """Weights of Linear/Conv modules, in `named_parameters` order."""
    weights = {
        f"{module_name}.weight" if module_name else "weight"
        for module_name, module in model.named_modules()
        if isinstance(module, PRUNABLE_MODULES)
    }
    return [(name, tuple(parameter.shape)) for name, parameter in model.named_parameters() if name in weights]


def prunable_tensors(candidates: list[tuple[str, tuple[int, ...]]], prune: PruneConfig) -> tuple[TensorSpec, ...]:
    """The candidates minus the excluded names, numbered in order."""
    kept = [(name, shape) for name, shape in candidates
            if not any(fnmatch.fnmatchcase(name, pattern) for pattern in prune.exclude)]
    if not kept:
        raise UsageError(f"model has no prunable tensors (Linear/Conv weights) after prune.exclude={prune.exclude}")
    return tuple(TensorSpec(index, name, shape) for index, (name, shape) in enumerate(kept))


def assign_owners(tensors: tuple[TensorSpec, ...], world_size: int,
                  cost: Callable[[TensorSpec], int] = lambda spec: spec.numel) -> tuple[int, ...]:
    """Costliest tensor first (default: the largest) onto the least-loaded rank; ties go to the lower
    rank, so it is deterministic. `tensors` are numbered 0..n-1 by their `index`."""
    owners = [0] * len(tensors)
    loads = [(0, rank) for rank in range(world_size)]
    for spec in sorted(tensors, key=lambda spec: (-cost(spec), spec.index)):
        load, rank = heapq.heappop(loads)
        owners[spec.index] = rank
        heapq.heappush(loads, (load + cost(spec), rank))
    return tuple(owners)


def make_plan(model: nn.Module | list[tuple[str, tuple[int, ...]]], prune: PruneConfig, world_size: int) -> Plan:
    """Plan for a model's Linear/Conv weights, or for an explicit list of (name, shape) candidates."""
    candidates = module_candidates(model) if isinstance(model, nn.Module) else model
    tensors = prunable_tensors(candidates, prune)
    return Plan(tensors, assign_owners(tensors, world_size))
