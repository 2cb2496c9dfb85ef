"""Structured pruning: channel groups traced from the models, channel norms, exact channel counts,
masks of whole channels that fine-tuning keeps dead, and the masked model equal to a compacted one.

    python -m pytest tests/test_structured.py -q
"""

from __future__ import annotations

import copy
from typing import get_args

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from hpcprune.archive.codec import unpack_mask
from hpcprune.config import PruneConfig, ScheduleConfig, load_config
from hpcprune.dist.world import SingleWorld
from hpcprune.errors import UsageError
from hpcprune.models.builders import LeNet5, LeNet300, ResNet8, load_checkpoint
from hpcprune.prune.channel_graph import (
    ChannelGroup,
    channel_groups,
    kept_channels,
    trace_channels,
)
from hpcprune.prune.channels import (
    CHANNEL_RULES,
    ChannelPruning,
    prune_global,
    prune_layer,
    prune_threshold,
)
from hpcprune.prune.masks import MaskEnforcer, apply_masks
from hpcprune.prune.plan import make_plan
from hpcprune.prune.selection import prune_count
from hpcprune.registry import CHANNEL_SCHEDULES, SEQUENTIAL
from tests.helpers import CONFIGS, archive_masks, run_cli


def prune_config(*overrides: str):
    return load_config(None, ["prune.granularity=channel", "prune.criterion=l1", *overrides]).prune


def pruning(model: nn.Module, *overrides: str) -> ChannelPruning:
    prune = prune_config(*overrides)
    return ChannelPruning(model, make_plan(model, prune, 1), prune)


def summary(groups: tuple[ChannelGroup, ...]) -> list[tuple]:
    """(producer weights, BatchNorms, (consumer, width) pairs) per group: what a reader checks by eye."""
    return [(tuple(p.weight for p in g.producers), g.norms, tuple((c.name, c.width) for c in g.consumers))
            for g in groups]


