"""Criteria from the literature against direct reference computations, and the group rules (row, N:M)
and layer protection they are used with.

    python -m pytest tests/test_criteria.py -q
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from hpcprune.archive.codec import unpack_mask
from hpcprune.config import CalibrationConfig, PruneConfig, validate_tree
from hpcprune.dist.failures import AgreedFailure
from hpcprune.dist.world import SingleWorld
from hpcprune.errors import UsageError
from hpcprune.prune.calibrate import CalibrationBatches, calibrate
from hpcprune.prune.patterns import keep_largest
from hpcprune.prune.plan import Plan, TensorSpec, assign_owners, make_plan
from hpcprune.prune.protect import protect_layers
from hpcprune.prune.rules import select
from hpcprune.prune.scoring import ScoreContext, score_tensor
from hpcprune.prune.selection import prune_count


class SmallNet(nn.Module):
    """A conv with stride and padding, then two Linear layers: every kind of input Wanda handles."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(4 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def small_setup(samples: int = 40, batch_size: int = 16):
    torch.manual_seed(0)
    model = SmallNet()
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(samples, 2, 8, 8, generator=generator)
    labels = torch.randint(0, 5, (samples,), generator=generator)
    batches = CalibrationBatches.of_dataset(TensorDataset(images, labels),
                                            CalibrationConfig(batches=10, batch_size=batch_size))
    return model, make_plan(model, PruneConfig(), 1), batches, images, labels


def scores_of(criterion: str, model, plan, statistics) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    context = ScoreContext(seed=0, statistics=statistics)
    return {spec.name: score_tensor(criterion, spec, params[spec.name].detach(), context) for spec in plan.tensors}


# --- reference computations: the whole calibration set at once, written out plainly ------------------


def reference_input_norms(model: SmallNet, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """‖X_j‖₂ per input feature; for the conv, feature (c, i, j) read off the padded input by strided slicing."""
    x = images.double()
    padded = F.pad(x, (1, 1, 1, 1))
    conv_norms = torch.zeros(2, 3, 3, dtype=torch.float64)
    for i in range(3):
        for j in range(3):
            window = padded[:, :, i:i + 2 * 3 + 1:2, j:j + 2 * 3 + 1:2]  # 4x4 output positions, stride 2
            conv_norms[:, i, j] = window.square().sum(dim=(0, 2, 3)).sqrt()
    conv = model.conv
    fc1_in = torch.relu(F.conv2d(x, conv.weight.double(), conv.bias.double(), stride=2, padding=1)).flatten(1)
    fc2_in = torch.relu(F.linear(fc1_in, model.fc1.weight.double(), model.fc1.bias.double()))
    return {"conv.weight": conv_norms.reshape(-1), "fc1.weight": fc1_in.norm(dim=0), "fc2.weight": fc2_in.norm(dim=0)}


def reference_gradients(model: SmallNet, images, labels) -> dict[str, torch.Tensor]:
    model.zero_grad()
    F.cross_entropy(model(images), labels).backward()  # mean over every calibration sample
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if name.endswith("weight")}
    model.zero_grad()
    return grads


def test_wanda_is_weight_magnitude_times_input_feature_norm():
    model, plan, batches, images, _ = small_setup()
    statistics = calibrate(model, plan, batches, SingleWorld(), "wanda", torch.device("cpu"))
    norms = reference_input_norms(model, images)
    scores = scores_of("wanda", model, plan, statistics)
    for name, weight in ((s.name, dict(model.named_parameters())[s.name]) for s in plan.tensors):
        expected = (weight.detach().double().reshape(weight.shape[0], -1).abs() * norms[name]).reshape(weight.shape)
        torch.testing.assert_close(scores[name].double(), expected, rtol=1e-5, atol=1e-7)
    assert statistics.samples == 40


