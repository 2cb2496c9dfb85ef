"""The files of one fanned-out round: what the coordinator and its tasks say to each other.

    hpcprune prune --config configs/oneshot_global.yaml --set fanout.backend=dask

`<archive>.fanout/` (`hpcprune.archive.side_files`) holds round.json (the `RoundDescription`), stage-<s>/part-<rank>.npy (each
task's contribution to the stage's allreduce) and reduced.npy (their sum), result-<rank>.masks (a
task's masks: a file of `hpcprune.archive.wire` messages, one per mask, written and read one at a
time) and error-<rank>.txt (what a task refused). Every file is written aside and renamed, so which
files exist says which tasks answered which stage (see `hpcprune.run.fanout`).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from hpcprune.archive.atomic import write_atomically
from hpcprune.archive.wire import MaskMessage, read_messages
from hpcprune.errors import UsageError
from hpcprune.prune.mask_store import store_masks
from hpcprune.prune.plan import Plan, TensorSpec, assign_owners
from hpcprune.prune.selection import Selection

POLL_S = 0.05
"""How often a waiting task and the coordinator look for the files they wait for."""

# What a task may refuse with, re-raised by the coordinator as the same kind (UsageError first).
REFUSALS: dict[str, type[Exception]] = {"UsageError": UsageError, "ValueError": ValueError}


@dataclass(frozen=True)
class RoundDescription:
    """Everything a task needs to select its shard, written once by the coordinator as round.json."""

    config: str  # the run's resolved config (YAML): criterion, rule and its options, seed
    target: float  # the sparsity this selection prunes to
    shards: int
    tensors: list[tuple[str, tuple[int, ...]]]  # every prunable tensor (name, shape), in global order
    weights: str  # safetensors file holding at least the prunable tensors
    previous: str | None = None  # earlier masks (a hpcprune.archive.wire message), or None
    linger_s: float = 0.0  # how long a task waits for a stage's sum before it stops

    def plan(self) -> Plan:
        """The plan over `shards` ranks: the same split a world of that size would make."""
        specs = tuple(TensorSpec(index, name, tuple(shape)) for index, (name, shape) in enumerate(self.tensors))
        return Plan(specs, assign_owners(specs, self.shards))


class RoundFiles:
    """The folder of one round: round.json, stage-<s>/part-<rank>.npy and reduced.npy, result-<rank>.npz."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def describe(self, description: RoundDescription) -> None:
        write_atomically(self.folder / "round.json", lambda file: file.write(json.dumps(asdict(description)).encode()))

    def description(self) -> RoundDescription:
        fields = json.loads((self.folder / "round.json").read_text())
        fields["tensors"] = [(name, tuple(shape)) for name, shape in fields["tensors"]]
        return RoundDescription(**fields)

    def _stage(self, stage: int) -> Path:
        return self.folder / f"stage-{stage:03d}"

    def part_path(self, stage: int, rank: int) -> Path:
        return self._stage(stage) / f"part-{rank:05d}.npy"

    def reduced_path(self, stage: int) -> Path:
        return self._stage(stage) / "reduced.npy"

    def result_path(self, rank: int) -> Path:
        return self.folder / f"result-{rank:05d}.masks"

    def error_path(self, rank: int) -> Path:
        return self.folder / f"error-{rank:05d}.txt"

    def write_part(self, stage: int, rank: int, array: np.ndarray) -> None:
        write_atomically(self.part_path(stage, rank), lambda file: np.save(file, np.ascontiguousarray(array)))

    def reduced(self, stage: int, wait_s: float = 0.0) -> np.ndarray | None:
        """The sum of `stage`, waiting up to `wait_s` seconds for the coordinator to store it; else None."""
        path, deadline = self.reduced_path(stage), time.monotonic() + wait_s
        while not path.exists():
            if time.monotonic() >= deadline:
                return None
            time.sleep(POLL_S)
        return np.load(path)

    def write_result(self, rank: int, selection: Selection, specs: list[TensorSpec]) -> None:
        """The task's kept total and threshold, then its masks one message each (written one at a time)."""
        write_atomically(self.result_path(rank), lambda file: write_masks(file, selection.masks, specs,
                                                                           kept=selection.kept, threshold=selection.threshold))

    @contextlib.contextmanager
    def result(self, rank: int) -> Iterator[tuple[dict, Iterator[tuple[str, np.ndarray]]]]:
        """A task's facts (kept, threshold), and its masks as they are read, one at a time."""
        with open(self.result_path(rank), "rb") as file:
            facts, masks = read_masks(file)
            yield facts, masks

    def write_error(self, rank: int, error: Exception) -> None:
        line = json.dumps([type(error).__name__, f"shard {rank}: {error}"])
        write_atomically(self.error_path(rank), lambda file: file.write(line.encode()))

    def raise_errors(self, shards: int) -> None:
        """Raise what the tasks refused, as the selection raised it (UsageError before ValueError)."""
        errors = [json.loads(self.error_path(rank).read_text()) for rank in range(shards)
                  if self.error_path(rank).exists()]
        if errors:
            kind = min((kind for kind, _ in errors), key=list(REFUSALS).index)
            raise REFUSALS[kind]("; ".join(message for _, message in errors))

    def answered(self, stage: int, rank: int) -> bool:
        """Whether `rank` left its answer to `stage`: its contribution, its masks, or its error."""
        return any(path.exists() for path in (self.part_path(stage, rank), self.result_path(rank), self.error_path(rank)))


def write_masks(file: BinaryIO, masks: Mapping[str, np.ndarray], specs: Iterable[TensorSpec], **facts) -> None:
    """A file of wire messages: one of `facts` alone, then one per mask of `specs` (compressed in turn)."""
    MaskMessage({}, facts).write_to(file)
    for spec in specs:
        MaskMessage.of_packed({spec.name: masks[spec.name]}).write_to(file)


def read_masks(file: BinaryIO) -> tuple[dict, Iterator[tuple[str, np.ndarray]]]:
    """What write_masks wrote: its facts, and its masks as (name, packed bits), read as they are asked for."""
    messages = read_messages(file)
    first = next(messages, None)
    if first is None:
        raise ValueError(f"{getattr(file, 'name', 'masks file')} is empty")
    return first.facts, (item for message in messages for item in message.packed().items())


def previous_masks(path: str | None, specs: list[TensorSpec]) -> Mapping[str, np.ndarray]:
    """The earlier masks of this shard's tensors, read one at a time from the round's file."""
    if path is None:
        return {}
    wanted = {spec.name for spec in specs}
    with open(path, "rb") as file:
        _, masks = read_masks(file)
        return store_masks(specs, ((name, bits) for name, bits in masks if name in wanted))
