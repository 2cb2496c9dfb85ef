"""Channel structure: which slices of a model's tensors live or die with each output channel.

    hpcprune prune --config configs/structured_resnet8.yaml   # prune.granularity: channel uses it

`channel_groups(model)` traces the model with torch.fx and returns its prunable channel groups. A
group is a set of channels that can only be removed together, with every tensor slice that goes
with them:

  producers   the Conv/Linear layers whose output channels (weight rows, dim 0) make the group's
              values, each with its bias and the BatchNorm that directly follows it. Producers whose
              outputs are added (or multiplied) elementwise — the two branches of a residual block —
              share one group: channel c of one only exists together with channel c of the other.
  norms       every BatchNorm over the group's channels (weight, bias, running_mean, running_var).
  consumers   the Conv/Linear layers that read the group's values: their input columns (dim 1).
              After `torch.flatten(x, 1)` a channel is a block of `width` consecutive columns of
              the Linear that follows (width = in_features / channels, e.g. H*W for LeNet-5's fc1).

To compact a model, keep the same channel indices `kept_channels(group, masks)` in every slice of
`group.slices()`: slice `s` keeps entries [c*s.width, (c+1)*s.width) along `s.dim` for each kept c.
Tensors outside every group stay whole. A tensor may be a producer in one group and a consumer in
another (a middle layer): its rows follow the first group, its columns the second.

Channels are tracked through the operations that act on each channel alone: activations, pooling,
dropout, flatten(x, 1) feeding a Linear, BatchNorm, and elementwise add/sub/mul of two channel
tensors. Any other use of a group's values (the model's output — so the classifier's classes —,
concatenation, reshapes, LayerNorm, grouped convolutions, unknown modules) makes the group
unprunable: removing its channels could change the model's function. `trace_channels` also returns
those groups, with the reason, for inspection.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from hpcprune.errors import UsageError
from hpcprune.prune.plan import PRUNABLE_MODULES

NORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")

# Operations that act on every channel alone: channel c of the output depends only on channel c of
# the (first) input, so a channel group passes through them unchanged.
CHANNELWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardtanh,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
CHANNELWISE_FUNCTIONS = {
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.hardswish,
    torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
}
CHANNELWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "float", "detach"}
ELEMENTWISE = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
               torch.add, torch.sub, torch.mul}
ELEMENTWISE_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_"}
HARMLESS_METHODS = {"size", "dim"}  # read the shape, not the values: no channel is used


@dataclass(frozen=True)
class Slice:
    """Channel c of a group is entries [c * width, (c + 1) * width) of `name` along `dim`."""

    name: str  # a key of model.state_dict(): parameter or buffer
    dim: int
    width: int = 1


@dataclass(frozen=True)
class Producer:
    """A Conv/Linear layer whose output channels (weight rows) belong to a group."""

    weight: str  # parameter name, e.g. "layer1.0.conv2.weight": rows are the channels
    bias: str | None  # its bias, if any
    norm: str | None  # module name of the BatchNorm applied directly to its output, if any


@dataclass(frozen=True)
class ChannelGroup:
    """Channels removed together; see the module docstring for the roles."""

    index: int  # position in the model's order (its first producer's parameter order): breaks ties
    size: int  # number of channels
    producers: tuple[Producer, ...]  # in parameter order
    norms: tuple[str, ...]  # BatchNorm module names over these channels
    consumers: tuple[Slice, ...]  # input columns of the layers reading them (dim 1)

    @property
    def weights(self) -> tuple[str, ...]:
        """Every Linear/Conv weight the group touches: producers' rows and consumers' columns."""
        return tuple(p.weight for p in self.producers) + tuple(c.name for c in self.consumers)

    def companions(self) -> Iterator[Slice]:
        """Producers' biases and BatchNorms' tensors: what a pruned channel zeroes besides weight rows."""
        for producer in self.producers:
            if producer.bias is not None:
                yield Slice(producer.bias, 0)
        for norm in self.norms:
            for tensor in NORM_TENSORS:
                yield Slice(f"{norm}.{tensor}", 0)

    def slices(self) -> Iterator[Slice]:
        """Every slice that shrinks with the group's channels (norm tensors a module lacks are skipped
        by `present_slices`)."""
        yield from (Slice(p.weight, 0) for p in self.producers)
        yield from self.companions()
        yield from self.consumers

    def present_slices(self, state: Mapping[str, torch.Tensor]) -> list[Slice]:
        """`slices()` restricted to the names in `state` (a BatchNorm may be non-affine, or have no stats)."""
        return [item for item in self.slices() if state.get(item.name) is not None]


@dataclass(frozen=True)
class Traced:
    """Every group of the model, prunable or not."""

    groups: tuple[ChannelGroup, ...]  # prunable, in model order (index 0, 1, ...)
    blocked: dict[str, str]  # first producer weight of each unprunable group -> why


def channel_groups(model: nn.Module) -> tuple[ChannelGroup, ...]:
    """The prunable channel groups of `model`, in model order."""
    return trace_channels(model).groups


def kept_channels(group: ChannelGroup, masks: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Indices of the channels a structured mask keeps: those whose producer rows keep any weight.

    Structured masks keep or drop whole rows, so any producer tells; all of them are read so that a
    row kept by one producer keeps the channel.
    """
    alive = torch.zeros(group.size, dtype=torch.bool)
    for producer in group.producers:
        alive |= masks[producer.weight].reshape(group.size, -1).any(dim=1).cpu()
    return torch.nonzero(alive).flatten()


