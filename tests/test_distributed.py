"""Real ranks under mpirun and torchrun: masks bit-identical to one process for every criterion and
rule, DDP replicas identical with pruned weights at exactly zero, and failures that end every rank."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from tests.helpers import (
    CONFIGS,
    archive_masks,
    assert_same_masks,
    driver,
    launch,
    torchrun,
)

CRITERIA_THRESHOLDS = {"magnitude": 0.02, "relative": 0.002, "random": 0.5}
CASES = [
    f"{criterion}-{rule}:prune.criterion={criterion};prune.rule={rule}"
    + (f";prune.threshold={threshold}" if rule == "threshold" else "")
    for criterion, threshold in CRITERIA_THRESHOLDS.items()
    for rule in ("global", "layer", "threshold")
] + [
    "tied-global:model.name=tests.fixture_models:tied_mlp",
    "tied-layer:model.name=tests.fixture_models:tied_mlp;prune.rule=layer",
    "tied-relative:model.name=tests.fixture_models:tied_mlp;prune.criterion=relative;prune.sparsity=0.55",
    "excluded:prune.exclude=[conv1.weight, fc3.weight];prune.sparsity=0.9",
    # calibrated criteria (statistics summed over ranks), group rules and layer protection
    "wanda-row:prune.criterion=wanda;prune.rule=row",
    "taylor-global:prune.criterion=taylor;calibration.batch_size=48",
    "snip-layer:prune.criterion=snip;prune.rule=layer;calibration.batch_size=48",
    # fewer calibration batches than ranks (a rank without any), and 3 batches on 2 or 4 ranks
    "wanda-one-batch:prune.criterion=wanda;prune.rule=row;calibration.batches=1",
    "snip-three-batches:prune.criterion=snip;calibration.batches=3;calibration.batch_size=40",
    "lamp-global:prune.criterion=lamp",
    "nm-2of4:prune.rule=nm;prune.sparsity=0.5;prune.exclude=[conv1.weight, conv2.weight]",
    "protected:prune.min_density=0.3;prune.sparsity=0.6",
    # whole channels: residual branches owned by different ranks, and six channel norms tied at the boundary
    "channel-global:model.name=resnet8;prune.granularity=channel;prune.criterion=l1;prune.batchnorm_scale=true;prune.sparsity=0.5",
    "channel-layer:model.name=resnet8;prune.granularity=channel;prune.criterion=l2;prune.rule=layer;prune.sparsity=0.5",
    "channel-threshold:model.name=resnet8;prune.granularity=channel;prune.criterion=l1;prune.rule=threshold;prune.threshold=8.7",
    "channel-tied:model.name=tests.fixture_models:tied_mlp;prune.granularity=channel;prune.criterion=l1;prune.sparsity=0.3",
]


@pytest.fixture(scope="module")
def single_process_masks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("size1")
    finished = launch(driver("masks", str(out), *CASES))
    assert finished.returncode == 0, finished.stderr
    return out


def assert_same_masks_of_every_case(mine: Path, reference: Path) -> None:
    """Every case's archive in folder `mine` holds round 1's masks of the one in `reference`, bit for bit."""
    for case in CASES:
        name = case.partition(":")[0]
        assert_same_masks(mine / f"{name}.h5", reference / f"{name}.h5", rounds=(1,))


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_masks_are_bit_identical_under_mpirun(mpirun, mpi4py, single_process_masks, tmp_path, ranks):
    finished = launch([mpirun, "-n", str(ranks), *driver("masks", str(tmp_path), *CASES)])
    assert finished.returncode == 0, finished.stderr
    assert_same_masks_of_every_case(tmp_path, single_process_masks)
    with h5py.File(tmp_path / "tied-global.h5", "r") as archive:
        assert archive.attrs["world_size"] == ranks and archive.attrs["backend"] == "mpi"


def test_masks_are_bit_identical_under_torchrun(single_process_masks, tmp_path):
    finished = launch(torchrun(2, *driver("masks", str(tmp_path), *CASES)[1:]))
    assert finished.returncode == 0, finished.stderr
    assert_same_masks_of_every_case(tmp_path, single_process_masks)
    with h5py.File(tmp_path / "tied-global.h5", "r") as archive:
        assert archive.attrs["backend"] == "torch"


def test_tied_case_really_has_ties_at_the_threshold(single_process_masks):
    with h5py.File(single_process_masks / "tied-global.h5", "r") as archive:
        attrs = archive["rounds/0001"].attrs
        assert int(attrs["kept"]) == int(attrs["total"]) - round(0.8 * int(attrs["total"]))
        # Weights take the values k/4, so the boundary score is one of them and is shared by
        # thousands of weights: only the position rule decides which of them stay.
        assert float(attrs["threshold"]) in (0.0, 0.25, 0.5, 0.75)


def test_ddp_replicas_agree_and_pruned_weights_stay_zero(mpirun, mpi4py, tmp_path):
    from hpcprune.config import load_config
    from hpcprune.dist.world import SingleWorld
    from hpcprune.models.builders import build_model, load_state_file
    from hpcprune.models.data import load_data
    from hpcprune.train.finetune import evaluate

    finished = launch([mpirun, "-n", "2", *driver("train", str(tmp_path), str(CONFIGS / "smoke.yaml"),
                                                   "data.synthetic_size=1536", "finetune.epochs=2")])
    assert finished.returncode == 0, finished.stderr
    replicas = [load_state_file(str(tmp_path / f"rank{rank}.safetensors")) for rank in (0, 1)]
    assert replicas[0].keys() == replicas[1].keys()
    assert all(torch.equal(replicas[0][name], replicas[1][name]) for name in replicas[0])

    masks = archive_masks(tmp_path / "run.h5", 3)
    for name, packed in masks.items():
        weight = replicas[0][name]
        keep = np.unpackbits(packed, count=weight.numel()).astype(bool)
        assert torch.count_nonzero(weight.flatten()[torch.from_numpy(~keep)]) == 0, name

    # The recorded accuracy covers the whole test set (both ranks' halves), so one process
    # evaluating the final weights on all of it must find the same number.
    config = load_config(CONFIGS / "smoke.yaml", ["data.synthetic_size=1536"])
    splits = load_data(config.data, config.seed)
    model = build_model(config.model)
    model.load_state_dict(replicas[0])
    _, accuracy = evaluate(model, splits.test, world=SingleWorld(), device=torch.device("cpu"), batch_size=256)
    with h5py.File(tmp_path / "run.h5", "r") as archive:
        assert archive["rounds/0003"].attrs["accuracy"] == pytest.approx(accuracy, abs=1e-12)
        assert archive.attrs["world_size"] == 2
        assert len(archive["rounds/0003/history"]) == 2


@pytest.mark.parametrize("stage, overrides, message", [
    ("scoring", ["prune.criterion=explode"], "injected failure during scoring"),
    ("fine-tuning", ["model.name=tests.fixture_models:FailsInTraining", "pretrain.epochs=0"], "injected failure during fine-tuning"),
])
def test_a_failing_rank_ends_every_rank(mpirun, mpi4py, tmp_path, stage, overrides, message):
    command = [mpirun, "-n", "3", *driver("cli", "prune", "--config", str(CONFIGS / "smoke.yaml"),
                                           "--out", str(tmp_path / "run.h5"), *[f"--set={o}" for o in overrides])]
    started = time.monotonic()
    finished = launch(command, timeout=120, env={"HPCPRUNE_TEST_FAIL_RANK": "1"})
    assert time.monotonic() - started < 60
    assert finished.returncode != 0
    output = finished.stdout + finished.stderr
    assert output.count(f"RuntimeError: {message}") == 1, output  # the traceback once, from rank 1 only
    assert "[rank 1]" in output


def test_mpirun_cli_end_to_end_with_ddp(mpirun, mpi4py, tmp_path):
    """The documented recipe: `mpirun -n 2 hpcprune prune ...` with dense training and fine-tuning."""
    out = tmp_path / "run.h5"
    finished = launch([mpirun, "-n", "2", sys.executable, "-m", "hpcprune", "prune",
                       "--config", str(CONFIGS / "smoke.yaml"), "--out", str(out)])
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.count("75.0000 % achieved") == 1  # only rank 0 prints the summary
    with h5py.File(out, "r") as archive:
        assert [archive[f"rounds/{r:04d}"].attrs["status"] for r in (1, 2, 3)] == ["complete"] * 3


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_checkpoint_mode_reads_only_own_tensors_and_gives_the_same_masks(mpirun, mpi4py, single_process_masks, tmp_path, ranks):
    """Masks-only from a safetensors file (each rank reads its own tensors) equal the module run's."""
    weights = single_process_masks / "magnitude-global.h5.states" / "dense.safetensors"
    out = tmp_path / "masks.h5"
    cli = [sys.executable, "-m", "hpcprune", "prune", "--config", str(CONFIGS / "oneshot_global.yaml"), "--out", str(out),
           "--set", "model.name=checkpoint", "--set", f"model.checkpoint={weights}"]
    finished = launch(cli if ranks == 1 else [mpirun, "-n", str(ranks), *cli])
    assert finished.returncode == 0, finished.stderr
    ours, theirs = archive_masks(out, 1), archive_masks(single_process_masks / "magnitude-global.h5", 1)
    assert sorted(ours) == sorted(theirs)
    assert all(np.array_equal(ours[name], theirs[name]) for name in ours)
    with h5py.File(out, "r") as archive:
        assert archive.attrs["world_size"] == ranks and archive["model"].attrs["name"] == "checkpoint"
    assert "80.0000 % achieved" in finished.stdout and "accuracy" not in finished.stdout  # nothing was evaluated
