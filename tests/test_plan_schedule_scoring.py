"""Plan (prunable tensors, owners), schedules and the foundation criteria."""

import pytest
import torch
from torch import nn

from hpcprune.config import PruneConfig, ScheduleConfig
from hpcprune.errors import UsageError
from hpcprune.prune.plan import assign_owners, make_plan
from hpcprune.prune.schedule import round_targets
from hpcprune.prune.scoring import CRITERIA, ScoreContext, score_tensor


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(16, 8)
        self.fc2 = nn.Linear(8, 3)


def test_plan_takes_linear_and_conv_weights_in_parameter_order():
    plan = make_plan(Net(), PruneConfig(), 1)
    assert [spec.name for spec in plan.tensors] == ["conv.weight", "fc1.weight", "fc2.weight"]
    assert [spec.index for spec in plan.tensors] == [0, 1, 2]
    assert plan.total == 36 + 128 + 24


def test_plan_exclusions_keep_layers_dense():
    plan = make_plan(Net(), PruneConfig(exclude=["conv.*", "fc2.weight"]), 1)
    assert [spec.name for spec in plan.tensors] == ["fc1.weight"]


def test_empty_plan_is_a_usage_error():
    with pytest.raises(UsageError, match="no prunable tensors"):
        make_plan(Net(), PruneConfig(exclude=["*"]), 1)


def test_owners_balance_by_element_count_and_cover_every_rank():
    plan = make_plan(nn.Sequential(*[nn.Linear(10 * (i + 1), 10) for i in range(8)]), PruneConfig(), 1)
    for size in (1, 2, 3, 4):
        owners = assign_owners(plan.tensors, size)
        assert owners == assign_owners(plan.tensors, size)  # deterministic
        loads = [sum(s.numel for s, o in zip(plan.tensors, owners) if o == rank) for rank in range(size)]
        assert sum(loads) == plan.total and min(loads) > 0
        assert max(loads) - min(loads) <= max(s.numel for s in plan.tensors)
        local = [spec.name for rank in range(size) for spec in make_plan.__globals__["Plan"](plan.tensors, owners).local(rank)]
        assert sorted(local) == sorted(spec.name for spec in plan.tensors)


def test_iterative_targets_shrink_density_geometrically_and_end_on_target():
    targets = round_targets(ScheduleConfig(kind="iterative", rounds=3), 0.9)
    assert targets[-1] == 0.9
    densities = [1 - t for t in targets]
    assert densities[0] ** 2 == pytest.approx(densities[1]) and densities[0] ** 3 == pytest.approx(densities[2])
    assert round_targets(ScheduleConfig(), 0.8) == [0.8]


def spec_of(model, name):
    return make_plan(model, PruneConfig(), 1).by_name(name)


def test_magnitude_is_absolute_value():
    model = Net()
    spec = spec_of(model, "fc1.weight")
    scores = score_tensor("magnitude", spec, model.fc1.weight, ScoreContext(seed=0))
    assert torch.equal(scores, model.fc1.weight.detach().abs())


def test_relative_is_share_of_output_row():
    weight = torch.tensor([[1.0, -3.0], [0.0, 0.0], [2.0, 2.0]])
    model = nn.Linear(2, 3)
    with torch.no_grad():
        model.weight.copy_(weight)
    spec = spec_of(nn.Sequential(model), "0.weight")
    scores = score_tensor("relative", spec, model.weight, ScoreContext(seed=0))
    assert torch.allclose(scores, torch.tensor([[0.25, 0.75], [0.0, 0.0], [0.5, 0.5]]))
    conv = nn.Conv2d(2, 3, 3)
    conv_scores = score_tensor("relative", spec_of(nn.Sequential(conv), "0.weight"), conv.weight, ScoreContext(seed=0))
    assert torch.allclose(conv_scores.reshape(3, -1).sum(dim=1), torch.ones(3))


def test_random_is_seeded_per_tensor_and_uniform():
    model = nn.Sequential(nn.Linear(100, 100), nn.Linear(100, 100))
    plan = make_plan(model, PruneConfig(), 1)
    first, second = (score_tensor("random", spec, model[spec.index].weight, ScoreContext(seed=3)) for spec in plan.tensors)
    again = score_tensor("random", plan.tensors[0], model[0].weight, ScoreContext(seed=3))
    other_seed = score_tensor("random", plan.tensors[0], model[0].weight, ScoreContext(seed=4))
    assert torch.equal(first, again)
    assert not torch.equal(first, second) and not torch.equal(first, other_seed)
    assert 0.0 <= first.min() and first.max() < 1.0 and abs(first.mean().item() - 0.5) < 0.02


def test_random_ignores_the_weights():
    spec = spec_of(Net(), "fc2.weight")
    a = score_tensor("random", spec, torch.zeros(spec.shape), ScoreContext(seed=1))
    b = score_tensor("random", spec, torch.randn(spec.shape), ScoreContext(seed=1))
    assert torch.equal(a, b)


def test_every_criterion_returns_float32_of_the_weight_shape():
    model = Net()
    from hpcprune.prune.calibrate import (
        Statistics,  # what the data-dependent criteria read
    )

    statistics = Statistics(samples=1, input_norms={"conv.weight": torch.ones(9)},
                            gradients={"conv.weight": torch.ones(model.conv.weight.shape)}, sensitivity_total=1.0)
    for name in CRITERIA:
        spec = spec_of(model, "conv.weight")
        scores = score_tensor(name, spec, model.conv.weight, ScoreContext(seed=0, statistics=statistics))
        assert scores.shape == model.conv.weight.shape and scores.dtype == torch.float32
