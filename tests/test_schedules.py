"""Gradual pruning (Zhu & Gupta), lottery-ticket rewinding and distillation, from formulas to archives.

    python -m pytest tests/test_schedules.py -q
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hpcprune.archive.codec import unpack_mask
from hpcprune.config import DistillConfig, ScheduleConfig, load_config, validate_tree
from hpcprune.dist.world import SingleWorld
from hpcprune.errors import UsageError
from hpcprune.models.builders import build_model, load_state_file
from hpcprune.models.data import load_data
from hpcprune.models.weights import ModelWeights
from hpcprune.prune.gradual import GradualPruner, fine_tuning_steps, schedule_steps
from hpcprune.prune.plan import make_plan
from hpcprune.prune.rules import select
from hpcprune.prune.schedule import gradual_end, gradual_sparsity, gradual_update_within
from hpcprune.prune.scoring import LazyScores, ScoreContext
from hpcprune.prune.selection import prune_count
from hpcprune.run.pipeline import run
from hpcprune.train.distill import DistillationLoss
from hpcprune.train.finetune import train
from tests.helpers import (
    CONFIGS,
    archive_masks,
    assert_same_masks,
    driver,
    launch,
    torchrun,
)

GRADUAL = ScheduleConfig(kind="gradual", initial_sparsity=0.1, start_step=3, interval=4, updates=5)


def test_gradual_sparsity_follows_the_cubic_and_ends_on_the_target_at_its_end_step():
    target = 0.9
    updates = {step: gradual_sparsity(GRADUAL, target, step) for step in range(1, 40)}
    update_steps = [step for step, s in updates.items() if s is not None]
    assert update_steps == [3 + 4 * k for k in range(1, 6)] and gradual_end(GRADUAL) == 23 == update_steps[-1]
    for k, step in enumerate(update_steps, start=1):
        expected = target + (0.1 - target) * (1 - (step - 3) / (5 * 4)) ** 3
        assert updates[step] == pytest.approx(expected, abs=1e-15)
    assert updates[23] == target  # exactly, not a float approximation
    sparsities = [updates[step] for step in update_steps]
    assert sparsities == sorted(sparsities) and sparsities[0] > 0.1


def gradual_training(tmp_path, schedule: ScheduleConfig, target: float):
    """LeNet-300 on synthetic data, fine-tuned with a real GradualPruner doing magnitude selections."""
    config = validate_tree({"data": {"dataset": "synthetic", "synthetic_size": 512, "batch_size": 32},
                            "schedule": schedule.model_dump(), "finetune": {"epochs": 2}}, "test")
    splits = load_data(config.data, 0)
    torch.manual_seed(0)
    model = build_model(config.model)
    plan = make_plan(model, config.prune, 1)
    masks: dict[str, np.ndarray] = {}
    seen = []

    def reselect(sparsity):
        scores = LazyScores("magnitude", plan.local(0), ModelWeights(model), ScoreContext(seed=0), previous=masks)
        selection = select("global", scores, plan, SingleWorld(), sparsity=sparsity)
        masks.update(selection.masks)
        bool_masks = {spec.name: unpack_mask(masks[spec.name], spec.shape) for spec in plan.tensors}
        seen.append((pruner.step, sparsity, selection.kept))
        return selection, bool_masks

    pruner = GradualPruner.for_round(config, model, splits, SingleWorld(), target, reselect, seed=1)
    start = {spec.name: torch.ones(spec.shape, dtype=torch.bool) for spec in plan.tensors}
    train(model, splits.train, None, config.finetune, world=SingleWorld(), device=torch.device("cpu"), seed=1,
          batch_size=32, eval_batch_size=256, masks=start, after_step=pruner)
    return model, plan, masks, seen, pruner


def test_gradual_pruner_reaches_the_target_at_the_end_step_and_keeps_it_to_the_end(tmp_path):
    model, plan, masks, seen, pruner = gradual_training(tmp_path, GRADUAL, 0.9)
    assert [step for step, _, _ in seen] == [7, 11, 15, 19, 23]
    assert pruner.step == 2 * 16  # 512 images / 32 per batch, two epochs: training went on after the last update
    kept = [kept for _, _, kept in seen]
    assert kept == sorted(kept, reverse=True)
    assert kept[-1] == plan.total - prune_count(0.9, plan.total) and pruner.achieved == pytest.approx(0.9, abs=1e-5)
    for spec in plan.tensors:  # pruned weights were held at zero through the remaining steps
        weight = dict(model.named_parameters())[spec.name].detach()
        assert torch.count_nonzero(weight[~unpack_mask(masks[spec.name], spec.shape)]) == 0


def test_gradual_schedule_longer_than_fine_tuning_is_refused(tmp_path):
    long = ScheduleConfig(kind="gradual", interval=10, updates=5)  # step 50 > 2 epochs x 16 steps
    with pytest.raises(UsageError, match="last gradual update is at step 50 .* only 32 steps"):
        gradual_training(tmp_path, long, 0.9)


def test_gradual_run_records_the_target_sparsity(tmp_path):
    out = tmp_path / "gradual.h5"
    config = load_config(CONFIGS / "smoke.yaml", [
        "schedule.kind=gradual", "schedule.rounds=1", "schedule.interval=3", "schedule.updates=4",
        "schedule.initial_sparsity=0.2", f"output.path={out}", "progress=false"])
    result = run(config, SingleWorld(), force=True)
    assert result.achieved_sparsity == pytest.approx(0.75, abs=1e-5)
    kept = sum(int(np.unpackbits(packed).sum()) for packed in archive_masks(out, 1).values())
    with h5py.File(out, "r") as archive:
        attrs = archive["rounds/0001"].attrs
        assert int(attrs["kept"]) == kept == int(attrs["total"]) - prune_count(0.75, int(attrs["total"]))


# --- rewinding ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("epoch", [0, 1])
def test_rewinding_restores_the_recorded_weights_under_the_mask(tmp_path, epoch):
    out = tmp_path / "rewind.h5"
    config = load_config(CONFIGS / "smoke.yaml", [
        "pretrain.epochs=2", f"schedule.rewind_epoch={epoch}", "schedule.kind=oneshot", "schedule.rounds=1",
        "finetune.epochs=0", f"output.path={out}", "progress=false"])
    run(config, SingleWorld(), force=True)
    states = tmp_path / "rewind.h5.states"
    recorded, dense = load_state_file(states / "rewind.safetensors"), load_state_file(states / "dense.safetensors")
    final = load_state_file(states / "round-0001.safetensors")
    if epoch == 0:  # the initialisation: what the seeded builder makes
        torch.manual_seed(config.seed)
        fresh = build_model(config.model).state_dict()
        assert all(torch.equal(recorded[name], fresh[name]) for name in fresh)
    assert not torch.equal(recorded["fc1.weight"], dense["fc1.weight"])  # training moved the weights on
    masks = archive_masks(out, 1)
    for name, tensor in final.items():
        if name in masks:
            keep = torch.from_numpy(np.unpackbits(masks[name], count=tensor.numel()).astype(bool)).reshape(tensor.shape)
            assert torch.equal(tensor[keep], recorded[name][keep]) and torch.count_nonzero(tensor[~keep]) == 0
        else:  # biases are not pruned: rewound whole
            assert torch.equal(tensor, recorded[name])


def test_rewinding_needs_the_dense_training_in_the_run():
    with pytest.raises(UsageError, match="rewind_epoch 3 needs"):
        validate_tree({"pretrain": {"epochs": 2}, "schedule": {"rewind_epoch": 3}}, "test")
    with pytest.raises(UsageError, match="rewind_epoch 0 needs"):
        validate_tree({"model": {"checkpoint": "dense.safetensors"}, "schedule": {"rewind_epoch": 0}}, "test")


# --- distillation -------------------------------------------------------------------------------------


def test_distillation_loss_mixes_cross_entropy_and_the_softened_kl():
    generator = torch.Generator().manual_seed(0)
    teacher = nn.Linear(6, 4)
    inputs = torch.randn(8, 6, generator=generator)
    logits = torch.randn(8, 4, generator=generator, requires_grad=True)
    targets = torch.randint(0, 4, (8,), generator=generator)
    loss = DistillationLoss(teacher, DistillConfig(weight=0.3, temperature=2.0))(logits, targets, inputs)
    soft_teacher = torch.softmax(teacher(inputs).detach() / 2.0, dim=1)
    soft_student = torch.softmax(logits / 2.0, dim=1)
    kl = (soft_teacher * (soft_teacher.log() - soft_student.log())).sum(dim=1).mean()
    expected = 0.7 * F.cross_entropy(logits, targets) + 0.3 * 4.0 * kl
    torch.testing.assert_close(loss, expected)
    assert DistillationLoss(teacher, DistillConfig(weight=1.0))(teacher(inputs).detach(), targets, inputs).abs() < 1e-6


def test_distillation_run_uses_the_dense_teacher(tmp_path):
    out = tmp_path / "distill.h5"
    config = load_config(CONFIGS / "smoke.yaml", ["distill.weight=0.5", "schedule.rounds=1", "schedule.kind=oneshot",
                                                  f"output.path={out}", "progress=false"])
    plain = run(load_config(CONFIGS / "smoke.yaml", ["schedule.rounds=1", "schedule.kind=oneshot",
                                                     f"output.path={tmp_path / 'plain.h5'}", "progress=false"]),
                SingleWorld(), force=True)
    taught = run(config, SingleWorld(), force=True)
    with h5py.File(out, "r") as archive, h5py.File(tmp_path / "plain.h5", "r") as reference:
        ours, theirs = archive["rounds/0001/history"][()], reference["rounds/0001/history"][()]
        assert ours["train_loss"][0] != theirs["train_loss"][0]  # another loss was minimised
    assert taught.kept == plain.kept and taught.final_accuracy > 0.5


def test_the_fashion_mnist_configs_of_each_criterion_and_schedule_validate():
    configs = {path.stem: load_config(path) for path in sorted(CONFIGS.glob("fmnist_*.yaml"))}
    criteria = {config.prune.criterion for config in configs.values()}
    assert {"taylor", "snip", "wanda", "lamp"} <= criteria
    assert {"gradual", "iterative"} <= {config.schedule.kind for config in configs.values()}
    assert configs["fmnist_lenet300_wanda"].prune.rule == "row" and configs["fmnist_lenet300_nm"].prune.sparsity == 0.5
    assert configs["fmnist_lenet300_rewind"].schedule.rewind_epoch == 1
    assert configs["fmnist_lenet300_distill"].distill.weight > 0
    assert configs["fmnist_lenet5_protected"].prune.min_density > 0
    assert configs["fmnist_lenet300_snip"].pretrain.epochs == 0  # pruned at initialisation
    gradual = configs["fmnist_lenet300_gradual"]
    steps_per_epoch = -(-55000 // gradual.data.batch_size)
    assert gradual_end(gradual.schedule) <= steps_per_epoch * gradual.finetune.epochs


def test_gradual_under_mpirun_keeps_replicas_identical_and_reaches_the_target(mpirun, tmp_path):
    """Every rank reaches each mask update at the same step and runs its collectives in step."""
    finished = launch([mpirun, "-n", "2", *driver("train", str(tmp_path), str(CONFIGS / "smoke.yaml"),
                                                   "schedule.kind=gradual", "schedule.rounds=1", "schedule.interval=2",
                                                   "schedule.updates=3", "prune.criterion=taylor",
                                                   "calibration.batch_size=32", "calibration.batches=3")])
    assert finished.returncode == 0, finished.stderr
    replicas = [load_state_file(tmp_path / f"rank{rank}.safetensors") for rank in (0, 1)]
    assert all(torch.equal(replicas[0][name], replicas[1][name]) for name in replicas[0])
    masks = archive_masks(tmp_path / "run.h5", 1)
    total = sum(replicas[0][name].numel() for name in masks)
    kept = 0
    for name, packed in masks.items():
        keep = torch.from_numpy(np.unpackbits(packed, count=replicas[0][name].numel()).astype(bool))
        assert torch.count_nonzero(replicas[0][name].flatten()[~keep]) == 0
        kept += int(keep.sum())
    assert kept == total - prune_count(0.75, total)


# --- the gradual schedule at any world size -------------------------------------------------------------

GRADUAL_RUN = ("pretrain.epochs=0", "schedule.kind=gradual", "schedule.rounds=1", "schedule.interval=4",
               "schedule.updates=3", "schedule.initial_sparsity=0.2", "finetune.epochs=1")
# Exact steps: 4 batches of 64 per optimizer step, their gradients summed exactly, at any world size.
EXACT = ("pretrain.epochs=1", "pretrain.step_batches=4", "finetune.step_batches=4")


def gradual_updates(launcher: list[str], out, *overrides: str) -> list[dict]:
    out.mkdir()
    finished = launch([*launcher, *driver("gradual", str(out), str(CONFIGS / "smoke.yaml"), *GRADUAL_RUN, *overrides)])
    assert finished.returncode == 0, finished.stderr
    return json.loads((out / "updates.json").read_text())


def test_exact_steps_give_the_same_weights_losses_and_gradual_masks_on_any_world_size(mpirun, mpi4py, tmp_path):
    """Really trained (a dense epoch, then fine-tuning with three mask updates, Adam): 1 rank, mpirun
    -n 2 and -n 3 and torchrun with 2 ranks reach every update at the same step with the same masks,
    and record the same masks, losses and accuracies, bit for bit."""
    launchers = {"n1": [], "n2": [mpirun, "-n", "2"], "n3": [mpirun, "-n", "3"], "torchrun2": torchrun(2, "--no-python")}
    updates = {name: gradual_updates(launcher, tmp_path / name, *EXACT) for name, launcher in launchers.items()}
    alone = updates.pop("n1")
    assert [update["step"] for update in alone] == [4, 8, 12]
    assert len({update["masks"] for update in alone}) == 3  # the masks really moved
    for name, seen in updates.items():
        assert seen == alone, name
        assert_same_masks(tmp_path / name / "run.h5", tmp_path / "n1" / "run.h5")
        assert recorded_history(tmp_path / name / "run.h5") == recorded_history(tmp_path / "n1" / "run.h5"), name


def recorded_history(path) -> list[bytes]:
    """Every round's epoch records and its tested loss and accuracy, as bytes (bit-for-bit comparison)."""
    with h5py.File(path, "r") as archive:
        return [archive[f"rounds/{name}/history"][()].tobytes()
                + np.array([archive[f"rounds/{name}"].attrs[key] for key in ("loss", "accuracy")]).tobytes()
                for name in sorted(archive["rounds"]) if "history" in archive[f"rounds/{name}"]]