# --- tracing ------------------------------------------------------------------------------------


@dataclass
class _Group:
    """A group while tracing; merged groups point to their representative through `parent`."""

    size: int
    parent: _Group | None = None
    producers: list[tuple[str, nn.Module]] = field(default_factory=list)  # (module name, module)
    norms: list[str] = field(default_factory=list)
    follows: dict[str, str] = field(default_factory=dict)  # producer module -> BatchNorm right after it
    consumers: dict[str, int] = field(default_factory=dict)  # consumer module -> width
    blocked: str | None = None

    def root(self) -> _Group:
        group = self
        while group.parent is not None:
            group = group.parent
        return group


@dataclass(frozen=True)
class _Value:
    """What tracing knows of a node's value: its channels belong to `group`, laid out as `layout`:
    `first` (dim 1: conv maps), `last` (final dim: Linear outputs) or `flat` (flatten(x, 1) of `first`)."""

    group: _Group
    layout: str


class _Tracer:
    def __init__(self, model: nn.Module):
        self.model = model
        self.modules = dict(model.named_modules())
        self.values: dict[fx.Node, _Value] = {}
        self.produced: dict[str, _Group] = {}  # module -> the group its outputs belong to
        self.consumed: dict[str, _Group] = {}  # module -> the group its inputs belong to
        self.groups: list[_Group] = []

    # -- the union-find of coupled channels --

    def join(self, first: _Group, second: _Group, why: str) -> _Group:
        a, b = first.root(), second.root()
        if a is b:
            return a
        if a.size != b.size:
            self.block(a, why)
            self.block(b, why)
            return a
        b.parent = a
        a.producers += b.producers
        a.norms += b.norms
        a.follows.update(b.follows)
        for module, width in b.consumers.items():
            self.add_consumer(a, module, width)
        a.blocked = a.blocked or b.blocked
        return a

    def block(self, group: _Group, why: str) -> None:
        root = group.root()
        root.blocked = root.blocked or why

    def add_consumer(self, group: _Group, module: str, width: int) -> None:
        root = group.root()
        if root.consumers.get(module, width) != width:
            self.block(root, f"{module} reads these channels with two layouts")
        root.consumers[module] = width

    # -- nodes --

    def run(self, graph: fx.Graph) -> None:
        for node in graph.nodes:
            inputs = [arg for arg in node.all_input_nodes if arg in self.values]
            if node.op == "call_module":
                self.call_module(node, self.modules[node.target], inputs)
            elif node.op == "call_function":
                self.call(node, node.target in CHANNELWISE_FUNCTIONS, node.target in ELEMENTWISE, inputs,
                          flatten=node.target is torch.flatten)
            elif node.op == "call_method":
                if node.target in HARMLESS_METHODS:
                    continue
                self.call(node, node.target in CHANNELWISE_METHODS, node.target in ELEMENTWISE_METHODS, inputs,
                          flatten=node.target == "flatten")
            else:  # output (the model's result keeps its channels), placeholder, get_attr
                self.block_all(inputs, f"reaches the model's {node.op}")

    def block_all(self, inputs: list[fx.Node], why: str) -> None:
        for arg in inputs:
            self.block(self.values[arg].group, why)

    def call(self, node: fx.Node, channelwise: bool, elementwise: bool, inputs: list[fx.Node], *, flatten: bool) -> None:
        what = f"{node.op} {getattr(node.target, '__name__', node.target)}"
        first = node.args[0] if node.args else None
        if flatten and first in self.values and len(inputs) == 1:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            self.flatten(node, self.values[first], (start, end), what)
        elif channelwise and inputs == [first] and first is not None:
            self.values[node] = self.values[first]
        elif elementwise and inputs:
            self.elementwise(node, inputs, what)
        else:
            self.block_all(inputs, f"used by {what}")

    def flatten(self, node: fx.Node, value: _Value, dims: tuple[int, int], what: str) -> None:
        """Only flatten(x, 1) of a channel map keeps channels apart: each becomes a block of features."""
        if value.layout == "first" and dims == (1, -1):
            self.values[node] = _Value(value.group, "flat")
        else:
            self.block(value.group, f"used by {what} other than flatten(x, 1) of a channel map")

    def elementwise(self, node: fx.Node, inputs: list[fx.Node], what: str) -> None:
        tensors = [arg for arg in node.all_input_nodes]
        if len(tensors) != len(inputs):  # a tensor of unknown channels joins in: nothing to couple with
            self.block_all(inputs, f"combined with an untracked tensor by {what}")
            return
        values = [self.values[arg] for arg in inputs]
        group = values[0].group
        for value in values[1:]:
            if value.layout != values[0].layout:
                self.block(group, f"{what} of two layouts")
                self.block(value.group, f"{what} of two layouts")
            group = self.join(group, value.group, f"{what} of different channel counts")
        self.values[node] = _Value(group, values[0].layout)

    def call_module(self, node: fx.Node, module: nn.Module, inputs: list[fx.Node]) -> None:
        name = str(node.target)
        if isinstance(module, PRUNABLE_MODULES):
            self.layer(node, name, module, inputs)
        elif isinstance(module, NORM_MODULES) and inputs:
            self.norm(node, name, module, self.values[inputs[0]])
        elif isinstance(module, CHANNELWISE_MODULES) and inputs:
            self.values[node] = self.values[inputs[0]]
        elif isinstance(module, nn.Flatten) and inputs:
            self.flatten(node, self.values[inputs[0]], (module.start_dim, module.end_dim), f"module {name}")
        else:
            self.block_all(inputs, f"used by module {name} ({type(module).__name__})")

    def layer(self, node: fx.Node, name: str, module: nn.Module, inputs: list[fx.Node]) -> None:
        channels_in, channels_out = _in_out(module)
        grouped = getattr(module, "groups", 1) != 1
        for arg in inputs:
            self.read(name, module, self.values[arg], channels_in, grouped)
        group = _Group(channels_out)
        self.groups.append(group)
        group.producers.append((name, module))
        if grouped:
            self.block(group, f"{name} is a grouped convolution")
        if name in self.produced:  # a layer called twice: both outputs are the same rows
            group = self.join(self.produced[name], group, f"{name} called twice")
        self.produced[name] = group
        self.values[node] = _Value(group, "last" if isinstance(module, nn.Linear) else "first")

    def read(self, name: str, module: nn.Module, value: _Value, channels_in: int, grouped: bool) -> None:
        """`module` reads `value`: its input columns join the value's group, when the layout allows."""
        group = value.group
        width, problem = _columns(module, value, channels_in, group.root().size)
        if grouped:
            problem = f"read by the grouped convolution {name}"
        if problem is not None:
            self.block(group, problem)
            return
        if name in self.consumed:  # a layer called on two inputs: its columns couple them
            group = self.join(self.consumed[name], group, f"{name} reads inputs of different channel counts")
        self.consumed[name] = group
        self.add_consumer(group, name, width)

    def norm(self, node: fx.Node, name: str, module: nn.Module, value: _Value) -> None:
        root = value.group.root()
        if module.num_features != root.size or value.layout == "flat":
            self.block(root, f"{name} does not normalise these channels")
            return
        root.norms.append(name)
        source = node.args[0]
        if source.op == "call_module" and str(source.target) in self.produced:
            root.follows[str(source.target)] = name
        self.values[node] = value


