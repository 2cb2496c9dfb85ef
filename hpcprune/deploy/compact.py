"""Model reconstruction: remove silent channels and neurons, leaving a physically smaller dense model.

    hpcprune export runs/structured.h5 --format compact --out model.compact.safetensors

A structured mask prunes whole output channels (Conv2d) or neurons (Linear): their weight rows are
all zero, and the channel's bias and BatchNorm affine are zero too, so the channel carries exactly
0.0 to every layer that reads it. Such a channel can be cut out of the model: the rows of its
producers, its BatchNorm entries and the matching input columns of its consumers are removed, and
the smaller model computes the same function (up to float summation order).

Which layers share a channel (residual additions tie several producers to one channel; a flatten
makes one channel many input columns of the next Linear) is the channel graph of
`hpcprune.prune.channel_graph`; this module only asks it for `ChannelGroup`s. A channel is removed only when it
is silent in every member of its group, so compaction never changes the function, whatever made
the mask.

A compacted model is saved as its state dict plus `module_sizes`, the new sizes of each shrunk
module; `rebuild` applies them to a freshly built model of the same architecture, so nothing is
pickled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hpcprune.errors import UsageError
from hpcprune.prune.channel_graph import channel_groups

# The attributes that give a module its size, per kind; the tensors' shapes follow from them.
SIZE_ATTRIBUTES: dict[type[nn.Module], tuple[str, str]] = {
    nn.Conv2d: ("in_channels", "out_channels"),
    nn.Linear: ("in_features", "out_features"),
}
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that live or die together, as `hpcprune.prune.channel_graph` describes them.

    producers: modules (Conv2d, Linear) whose output channels, weight dim 0 and bias, are the group's;
    norms: BatchNorm modules over those channels;
    consumers: (module, columns per channel): modules reading the channels as input, weight dim 1;
    channel c is columns c*k .. c*k+k-1 (k > 1 when a flatten spreads a channel over a feature map).
    """

    producers: tuple[str, ...]
    norms: tuple[str, ...] = ()
    consumers: tuple[tuple[str, int], ...] = ()


def compaction_groups(model: nn.Module) -> list[ChannelGroup]:
    """The model's prunable channel groups (hpcprune.prune.channel_graph) in this module's form:
    module names instead of weight names, for `hpcprune export --format compact`."""

    def module(name: str) -> str:
        return name.removesuffix("weight").removesuffix(".")

    return [ChannelGroup(producers=tuple(module(p.weight) for p in group.producers), norms=group.norms,
                         consumers=tuple((module(c.name), c.width) for c in group.consumers))
            for group in channel_groups(model)]


@dataclass
class Compaction:
    model: nn.Module  # the compacted model (the input model, changed in place)
    module_sizes: dict[str, dict[str, int]]  # module -> its new size attributes
    channels: list[tuple[str, int, int]]  # per group: first producer, channels kept, channels before


def compact_model(model: nn.Module, groups: Sequence[ChannelGroup]) -> Compaction:
    """Cut every silent channel out of `model` (changed in place); see the module docstring."""
    modules = dict(model.named_modules())
    module_sizes: dict[str, dict[str, int]] = {}
    channels = []
    with torch.no_grad():
        for group in groups:
            _check_members(group, modules)
            live = _live_channels(group, modules)
            channels.append((group.producers[0], int(live.numel()), _channel_count(group, modules)))
            if live.numel() == channels[-1][2]:
                continue
            for name in group.producers:
                _keep_outputs(modules[name], live)
            for name in group.norms:
                _keep_norm(modules[name], live)
            for name, columns_per_channel in group.consumers:
                _keep_inputs(modules[name], _columns(live, columns_per_channel))
            for name in (*group.producers, *group.norms, *(name for name, _ in group.consumers)):
                module_sizes[name] = size_attributes(modules[name])
    return Compaction(model, module_sizes, channels)


def size_attributes(module: nn.Module) -> dict[str, int]:
    if isinstance(module, NORMS):
        return {"num_features": module.num_features}
    return {attribute: getattr(module, attribute) for attribute in SIZE_ATTRIBUTES[_kind(module)]}


