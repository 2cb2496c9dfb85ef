"""Progress bars on rank 0 for the long steps: scoring with selection (per tensor) and archive writing.

    hpcprune prune --config configs/quickstart.yaml                   # bars when stderr is a terminal
    hpcprune prune --config configs/quickstart.yaml --set progress=false

tqdm switches itself off when stderr is not a terminal (batch jobs, log files), and `progress: false`
switches it off everywhere. Fine-tuning has its own per-batch bar (`hpcprune.train.finetune`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from tqdm import tqdm


def bar(iterable: Iterable | None = None, *, enabled: bool, description: str, unit: str, total: int | None = None) -> tqdm:
    # disable=None: on only when stderr is a terminal.
    return tqdm(iterable, total=total, desc=description, unit=unit, leave=False, disable=None if enabled else True)


class _ScoringProgress(Mapping[str, torch.Tensor]):
    """Scores that advance a bar each time selection reads a tensor's scores.

    Selection reads every tensor once per pass (usually two passes, at most four); a tensor read
    again means the next pass has begun, and the bar starts over under the pass's number. Nothing
    is held here, so lazily computed scores still live one tensor at a time.
    """

    def __init__(self, scores: Mapping[str, torch.Tensor], description: str, enabled: bool):
        self._scores, self._description, self._pass, self._read = scores, description, 1, set()
        self.bar = bar(enabled=enabled, description=f"{description}, pass 1", unit="tensor", total=len(scores))

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._read:
            self._pass += 1
            self._read.clear()
            self.bar.reset()
            self.bar.set_description(f"{self._description}, pass {self._pass}")
        self._read.add(name)
        scores = self._scores[name]
        self.bar.update(1)
        return scores

    def __iter__(self) -> Iterator[str]:
        return iter(self._scores)

    def __len__(self) -> int:
        return len(self._scores)


@contextlib.contextmanager
def scoring_progress(scores: Mapping[str, torch.Tensor], description: str, enabled: bool) -> Iterator[Any]:
    """`scores` wrapped so that selection's reads show as a bar, closed when selection is done."""
    wrapped = _ScoringProgress(scores, description, enabled)
    try:
        yield wrapped
    finally:
        wrapped.bar.close()