def _in_out(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.in_channels, module.out_channels


def _columns(module: nn.Module, value: _Value, channels_in: int, size: int) -> tuple[int, str | None]:
    """(width of a channel's block of input columns, or why the module's input is not the channels)."""
    if isinstance(module, nn.Linear):
        if value.layout == "first":
            return 0, "read by a Linear along a spatial dimension"
        if channels_in % size:
            return 0, "flattened into a Linear whose inputs are not whole channels"
        width = channels_in // size
        return width, None if value.layout == "flat" or width == 1 else "read by a Linear of another width"
    if value.layout != "first" or channels_in != size:
        return 0, "read by a convolution as something other than its input channels"
    return 1, None


def trace_channels(model: nn.Module) -> Traced:
    """Trace `model` with torch.fx and derive its channel groups, prunable or not."""
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as error:  # fx raises many types on control flow it cannot follow
        raise UsageError(f"channel pruning needs a model torch.fx can trace; {type(model).__name__} cannot "
                         f"be traced ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None
    tracer = _Tracer(model)
    tracer.run(graph)
    return _finish(model, tracer)


def _finish(model: nn.Module, tracer: _Tracer) -> Traced:
    order = {name: index for index, (name, _) in enumerate(model.named_parameters())}
    module_order = {name: index for index, (name, _) in enumerate(model.named_modules())}
    roots = {id(group.root()): group.root() for group in tracer.groups}.values()
    ordered = sorted(roots, key=lambda group: min(order[f"{name}.weight"] for name, _ in group.producers))
    groups, blocked = [], {}
    for root in ordered:
        producers = sorted(dict(root.producers).items(), key=lambda item: order[f"{item[0]}.weight"])
        if root.blocked is not None:
            blocked[f"{producers[0][0]}.weight"] = root.blocked
            continue
        groups.append(ChannelGroup(
            index=len(groups),
            size=root.size,
            producers=tuple(Producer(f"{name}.weight", f"{name}.bias" if module.bias is not None else None,
                                     root.follows.get(name)) for name, module in producers),
            norms=tuple(sorted(set(root.norms), key=module_order.__getitem__)),
            consumers=tuple(Slice(f"{name}.weight", 1, width) for name, width in
                            sorted(root.consumers.items(), key=lambda item: order[f"{item[0]}.weight"])),
        ))
    return Traced(tuple(groups), blocked)