def test_gradual_updates_fall_on_the_same_steps_and_targets_while_training_differs(mpirun, mpi4py, tmp_path):
    """Really trained, the ranks average gradients over other batches than one process does, so the
    weights (and masks) may differ; the schedule does not: same update steps, targets and kept counts."""
    alone, two = (gradual_updates(launcher, tmp_path / name) for name, launcher in (("n1", []), ("n2", [mpirun, "-n", "2"])))
    schedule = [(update["step"], update["sparsity"], update["kept"]) for update in alone]
    assert [update["step"] for update in alone] == [4, 8, 12]
    assert [(update["step"], update["sparsity"], update["kept"]) for update in two] == schedule


def test_a_gradual_step_counts_the_batches_of_every_rank():
    schedule = ScheduleConfig(kind="gradual", start_step=0, interval=4, updates=3)
    # 3 ranks: an optimizer step covers 3 schedule steps; updates at 4, 8, 12 fall on steps 6, 9, 12
    crossed = [gradual_update_within(schedule, 0.9, step - 3, step) for step in range(3, 16, 3)]
    assert [due and due[0] for due in crossed] == [None, 4, 8, 12, None]
    assert crossed[3] == (12, 0.9)  # the last update is the target itself
    two_at_once = ScheduleConfig(kind="gradual", start_step=0, interval=1, updates=8)
    assert gradual_update_within(two_at_once, 0.9, 2, 5) == (5, gradual_sparsity(two_at_once, 0.9, 5))
    assert schedule_steps(batches_per_rank=8, world_size=2, epochs=3) == 48


def test_the_fashion_mnist_gradual_config_trains_with_exact_steps_and_fits_fine_tuning():
    """Exact steps in both trainings (the same masks at any world size); its last update within fine-tuning."""
    config = load_config(CONFIGS / "fmnist_lenet300_gradual.yaml")
    assert config.pretrain.step_batches and config.finetune.step_batches
    samples = 60000 - config.data.validation_size
    total = fine_tuning_steps(config, samples, SingleWorld(), seed=config.seed)
    assert total == -(-samples // config.data.batch_size) * config.finetune.epochs
    assert gradual_end(config.schedule) <= total
