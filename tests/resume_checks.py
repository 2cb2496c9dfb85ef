"""What the preemption tests share: a run long enough to interrupt, and how two runs are compared."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from tests.helpers import assert_same_masks, complete_rounds

# configs/smoke.yaml made interruptible: synthetic data, no dense training, two rounds of six
# fine-tuning epochs (a fraction of a second each on an idle machine, so a signal sent after the
# first one lands well before the last). SGD with momentum, weight decay and a cosine schedule: a
# resume that lost the optimizer or schedule state would train different weights, and round 2's
# masks, chosen from round 1's fine-tuned weights, would differ too.
EPOCHS = 6
INTERRUPTIBLE = (
    "--set", "pretrain.epochs=0", "--set", "schedule.rounds=2", "--set", f"finetune.epochs={EPOCHS}",
    "--set", "data.synthetic_size=4096", "--set", "progress=false",
    "--set", "finetune.optimizer={name: sgd, lr: 0.002, momentum: 0.9, weight_decay: 0.001}",
    "--set", "finetune.lr_schedule.name=cosine",
)
EPOCH_MARKER = f"round 1: epoch 1/{EPOCHS} done"  # logged by rank 0 after each epoch


def events(path: Path) -> list[tuple[str, str]]:
    """(kind, detail) of the archive's /events rows, in order."""
    with h5py.File(path, "r") as archive:
        return [(row["kind"].decode(), row["detail"].decode()) for row in archive["events"][()]]


def assert_same_run(resumed: Path, uninterrupted: Path) -> None:
    """Same complete rounds, masks bit for bit, fine-tuning curves and test figures exactly."""
    assert complete_rounds(resumed) == complete_rounds(uninterrupted) == [1, 2]
    with h5py.File(resumed, "r") as ours, h5py.File(uninterrupted, "r") as theirs:
        for index in (1, 2):
            group = f"rounds/{index:04d}"
            assert np.array_equal(ours[f"{group}/history"][()], theirs[f"{group}/history"][()]), f"round {index} history"
            for key in ("accuracy", "loss", "kept", "threshold"):
                assert np.array_equal(ours[group].attrs[key], theirs[group].attrs[key], equal_nan=True), f"{group} {key}"
    assert_same_masks(resumed, uninterrupted, rounds=(1, 2))