def rebuild(model: nn.Module, module_sizes: Mapping[str, Mapping[str, int]], state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Give a freshly built `model` the sizes of a compacted one and load its `state` (in place)."""
    modules = dict(model.named_modules())
    for name, sizes in module_sizes.items():
        if name not in modules:
            raise UsageError(f"compacted module {name!r} does not exist in model {type(model).__name__}")
        for attribute, value in sizes.items():
            setattr(modules[name], attribute, int(value))
        prefix = f"{name}." if name else ""
        for tensor_name, tensor in list(modules[name].named_parameters(recurse=False)):
            setattr(modules[name], tensor_name, nn.Parameter(torch.empty_like(state[prefix + tensor_name])))
        for tensor_name, tensor in list(modules[name].named_buffers(recurse=False)):
            if tensor.dim():  # num_batches_tracked is a count, not per channel
                setattr(modules[name], tensor_name, torch.empty_like(state[prefix + tensor_name]))
    model.load_state_dict(state, strict=True)
    return model


# --- which channels live ---------------------------------------------------------------------


def _live_channels(group: ChannelGroup, modules: Mapping[str, nn.Module]) -> torch.Tensor:
    """Indices of the channels that are not silent in every member; at least one stays."""
    count = _channel_count(group, modules)
    live = torch.zeros(count, dtype=torch.bool)
    for name in group.producers:
        module = modules[name]
        live |= (module.weight.reshape(count, -1) != 0).any(dim=1)
        if module.bias is not None:
            live |= module.bias != 0
    for name in group.norms:
        norm = modules[name]
        if norm.weight is None or norm.bias is None:  # without an affine, BatchNorm turns 0 into -mean/std
            return torch.arange(count)
        live |= (norm.weight != 0) | (norm.bias != 0)
    if not live.any():  # a layer of width 0 would not run: keep one silent channel instead
        live[0] = True
    return live.nonzero().flatten()


def _channel_count(group: ChannelGroup, modules: Mapping[str, nn.Module]) -> int:
    return modules[group.producers[0]].weight.shape[0]


def _check_members(group: ChannelGroup, modules: Mapping[str, nn.Module]) -> None:
    for name in (*group.producers, *group.norms, *(name for name, _ in group.consumers)):
        module = modules.get(name)
        if module is None:
            raise ValueError(f"channel group names {name!r}, which the model does not have")
        if not isinstance(module, NORMS) and getattr(module, "groups", 1) != 1:
            raise UsageError(f"cannot compact {name!r}: grouped convolutions are not supported")
    count = _channel_count(group, modules)
    for name in group.producers[1:]:
        if modules[name].weight.shape[0] != count:
            raise ValueError(f"channel group of {group.producers[0]!r}: {name!r} has {modules[name].weight.shape[0]} channels, not {count}")


def _columns(live: torch.Tensor, columns_per_channel: int) -> torch.Tensor:
    """Input columns of the live channels, in order (a flattened channel is a block of columns)."""
    return (live[:, None] * columns_per_channel + torch.arange(columns_per_channel)).flatten()


# --- shrinking modules -----------------------------------------------------------------------


def _kind(module: nn.Module) -> type[nn.Module]:
    for kind in SIZE_ATTRIBUTES:
        if isinstance(module, kind):
            return kind
    raise UsageError(f"cannot compact a {type(module).__name__}: only Conv2d, Linear and BatchNorm are supported")


def _keep_outputs(module: nn.Module, live: torch.Tensor) -> None:
    module.weight = nn.Parameter(module.weight[live].clone())
    if module.bias is not None:
        module.bias = nn.Parameter(module.bias[live].clone())
    setattr(module, SIZE_ATTRIBUTES[_kind(module)][1], int(live.numel()))


def _keep_inputs(module: nn.Module, columns: torch.Tensor) -> None:
    module.weight = nn.Parameter(module.weight[:, columns].clone())
    setattr(module, SIZE_ATTRIBUTES[_kind(module)][0], int(columns.numel()))


def _keep_norm(norm: nn.Module, live: torch.Tensor) -> None:
    norm.weight = nn.Parameter(norm.weight[live].clone())
    norm.bias = nn.Parameter(norm.bias[live].clone())
    norm.running_mean = norm.running_mean[live].clone()
    norm.running_var = norm.running_var[live].clone()
    norm.num_features = int(live.numel())
