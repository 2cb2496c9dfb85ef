"""Fine-tuning: optimizers and schedules from the config, train() learns and keeps masks, evaluate() counts."""

from __future__ import annotations

import math
import typing

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

from hpcprune.config import LRScheduleConfig, OptimizerConfig, TrainConfig
from hpcprune.dist.world import SingleWorld
from hpcprune.errors import UsageError
from hpcprune.train.finetune import (
    LR_SCHEDULES,
    OPTIMIZERS,
    EpochRecord,
    build_lr_schedule,
    build_optimizer,
    evaluate,
    resolve_device,
    train,
)

CPU = torch.device("cpu")


def separable_data(count: int = 256, seed: int = 0) -> TensorDataset:
    """Two classes split by the sign of the first feature, with a margin."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(count, 4, generator=generator)
    labels = (inputs[:, 0] > 0).long()
    inputs[:, 0] += torch.where(labels == 1, 0.5, -0.5)
    return TensorDataset(inputs, labels)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))


def train_config(epochs: int = 4, optimizer: str = "sgd", schedule: str = "constant") -> TrainConfig:
    return TrainConfig(epochs=epochs, optimizer=OptimizerConfig(name=optimizer, lr=0.05, momentum=0.9, weight_decay=1e-3),
                       lr_schedule=LRScheduleConfig(name=schedule))


def run_train(model, cfg, **kwargs):
    options = dict(world=SingleWorld(), device=CPU, seed=0, batch_size=32, eval_batch_size=64)
    options.update(kwargs)
    return train(model, separable_data(), separable_data(128, seed=1), cfg, **options)


# --- optimizers, schedules, devices ------------------------------------------------------------------


def test_registries_cover_every_configurable_name():
    assert set(OPTIMIZERS) == set(typing.get_args(OptimizerConfig.model_fields["name"].annotation))
    assert set(LR_SCHEDULES) == set(typing.get_args(LRScheduleConfig.model_fields["name"].annotation))


@pytest.mark.parametrize(("name", "kind"), [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_build_optimizer(name, kind):
    cfg = OptimizerConfig(name=name, lr=0.02, momentum=0.8, weight_decay=0.01)
    optimizer = build_optimizer(mlp().parameters(), cfg)
    assert type(optimizer) is kind
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (0.02, 0.01)
    if name == "sgd":
        assert group["momentum"] == 0.8


def lrs_over_epochs(cfg: LRScheduleConfig, epochs: int) -> list[float]:
    optimizer = torch.optim.SGD(mlp().parameters(), lr=1.0)
    schedule = build_lr_schedule(optimizer, cfg, epochs)
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return lrs + [optimizer.param_groups[0]["lr"]]


def test_constant_schedule():
    assert lrs_over_epochs(LRScheduleConfig(name="constant"), 3) == [1.0, 1.0, 1.0, 1.0]


def test_step_schedule():
    lrs = lrs_over_epochs(LRScheduleConfig(name="step", step_size=2, gamma=0.5), 5)
    assert lrs == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25, 0.25])


def test_cosine_schedule_reaches_zero_after_the_last_epoch():
    lrs = lrs_over_epochs(LRScheduleConfig(name="cosine"), 4)
    assert lrs == pytest.approx([0.5 * (1 + math.cos(math.pi * epoch / 4)) for epoch in range(5)], abs=1e-12)


def test_cosine_schedule_with_zero_epochs_is_valid():
    optimizer = torch.optim.SGD(mlp().parameters(), lr=1.0)
    build_lr_schedule(optimizer, LRScheduleConfig(name="cosine"), 0)
    assert optimizer.param_groups[0]["lr"] == 1.0


def test_resolve_device_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto") == CPU
    with pytest.raises(UsageError, match="cuda"):
        resolve_device("cuda")


def test_resolve_device_with_cuda_uses_the_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda", local_rank=3) == torch.device("cuda", 1)
    assert resolve_device("cpu") == CPU


def test_resolve_device_refuses_unknown_names():
    with pytest.raises(UsageError, match="tpu"):
        resolve_device("tpu")


# --- train ------------------------------------------------------------------------------------------


def test_train_returns_one_record_per_epoch_and_learns():
    records = run_train(mlp(), train_config(epochs=4))
    assert [record.epoch for record in records] == [1, 2, 3, 4]
    assert all(isinstance(record, EpochRecord) for record in records)
    assert records[-1].train_loss < records[0].train_loss
    assert records[-1].eval_loss < records[0].eval_loss
    assert records[-1].eval_accuracy > 0.9


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_train_learns_with_adam(optimizer):
    cfg = TrainConfig(epochs=3, optimizer=OptimizerConfig(name=optimizer, lr=0.01), lr_schedule=LRScheduleConfig(name="cosine"))
    records = run_train(mlp(), cfg)
    assert records[-1].train_loss < records[0].train_loss
    assert records[-1].eval_accuracy > 0.9


def test_train_is_reproducible_with_the_same_seed():
    first, second = mlp(), mlp()
    assert run_train(first, train_config(epochs=2)) == run_train(second, train_config(epochs=2))
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)


def test_train_seed_changes_the_batch_order():
    first, second = mlp(), mlp()
    run_train(first, train_config(epochs=1), seed=0)
    run_train(second, train_config(epochs=1), seed=1)
    assert not torch.equal(first[0].weight, second[0].weight)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_train_keeps_pruned_weights_exactly_zero(optimizer):
    model = mlp()
    generator = torch.Generator().manual_seed(5)
    masks = {name: torch.rand(param.shape, generator=generator) < 0.6
             for name, param in model.named_parameters() if name.endswith("weight")}
    records = run_train(model, train_config(epochs=3, optimizer=optimizer), masks=masks)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        pruned = params[name].detach()[~mask]
        assert torch.equal(pruned, torch.zeros_like(pruned)), name
        assert params[name].detach()[mask].count_nonzero() > 0, name
    assert records[-1].train_loss < records[0].train_loss
    assert records[-1].eval_accuracy > 0.8


def test_train_calls_on_epoch_end_with_each_record():
    seen = []
    records = run_train(mlp(), train_config(epochs=3), on_epoch_end=seen.append)
    assert seen == records


def test_train_with_zero_epochs_does_nothing():
    model = mlp()
    before = [param.detach().clone() for param in model.parameters()]
    assert run_train(model, train_config(epochs=0)) == []
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_train_without_eval_data_records_nan():
    records = train(mlp(), separable_data(), None, train_config(epochs=1), world=SingleWorld(), device=CPU, seed=0,
                    batch_size=32, eval_batch_size=64)
    assert math.isnan(records[0].eval_loss) and math.isnan(records[0].eval_accuracy)
    assert math.isfinite(records[0].train_loss)


def test_train_with_progress_bar_outside_a_terminal():
    assert len(run_train(mlp(), train_config(epochs=1), progress=True)) == 1


@pytest.fixture
def single_rank_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_train_a_ddp_wrapped_model(single_rank_process_group):
    inner = mlp()
    masks = {"0.weight": torch.rand(16, 4, generator=torch.Generator().manual_seed(6)) < 0.5}
    model = nn.parallel.DistributedDataParallel(inner)
    records = run_train(model, train_config(epochs=2), masks=masks)
    assert records[-1].eval_accuracy > 0.8
    pruned = inner[0].weight.detach()[~masks["0.weight"]]
    assert torch.equal(pruned, torch.zeros_like(pruned))
    assert evaluate(model, separable_data(64), world=SingleWorld(), device=CPU, batch_size=16)[1] > 0.8


# --- evaluate ---------------------------------------------------------------------------------------


class LogitsAreInputs(nn.Module):
    """A model whose outputs are known: it returns its inputs as logits."""

    def forward(self, inputs):
        return inputs


KNOWN_LOGITS = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.5, 0.0]])
KNOWN_TARGETS = torch.tensor([0, 1, 1, 1])  # argmax is right for the first two only


def test_evaluate_counts_loss_and_accuracy():
    expected_loss = nn.functional.cross_entropy(KNOWN_LOGITS, KNOWN_TARGETS).item()
    for batch_size in (1, 3, 4):  # uneven last batch must not bias the mean
        loss, accuracy = evaluate(LogitsAreInputs(), TensorDataset(KNOWN_LOGITS, KNOWN_TARGETS), world=SingleWorld(),
                                  device=CPU, batch_size=batch_size)
        assert loss == pytest.approx(expected_loss, rel=1e-6)
        assert accuracy == 0.5


def test_evaluate_restores_training_mode_and_leaves_weights():
    model = mlp()
    model.train()
    before = [param.detach().clone() for param in model.parameters()]
    evaluate(model, separable_data(32), world=SingleWorld(), device=CPU, batch_size=8)
    assert model.training
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_evaluate_on_no_data_is_nan():
    empty = TensorDataset(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    loss, accuracy = evaluate(LogitsAreInputs(), empty, world=SingleWorld(), device=CPU, batch_size=4)
    assert math.isnan(loss) and math.isnan(accuracy)