def test_taylor_and_snip_use_the_gradient_over_all_calibration_samples():
    model, plan, batches, images, labels = small_setup()
    taylor_stats = calibrate(model, plan, batches, SingleWorld(), "taylor", torch.device("cpu"))
    grads = reference_gradients(model, images, labels)
    params = dict(model.named_parameters())
    taylor = scores_of("taylor", model, plan, taylor_stats)
    snip = scores_of("snip", model, plan, calibrate(model, plan, batches, SingleWorld(), "snip", torch.device("cpu")))
    sensitivities = {name: (params[name].detach() * grads[name]).abs() for name in taylor}
    total = sum(float(s.double().sum()) for s in sensitivities.values())
    for name in taylor:
        torch.testing.assert_close(taylor[name], sensitivities[name], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(snip[name], sensitivities[name] / total, rtol=1e-4, atol=1e-9)
    assert sum(float(s.double().sum()) for s in snip.values()) == pytest.approx(1.0, rel=1e-5)
    assert all(p.grad is None for p in model.parameters())  # calibration leaves training state alone


def test_lamp_divides_by_the_sum_over_weights_at_least_as_large():
    weight = torch.tensor([[0.5, -1.0, 0.25], [1.0, 0.0, -0.5], [2.0, 0.25, 0.0]])  # ties and zeros
    spec = TensorSpec(0, "w", tuple(weight.shape))
    scores = score_tensor("lamp", spec, weight, ScoreContext(seed=0))
    squares = weight.reshape(-1).double().square()
    expected = [float(s / squares[squares >= s].sum()) if s > 0 else 0.0 for s in squares]
    torch.testing.assert_close(scores.reshape(-1).double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)
    assert float(scores.max()) == 1.0  # the largest weight is alone in its sum


def test_lamp_ranks_within_a_tensor_as_magnitude_does():
    weight = torch.randn(30, 20, generator=torch.Generator().manual_seed(3))
    spec = TensorSpec(0, "w", tuple(weight.shape))
    lamp = score_tensor("lamp", spec, weight, ScoreContext(seed=0)).reshape(-1)
    assert torch.equal(torch.argsort(lamp, stable=True), torch.argsort(weight.abs().reshape(-1), stable=True))


def test_calibrated_criteria_refuse_masks_only_runs(tmp_path):
    from hpcprune.prune.step import calibration_statistics

    class Job:
        config = validate_tree({"prune": {"criterion": "taylor"}, "model": {"name": "checkpoint", "checkpoint": "x"},
                                "finetune": {"epochs": 0}}, "test")
        model = None

    with pytest.raises(UsageError, match="taylor.*needs calibration data"):
        calibration_statistics(Job())


# --- row and N:M rules -------------------------------------------------------------------------------


def plan_of(*shapes) -> Plan:
    tensors = tuple(TensorSpec(index, f"t{index}.weight", shape) for index, shape in enumerate(shapes))
    return Plan(tensors, assign_owners(tensors, 1))


def tied_scores(plan: Plan, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {spec.name: torch.randint(0, 4, spec.shape, generator=generator).float() for spec in plan.tensors}


def expected_group_keep(groups: torch.Tensor, pruned: int) -> torch.Tensor:
    """Prune the `pruned` smallest of each row, earliest first among ties: written with Python sorts."""
    keep = torch.ones(groups.shape, dtype=torch.bool)
    for row in range(groups.shape[0]):
        order = sorted(range(groups.shape[1]), key=lambda col: (float(groups[row, col]), col))
        keep[row, order[:pruned]] = False
    return keep


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_keep_largest_prunes_as_a_stable_sort_does_whatever_the_ties(dtype):
    generator = torch.Generator().manual_seed(7)
    rows = torch.randint(0, 3, (40, 12), generator=generator).to(dtype)
    rows[0] = 1.0  # one value throughout
    rows[1, ::2], rows[1, 1::2] = -0.0, 0.0  # -0.0 and +0.0 are equal: earliest first
    rows[2, :3] = torch.tensor([float("inf"), float("-inf"), float("inf")], dtype=dtype)
    for pruned in (1, 5, 6, 11, 12):
        assert torch.equal(keep_largest(rows, pruned), expected_group_keep(rows, pruned)), pruned


def test_row_rule_prunes_the_same_count_of_the_smallest_in_every_row():
    plan = plan_of((6, 10), (4, 3, 3, 3))
    scores = tied_scores(plan)
    selection = select("row", scores, plan, SingleWorld(), sparsity=0.6)
    for spec in plan.tensors:
        rows = scores[spec.name].reshape(spec.shape[0], -1)
        keep = unpack_mask(selection.masks[spec.name], spec.shape).reshape(rows.shape)
        assert (keep.sum(dim=1) == rows.shape[1] - prune_count(0.6, rows.shape[1])).all()
        assert torch.equal(keep, expected_group_keep(rows, prune_count(0.6, rows.shape[1])))
    assert selection.kept == sum(int(unpack_mask(m, selection.shapes[n]).sum()) for n, m in selection.masks.items())


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_nm_rule_keeps_exactly_n_of_every_m_consecutive_inputs(n, m):
    plan = plan_of((5, 16), (3, 8, 2, 2))  # a Linear and a conv whose 8 input channels hold the groups
    scores = tied_scores(plan, seed=n * 10 + m)
    selection = select("nm", scores, plan, SingleWorld(), sparsity=1 - n / m, n=n, m=m)
    for spec in plan.tensors:
        keep = unpack_mask(selection.masks[spec.name], spec.shape)
        inputs_last = keep.movedim(1, -1).reshape(-1, m)
        assert (inputs_last.sum(dim=1) == n).all(), spec.name
        groups = scores[spec.name].movedim(1, -1).reshape(-1, m)
        assert torch.equal(inputs_last, expected_group_keep(groups, m - n))
    assert selection.kept == plan.total * n // m


def test_nm_rule_refuses_an_input_count_that_is_not_a_multiple_of_m():
    plan = plan_of((4, 8), (4, 6))
    with pytest.raises(UsageError, match="t1.weight has 6 inputs.*prune.m=4"):
        select("nm", tied_scores(plan), plan, SingleWorld(), sparsity=0.5, n=2, m=4)


def test_group_rules_report_nan_scores():
    plan = plan_of((4, 8))
    scores = {"t0.weight": torch.full((4, 8), float("nan"))}
    with pytest.raises(ValueError, match="contain NaN"):
        select("row", scores, plan, SingleWorld(), sparsity=0.5)


def test_config_defaults_wanda_to_rows_and_fixes_the_nm_sparsity():
    assert validate_tree({"prune": {"criterion": "wanda"}}, "t").prune.rule == "row"
    assert validate_tree({"prune": {"criterion": "wanda", "rule": "global"}}, "t").prune.rule == "global"
    assert validate_tree({"prune": {"rule": "nm", "n": 4, "m": 8}}, "t").prune.sparsity == 0.5
    with pytest.raises(UsageError, match="prune: rule 'nm' 2:4 prunes 0.5"):
        validate_tree({"prune": {"rule": "nm", "sparsity": 0.9}}, "t")
    with pytest.raises(UsageError, match="prune.n < prune.m"):
        validate_tree({"prune": {"rule": "nm", "n": 4, "m": 4}}, "t")


# --- layer protection --------------------------------------------------------------------------------


def test_min_density_keeps_a_small_layer_that_the_global_rule_would_empty():
    plan = plan_of((20, 20), (10, 10))
    generator = torch.Generator().manual_seed(5)
    scores = {"t0.weight": torch.rand(20, 20, generator=generator) + 1.0,  # all above the small layer
              "t1.weight": torch.rand(10, 10, generator=generator)}
    plain = select("global", scores, plan, SingleWorld(), sparsity=0.5)
    assert unpack_mask(plain.masks["t1.weight"], (10, 10)).sum() == 0  # collapsed
    protected = select("global", protect_layers(scores, plan, 0.15, 0.5), plan, SingleWorld(), sparsity=0.5)
    small = unpack_mask(protected.masks["t1.weight"], (10, 10))
    assert int(small.sum()) == math.ceil(0.15 * 100) and protected.kept == plain.kept
    # the protected weights are the layer's largest
    assert float(scores["t1.weight"][small].min()) > float(scores["t1.weight"][~small].max())


def test_min_density_beyond_the_sparsity_is_a_usage_error():
    plan = plan_of((10, 10))
    with pytest.raises(UsageError, match="sparsity can be at most 0.7000"):
        protect_layers(tied_scores(plan), plan, 0.3, 0.8)


# --- the generic rule checks of tests/test_select.py, on shapes N:M accepts ----------------------------


NM_SHAPES = ((8, 8), (4, 4, 3, 3), (6, 12), (2, 4))


@pytest.mark.parametrize("rule", ["nm", "row"])
def test_group_rules_read_each_tensor_once_and_name_a_nan_tensor(rule):
    from tests.test_select import LazyScores as CountingScores

    plan = plan_of(*NM_SHAPES)
    scores = {name: torch.randn(tensor.shape, generator=torch.Generator().manual_seed(2)) for name, tensor in
              tied_scores(plan).items()}
    lazy = CountingScores(scores)
    chosen = select(rule, lazy, plan, SingleWorld(), sparsity=0.5, n=2, m=4) if rule == "nm" else \
        select(rule, lazy, plan, SingleWorld(), sparsity=0.5)
    assert set(lazy.reads.values()) == {1} and lazy.most_alive == 1 and lazy.alive() == 0
    assert chosen.kept == plan.total // 2
    scores["t2.weight"][3, 4] = float("nan")
    with pytest.raises(ValueError, match="t2.weight"):
        select(rule, scores, plan, SingleWorld(), sparsity=0.5)


@pytest.mark.parametrize("rule", ["nm", "row"])
def test_group_rules_on_ranks_agree_with_one_process_and_fail_together(rule):
    from tests.test_select import run_ranks

    tensors = tuple(TensorSpec(index, f"t{index}.weight", shape) for index, shape in enumerate(NM_SHAPES))
    plan = Plan(tensors, assign_owners(tensors, 2))
    scores = tied_scores(plan, seed=4)
    alone = select(rule, scores, plan_of(*NM_SHAPES), SingleWorld(), sparsity=0.5)

    def job(world, bad=None):
        mine = {spec.name: scores[spec.name] for spec in plan.local(world.rank)}
        if bad is not None and world.rank == 1:
            mine[bad] = mine[bad].double()
        return select(rule, mine, plan, world, sparsity=0.5)

    results = run_ranks(2, job)
    merged = {name: mask for chosen in results for name, mask in chosen.masks.items()}
    assert all(np.array_equal(merged[name], alone.masks[name]) for name in alone.masks)
    assert all(chosen.kept == alone.kept for chosen in results)
    bad = plan.local(1)[0].name
    raised = []

    def failing(world):
        try:
            job(world, bad)
        except AgreedFailure as failure:  # every rank stops at the same collective (hpcprune.dist.failures)
            raised.append(failure)

    run_ranks(2, failing)
    assert len(raised) == 2 and all(failure.failed_rank == 1 for failure in raised)
    (cause,) = [failure.cause for failure in raised if failure.cause is not None]  # rank 1's own refusal
    assert isinstance(cause, ValueError) and bad in str(cause) and "float32" in str(cause)
