"""Exact training steps (hpcprune.train.exact_steps): which batches a step takes and who computes them,
the gradient they give, and the models refused on several ranks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from hpcprune.config import load_config
from hpcprune.dist.world import SingleWorld
from hpcprune.models.builders import build_model
from hpcprune.models.data import load_data
from hpcprune.train.exact_steps import StepPlan, exact_epoch
from hpcprune.train.finetune import train
from tests.helpers import CONFIGS, driver, launch


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_every_batch_of_an_epoch_is_computed_once_on_one_rank_in_the_one_rank_order(world_size):
    """1000 samples in batches of 64 (the last short), 4 per step: the ranks' batches together are
    the single process's batches, each once, and every rank sees the same step sizes."""
    alone = list(StepPlan(1000, 64, 4, seed=3, rank=0, world_size=1).epoch(2))
    ranks = [list(StepPlan(1000, 64, 4, seed=3, rank=rank, world_size=world_size).epoch(2)) for rank in range(world_size)]
    assert [(step.batches, step.samples) for step in alone] == [(4, 256)] * 3 + [(4, 232)]
    for steps in ranks:
        assert [(step.batches, step.samples) for step in steps] == [(step.batches, step.samples) for step in alone]
    for position, step in enumerate(alone):
        computed = sorted(batch for steps in ranks for batch in steps[position].local)
        assert computed == step.local
    assert sorted(sample for step in alone for _, samples in step.local for sample in samples) == list(range(1000))
    assert [s for _, s in alone[0].local] != [s for _, s in next(StepPlan(1000, 64, 4, 3, 0, 1).epoch(3)).local]


def test_a_step_applies_the_mean_gradient_over_all_its_samples():
    """One step of plain SGD (lr 1) over 3 batches of unequal size moves the weights by the mean
    gradient over the step's 10 samples, as one batch of all of them would."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(10, 5), torch.randint(0, 3, (10,)))
    model, reference = nn.Linear(5, 3), nn.Linear(5, 3)
    reference.load_state_dict(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    plan = StepPlan(10, 4, 3, seed=0, rank=0, world_size=1)
    exact_epoch(model, data, plan, 0, optimizer, None, world=SingleWorld(), device=torch.device("cpu"),
                loss_of=lambda logits, targets, inputs: F.cross_entropy(logits, targets), after_step=None)
    inputs, targets = data.tensors
    F.cross_entropy(reference(inputs), targets).backward()
    for trained, start in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(trained.detach(), start.detach() - start.grad, rtol=0, atol=1e-6)


def test_batchnorm_models_are_refused_with_exact_steps_on_several_ranks(mpirun, mpi4py, tmp_path):
    """Their running statistics would follow each rank's own batches: refused in one line, nothing written."""
    out = tmp_path / "bn.h5"
    finished = launch([mpirun, "-n", "2", *driver("cli", "prune", "--config", str(CONFIGS / "smoke.yaml"), "-q",
                                                    "--set", "model.name=resnet8", "--set", "pretrain.step_batches=2",
                                                    "--out", str(out))])
    assert finished.returncode == 2, finished.stderr
    ours = [line for line in finished.stderr.splitlines() if line.startswith("hpcprune")]  # mpirun adds its own report
    assert len(ours) == 1 and ours[0].startswith("hpcprune: error: pretrain.step_batches: exact steps on 2 ranks"), ours
    assert "BatchNorm" in ours[0] and "Traceback" not in finished.stderr and not out.exists()


def trained_with_threads(threads: int) -> list[torch.Tensor]:
    """LeNet-300-100 after one epoch of exact steps on 4096 Fashion-MNIST images, torch set to `threads`."""
    config = load_config(CONFIGS / "fmnist_lenet300_gradual.yaml", ["data.train_limit=4096", "pretrain.epochs=1"])
    splits = load_data(config.data, config.seed)
    torch.manual_seed(0)
    model = build_model(config.model, in_channels=1, num_classes=10)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        train(model, splits.train, None, config.pretrain, world=SingleWorld(), device=torch.device("cpu"), seed=0,
              batch_size=config.data.batch_size, eval_batch_size=1000)
    finally:
        torch.set_num_threads(before)
    return [parameter.detach().clone() for parameter in model.parameters()]


def test_exact_steps_give_the_same_weights_whatever_torchs_thread_count():
    """1 rank of 2 threads must train as 2 ranks of 1 thread each do: a reduction split over threads
    (a bias gradient) adds in another order, so exact steps compute on one thread."""
    one, two = trained_with_threads(1), trained_with_threads(2)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