def randomise_batchnorms(model: nn.Module, seed: int = 0) -> None:
    """BatchNorms start at gamma 1, beta 0: give them values so that a zero is never an accident."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator))
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)


# --- the channel groups ------------------------------------------------------------------------------


def test_lenet300_neurons_are_two_groups_and_the_classes_none():
    traced = trace_channels(LeNet300())
    assert summary(traced.groups) == [
        (("fc1.weight",), (), (("fc2.weight", 1),)),
        (("fc2.weight",), (), (("fc3.weight", 1),)),
    ]
    assert [g.size for g in traced.groups] == [300, 100]
    assert [p.bias for g in traced.groups for p in g.producers] == ["fc1.bias", "fc2.bias"]
    assert traced.blocked == {"fc3.weight": "reaches the model's output"}


def test_lenet5_flatten_makes_a_channel_a_block_of_fc1_columns():
    model = LeNet5()
    groups = channel_groups(model)
    side = model.fc1.in_features // model.conv2.out_channels  # one 5x5 feature map per channel
    assert summary(groups) == [
        (("conv1.weight",), (), (("conv2.weight", 1),)),
        (("conv2.weight",), (), (("fc1.weight", side),)),
        (("fc1.weight",), (), (("fc2.weight", 1),)),
        (("fc2.weight",), (), (("fc3.weight", 1),)),
    ]
    assert side == 25 and [g.size for g in groups] == [6, 16, 120, 84]


def test_resnet8_residual_additions_join_the_branches_they_add():
    groups = channel_groups(ResNet8())
    assert summary(groups) == [
        # stem + first block's output: the identity shortcut adds the stem's channels to conv2's
        (("conv1.weight", "layer1.0.conv2.weight"), ("bn1", "layer1.0.bn2"),
         (("layer1.0.conv1.weight", 1), ("layer2.0.conv1.weight", 1), ("layer2.0.downsample.0.weight", 1))),
        (("layer1.0.conv1.weight",), ("layer1.0.bn1",), (("layer1.0.conv2.weight", 1),)),
        (("layer2.0.conv1.weight",), ("layer2.0.bn1",), (("layer2.0.conv2.weight", 1),)),
        # a downsampling block: conv2's output and the 1x1 shortcut's are added
        (("layer2.0.conv2.weight", "layer2.0.downsample.0.weight"), ("layer2.0.bn2", "layer2.0.downsample.1"),
         (("layer3.0.conv1.weight", 1), ("layer3.0.downsample.0.weight", 1))),
        (("layer3.0.conv1.weight",), ("layer3.0.bn1",), (("layer3.0.conv2.weight", 1),)),
        (("layer3.0.conv2.weight", "layer3.0.downsample.0.weight"), ("layer3.0.bn2", "layer3.0.downsample.1"),
         (("fc.weight", 1),)),
    ]
    assert [g.size for g in groups] == [16, 16, 32, 32, 64, 64]
    assert [p.norm for p in groups[3].producers] == ["layer2.0.bn2", "layer2.0.downsample.1"]
    assert [g.index for g in groups] == list(range(6))


def test_a_sequential_chain_with_a_flatten_module():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    assert summary(channel_groups(model)) == [(("0.weight",), ("1",), (("4.weight", 26 * 26),))]
    assert channel_groups(model)[0].producers[0].norm == "1"


class Concatenates(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(1, 4, 3), nn.Conv2d(1, 4, 3), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(torch.cat([self.a(x), self.b(x)], dim=1)).mean((2, 3))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.depthwise, self.head = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3, groups=4), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.depthwise(self.a(x)), 1), 1))


class Reshapes(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.b(torch.relu(self.a(x))).view(-1, 4))


@pytest.mark.parametrize("model, prunable, blocked", [
    (Concatenates(), [], {"a.weight", "b.weight", "head.weight"}),
    (Grouped(), [], {"a.weight", "depthwise.weight", "head.weight"}),
    (Reshapes(), ["a.weight"], {"b.weight", "head.weight"}),
])
def test_channels_used_in_untracked_ways_are_not_prunable(model, prunable, blocked):
    traced = trace_channels(model)
    assert [g.producers[0].weight for g in traced.groups] == prunable
    assert set(traced.blocked) == blocked


def test_a_model_without_prunable_channels_is_refused():
    with pytest.raises(UsageError, match="no prunable channel group"):
        pruning(Concatenates())


def test_groups_reaching_an_excluded_tensor_stay_whole():
    """Removing fc2's neurons would cut columns of the excluded fc3: only fc1's neurons remain prunable."""
    groups = pruning(LeNet300(), "prune.exclude=[fc3.weight]").groups
    assert [g.producers[0].weight for g in groups] == ["fc1.weight"]


@pytest.mark.parametrize("overrides, message", [
    (["prune.granularity=channel"], "prune.criterion: unknown channel criterion 'magnitude'"),
    (["prune.criterion=l2"], "prune.criterion: unknown weight criterion 'l2'"),
    (["prune.granularity=channel", "prune.criterion=l1", "model.name=checkpoint", "model.checkpoint=w.safetensors",
      "finetune.epochs=0"], "needs a module"),
])
def test_channel_settings_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(UsageError, match=message):
        load_config(None, overrides)


def other_choices(section, key: str, supported) -> list[str]:
    """The values the config accepts for `key` that channels do not support (rules, schedules of other kinds)."""
    return [value for value in get_args(section.model_fields[key].annotation) if value not in supported]


@pytest.mark.parametrize("key, value", [("prune.rule", rule) for rule in other_choices(PruneConfig, "rule", CHANNEL_RULES)]
                         + [("schedule.kind", kind) for kind in other_choices(ScheduleConfig, "kind", CHANNEL_SCHEDULES)
                            if kind != SEQUENTIAL])
def test_rules_and_schedules_of_single_weights_are_refused_for_channels(key, value):
    with pytest.raises(UsageError, match=f"{key} '{value}' does not apply to channels"):
        load_config(None, ["prune.granularity=channel", "prune.criterion=l1", f"{key}={value}"])


def test_the_block_sequential_pipeline_refuses_channels_in_its_own_words():
    """Sequential runs only on Hugging Face folders without training, so its own check speaks first."""
    with pytest.raises(UsageError, match="schedule.kind sequential prunes single weights: prune.granularity must be 'weight'"):
        load_config(None, ["prune.granularity=channel", "prune.criterion=l1", f"schedule.kind={SEQUENTIAL}",
                           "model.name=hf:/nowhere", "pretrain.epochs=0", "finetune.epochs=0"])


# --- scores --------------------------------------------------------------------------------------


def rows(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().double().flatten(1)


NORMS = {"l1": lambda w: rows(w).abs().sum(1), "l2": lambda w: rows(w).pow(2).sum(1).sqrt()}


@pytest.mark.parametrize("criterion", ["l1", "l2"])
@pytest.mark.parametrize("scale", [False, True])
def test_channel_scores_are_the_norms_of_the_rows_summed_over_coupled_producers(criterion, scale):
    torch.manual_seed(3)
    model = ResNet8()
    randomise_batchnorms(model)
    scores = pruning(model, f"prune.criterion={criterion}", f"prune.batchnorm_scale={scale}").scores(SingleWorld())
    norm = NORMS[criterion]

    def branch(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
        return norm(conv.weight) * (bn.weight.detach().double().abs() if scale else 1.0)

    block1, block2, block3 = model.layer1[0], model.layer2[0], model.layer3[0]
    expected = [
        branch(model.conv1, model.bn1) + branch(block1.conv2, block1.bn2),
        branch(block1.conv1, block1.bn1),
        branch(block2.conv1, block2.bn1),
        branch(block2.conv2, block2.bn2) + branch(block2.downsample[0], block2.downsample[1]),
        branch(block3.conv1, block3.bn1),
        branch(block3.conv2, block3.bn2) + branch(block3.downsample[0], block3.downsample[1]),
    ]
    assert len(scores) == len(expected)
    for ours, theirs in zip(scores, expected):
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-13)


def test_lenet300_neuron_scores_are_row_norms():
    model = LeNet300()
    scores = pruning(model, "prune.criterion=l2").scores(SingleWorld())
    np.testing.assert_allclose(scores[0], NORMS["l2"](model.fc1.weight).numpy(), rtol=1e-13)
    np.testing.assert_allclose(scores[1], NORMS["l2"](model.fc2.weight).numpy(), rtol=1e-13)


# --- rules ---------------------------------------------------------------------------------------


def test_global_rule_breaks_ties_by_position_and_keeps_each_groups_best():
    scores = [np.array([1.0, 1.0, 1.0, 5.0]), np.array([1.0, 1.0, 0.5]), np.array([0.1])]
    pruned, boundary = prune_global(scores, 0.5, None)  # round(0.5 * 8) = 4 channels
    # 0.5 first, then the 1.0 ties earliest first; the lone channel of group 2 is its best: kept
    assert [p.tolist() for p in pruned] == [[True, True, True, False], [False, False, True], [False]]
    assert boundary == 1.0


def test_rules_count_channels_exactly():
    generator = np.random.default_rng(0)
    scores = [generator.random(size) for size in (16, 16, 32, 32, 64, 64)]
    pruned, _ = prune_global(scores, 0.37, None)
    assert sum(int(p.sum()) for p in pruned) == prune_count(0.37, 224)
    pruned, _ = prune_layer(scores, 0.37, None)
    assert [int(p.sum()) for p in pruned] == [prune_count(0.37, s.size) for s in scores]
    pruned, boundary = prune_threshold(scores, 0.37, 0.25)
    assert boundary == 0.25
    for group, mask in zip(scores, pruned):
        assert np.array_equal(mask, group <= 0.25)  # uniform scores: every group has one above


def test_earlier_rounds_channels_stay_pruned():
    model = ResNet8()
    channels = pruning(model, "prune.rule=layer")
    first = channels.select(SingleWorld(), 0.25)
    second = channels.select(SingleWorld(), 0.5, previous=first.masks)
    for name, packed in first.masks.items():
        before, after = np.unpackbits(packed), np.unpackbits(second.masks[name])
        assert not np.any(after & ~before), name  # nothing pruned comes back
    assert second.attrs["channels_kept"] == sum(g.size - prune_count(0.5, g.size) for g in channels.groups)


def test_pruning_every_channel_of_a_group_is_refused():
    with pytest.raises(UsageError, match="would empty a layer"):
        pruning(LeNet5(), "prune.rule=layer").select(SingleWorld(), 0.99)


# --- masks: whole channels, through fine-tuning, and equal to the compacted model ------------------


def columns(channels: torch.Tensor, width: int) -> torch.Tensor:
    return (channels[:, None] * width + torch.arange(width)).flatten()


def compact(model: nn.Module, groups, masks) -> nn.Module:
    """The physically smaller model: every slice of every group keeps only the kept channels."""
    small = copy.deepcopy(model)
    state = dict(small.state_dict())
    for group in groups:
        kept = kept_channels(group, masks)
        for piece in group.present_slices(state):
            state[piece.name] = state[piece.name].index_select(piece.dim, columns(kept, piece.width))
    for name, tensor in state.items():
        module_name, _, attribute = name.rpartition(".")
        module = small.get_submodule(module_name)
        setattr(module, attribute, nn.Parameter(tensor) if attribute in module._parameters else tensor)
    return small


def structured_masks(channels: ChannelPruning, sparsity: float) -> dict[str, torch.Tensor]:
    selection = channels.select(SingleWorld(), sparsity)
    masks = {name: unpack_mask(packed, selection.shapes[name]) for name, packed in selection.masks.items()}
    return {**masks, **channels.companion_masks(masks)}


def assert_whole_channels_dead(model: nn.Module, channels: ChannelPruning, masks) -> int:
    """The masks prune exactly the rows of the pruned channels' producers and the columns of their
    consumers, nothing else; those channels are zero in every slice (rows, biases, BatchNorm affines,
    columns). Returns the number of pruned channels."""
    state = model.state_dict()
    expected = {name: torch.ones_like(mask) for name, mask in masks.items()}
    pruned_channels = 0
    for group in channels.groups:
        gone = sorted(set(range(group.size)) - set(kept_channels(group, masks).tolist()))
        pruned_channels += len(gone)
        for piece in group.slices():
            index = columns(torch.tensor(gone, dtype=torch.long), piece.width)
            if piece.name in expected:
                expected[piece.name].index_fill_(piece.dim, index, False)
            if not piece.name.endswith(("running_mean", "running_var")):  # statistics may drift:
                assert torch.count_nonzero(state[piece.name].index_select(piece.dim, index)) == 0, piece.name
    for name, mask in masks.items():
        assert torch.equal(mask, expected[name]), name
    return pruned_channels


@pytest.mark.parametrize("build, sparsity", [(ResNet8, 0.5), (LeNet5, 0.4)])
def test_pruned_channels_stay_zero_through_sgd_momentum_and_the_model_equals_its_compaction(build, sparsity):
    torch.manual_seed(0)
    model = build()
    randomise_batchnorms(model)
    channels = pruning(model, "prune.criterion=l2", "prune.batchnorm_scale=true")
    masks = structured_masks(channels, sparsity)
    apply_masks(model, masks)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    enforcer = MaskEnforcer(model, masks, optimizer)
    model.train()
    for step in range(4):
        inputs, targets = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        enforcer.before_step()
        optimizer.step()
        enforcer.after_step()

    assert assert_whole_channels_dead(model, channels, masks) == prune_count(sparsity, channels.channels)
    small = compact(model, channels.groups, masks)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    model.eval(), small.eval()
    probe = torch.randn(32, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(small(probe), model(probe), rtol=1e-5, atol=1e-5)


def test_compaction_groups_name_the_modules_the_exporter_shrinks():
    from hpcprune.deploy.compact import compaction_groups

    groups = compaction_groups(ResNet8())
    assert groups[3].producers == ("layer2.0.conv2", "layer2.0.downsample.0")
    assert groups[3].norms == ("layer2.0.bn2", "layer2.0.downsample.1")
    assert groups[3].consumers == (("layer3.0.conv1", 1), ("layer3.0.downsample.0", 1))
    assert compaction_groups(LeNet5())[1].consumers == (("fc1", 25),)


# --- the real CLI ----------------------------------------------------------------------------------


def test_cli_prunes_whole_resnet8_channels_and_records_them(tmp_path):
    out = tmp_path / "run.h5"
    finished = run_cli("prune", "--config", str(CONFIGS / "structured_resnet8.yaml"), "--out", str(out),
                       *[f"--set={o}" for o in ("data.dataset=synthetic", "data.synthetic_size=128",
                                                 "data.validation_size=32", "pretrain.epochs=0",
                                                 "finetune.epochs=1", "progress=false")])
    assert finished.returncode == 0, finished.stderr
    model = ResNet8()
    channels = pruning(model)
    pruned = sum(prune_count(0.5, group.size) for group in channels.groups)  # the config's rule: layer
    shapes = {name: tuple(parameter.shape) for name, parameter in model.named_parameters()}
    packed = archive_masks(out, 2)
    final = {name: unpack_mask(bits, shapes[name]) for name, bits in packed.items()}
    with h5py.File(out, "r") as archive:
        attrs = archive["rounds/0002"].attrs
        assert int(attrs["channels_total"]) == channels.channels == 224
        assert int(attrs["channels_kept"]) == 224 - pruned
        assert int(attrs["kept"]) == sum(int(mask.sum()) for mask in final.values())
        state_file = out.parent / attrs["state_file"]
    load_checkpoint(model, state_file)  # the fine-tuned weights of the last round
    assert assert_whole_channels_dead(model, channels, final) == pruned
    for group in channels.groups:
        assert kept_channels(group, final).numel() == group.size - prune_count(0.5, group.size)
    assert "50.0000 % of channels asked" in finished.stdout  # the summary says what the target counts
    first = archive_masks(out, 1)  # round 2 prunes on top of round 1
    assert all(not np.any(np.unpackbits(packed[name]) & ~np.unpackbits(first[name])) for name in first)
