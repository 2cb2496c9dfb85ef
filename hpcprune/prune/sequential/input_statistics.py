"""Statistics of a block's Linear inputs, one window at a time, summed exactly over every rank's windows.

    hpcprune prune --config configs/llm_wanda.yaml     # input_squares, for Wanda

Forward pre-hooks on the block's Linear layers see each layer's input X (positions x in_features;
padding positions of sentence windows left out). Per window, each statistic a method asks for
becomes one float64 term (`STATISTICS`):
- input_squares: Σ_t x_tj² per input feature j (Wanda's ‖X_j‖₂ squared), shape [in];
- hessian: 2·XᵀX (SparseGPT's H), shape [in, in], float64 on the block's device; the total is
  divided by the number N of calibration windows, H = 2/N·ΣXᵀX, as SparseGPT's reference code keeps it.
  Only its upper triangle is computed and summed (hpcprune.prune.sequential.gram: half the work).
Layers that read the same tensor (q, k and v of attention; gate and up of a gated MLP) share one
statistic: the first of them to run leads the group, and the grouping every rank saw is
agreed on before the sums, so a rank without windows adds empty sums in the same order.

A group of consecutive windows (`sequential.window_group`, which always sits whole on one rank) is
the unit: each window's rows are added into the group's float64 sums in window order, the same
way on whichever rank holds the group (the Hessian's by syrk's own C ← XᵀX + C), and `hpcprune.dist.exact_sum` adds the groups' sums
as integers, so the totals have the same bits for any world size. Their float64 values are what
the methods read. Groups, not windows, because an exact-sum term costs several passes over a
statistic the size of a Hessian, as much as the product that made it; a float64 addition is one.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from hpcprune.dist.exact_sum import ExactSum, reduce_exactly
from hpcprune.dist.world import World
from hpcprune.prune.sequential.gram import add_gram, packed, packed_size, unpacked
from hpcprune.prune.sequential.layers import BlockLayer


def add_input_squares(total: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    squares = rows.to(torch.float64).square_().sum(0)  # squared in the copy: one float64 array, not two
    return squares if total is None else total.add_(squares)


def _same(total: torch.Tensor, features: int | None = None) -> torch.Tensor:
    return total


@dataclass(frozen=True)
class Statistic:
    add: Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]  # group's sum so far (None: none), input rows -> the new sum
    shape: Callable[[int], tuple[int, ...]]  # the exact sum's shape for in_features inputs
    per_window: bool = False  # the total is divided by the number of calibration windows
    factor: float = 1.0  # a power of two the total is multiplied by: the same bits as scaling every term
    summed: Callable[[torch.Tensor], torch.Tensor] = _same  # what of a group's sum the exact sum adds
    unpacked: Callable[[torch.Tensor, int], torch.Tensor] = _same  # the total as the methods read it


STATISTICS: dict[str, Statistic] = {
    "input_squares": Statistic(add_input_squares, lambda features: (features,)),
    # SparseGPT's reference code (and llm-compressor's) keep H as 2/N·ΣXᵀX over N sequences: the same
    # scaling here, so that the damping and the saliencies are on the scale those codes use.
    # The 2 of 2XᵀX scales the total, not each term: a power of two changes no bit of the sums.
    "hessian": Statistic(add_gram, lambda features: (packed_size(features),), per_window=True, factor=2.0,
                         summed=packed, unpacked=unpacked),
}

LayerStatistics = dict[str, dict[str, torch.Tensor]]  # layer name -> kind -> float64 total

MAX_WINDOW_GROUP = 4
MIN_GROUPS = 16


def windows_per_term(windows: int, configured: int | None = None) -> int:
    """Windows a group holds: `configured`, or as many as leave at least MIN_GROUPS groups, at most
    MAX_WINDOW_GROUP (four cut the exact sums' cost by four; more would idle ranks, not save time)."""
    return configured or max(1, min(MAX_WINDOW_GROUP, windows // MIN_GROUPS))


def input_rows(inputs: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """A Linear's input as rows of features; `keep` (the window's token mask) drops padding positions."""
    rows = inputs.detach().reshape(-1, inputs.shape[-1])
    if keep is not None and keep.numel() == rows.shape[0]:
        rows = rows[keep.reshape(-1).to(rows.device).bool()]
    return rows


class WindowHooks:
    """Forward pre-hooks on a block's layers that add one term per group of windows and layer group.

    A subclass gives `_hook(layer)` (the hook, which sees `self._keep`, the window's token mask) and
    `_end_group()` (the group's terms into the exact sums; also called, with nothing pending, before
    the first window), and may give `_end_window()` (after a window's forward). Within `with hooks:`
    the hooks are registered; `with hooks.window(keep, index):` frames one window (index: its place
    among all calibration windows, whose `group` consecutive ones make a group; None: the windows
    framed so far). A window that raises ends the pass: its sums are not used.
    """

    def __init__(self, layers: list[BlockLayer], group: int = 1):
        self.layers, self.group = layers, group
        self._handles: list = []
        self._keep: torch.Tensor | None = None
        self._group_index: int | None = None
        self._windows_seen = 0

    def __enter__(self):
        for layer in self.layers:
            self._handles.append(self._register(layer.module, self._hook(layer)))
        return self

    def _register(self, module, hook: Callable):
        """A forward pre-hook (it sees the layer's input); a subclass that needs the output too says so."""
        return module.register_forward_pre_hook(hook)

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextlib.contextmanager
    def window(self, keep: torch.Tensor | None, index: int | None = None) -> Iterator[None]:
        self._keep = keep
        group = (self._windows_seen if index is None else index) // self.group
        if group != self._group_index:
            self._end_group()
            self._group_index = group
        yield
        self._end_window()
        self._windows_seen += 1
        self._keep = None

    def _hook(self, layer: BlockLayer) -> Callable:
        raise NotImplementedError

    def _end_window(self) -> None:
        """After the window's forward (nothing by default)."""

    def _end_group(self) -> None:
        raise NotImplementedError


class AllInputsSeen(Exception):
    """Raised by the last layer's hook when nothing after it is wanted: the rest of the block's forward
    (the last layer's product and what follows it) would only make outputs that nobody reads."""


class InputStatistics(WindowHooks):
    """Hooks on `layers` while the block runs the rank's windows; `reduce` gives every rank the totals.

        with InputStatistics(layers, kinds, windows, device, group=n, stop_early=...) as statistics:
            for each window, in order: with statistics.window(token_mask, index): run the block
        totals = statistics.reduce(world)

    `stop_early`: once every layer has read its input in a window, the hook raises AllInputsSeen
    (the caller catches it inside the window's frame, which then counts).
    """

    def __init__(self, layers: list[BlockLayer], kinds: tuple[str, ...], windows: int, device: torch.device,
                 mantissa_bits: int | None = None, group: int = 1, stop_early: bool = False):
        super().__init__(layers, group)
        self.kinds, self.windows, self.device, self.mantissa_bits = kinds, windows, device, mantissa_bits
        self.stop_early = stop_early
        self._fired: set[str] = set()  # layers whose input this window has reached
        self.leaders: dict[str, str] = {}  # layer -> the first layer that read the same input (this rank's view)
        self.shared: dict[str, str] = {}  # the same over all ranks, once `reduce` has agreed on it
        # The layer that reads a window's first Linear input: that input owes nothing to the block's
        # other layers, so it is the same when the block runs pruned. `first` once agreed.
        self._firsts: set[str] = set()
        self.first: str | None = None
        self.sums: dict[tuple[str, str], ExactSum] = {}  # (leader, kind) -> this rank's sum
        self._seen: list[tuple[torch.Tensor, str]] = []  # this window's inputs and the layer that read each first
        self._group_terms: dict[tuple[str, str], torch.Tensor] = {}  # this group's windows so far, added in order

    def _hook(self, layer: BlockLayer) -> Callable:
        name = layer.spec.name

        def add(module, args) -> None:
            inputs = args[0]
            leader = next((first for tensor, first in self._seen if tensor is inputs), None)
            if not self._seen:
                self._firsts.add(name)
            if leader is None:
                self._seen.append((inputs, name))
                leader = name
            known = self.leaders.setdefault(name, leader)
            if known != leader:
                raise RuntimeError(f"{name} read the input of {leader} in one window and of {known} in another")
            if leader == name:
                self._add_terms(name, input_rows(inputs, self._keep))
            self._fired.add(name)
            if self.stop_early and len(self._fired) == len(self.layers):
                raise AllInputsSeen
        return add

    def _add_terms(self, name: str, rows: torch.Tensor) -> None:
        rows = rows.to(self.device)
        for kind in self.kinds:
            key = (name, kind)
            self._group_terms[key] = STATISTICS[kind].add(self._group_terms.get(key), rows)

    def _end_window(self) -> None:
        self._seen, self._fired = [], set()

    def _end_group(self) -> None:
        for (leader, kind), term in self._group_terms.items():
            summed = STATISTICS[kind].summed(term)
            self._sum(leader, kind, summed.shape).add(summed, consume=True)
        self._group_terms = {}

    def _sum(self, leader: str, kind: str, shape) -> ExactSum:
        key = (leader, kind)
        if key not in self.sums:
            self.sums[key] = ExactSum.of(shape, math.ceil(self.windows / self.group), self.device)
            if self.mantissa_bits is not None:
                self.sums[key].mantissa_bits = self.mantissa_bits
        return self.sums[key]

    def reduce(self, world: World) -> LayerStatistics:
        """Every layer's statistics over all ranks' windows (SpreadTooWide: retry with its mantissa_bits)."""
        self._end_group()
        leaders, self.first = agree_on_leaders(self.leaders, self.layers, world, self._firsts)
        self.shared = leaders
        order = [layer for layer in self.layers if leaders[layer.spec.name] == layer.spec.name]
        sums = [self._sum(layer.spec.name, kind, STATISTICS[kind].shape(layer.in_features))
                for layer in order for kind in self.kinds]
        totals = iter(reduce_exactly(sums, world))
        by_leader = {layer.spec.name: {kind: self._finished(kind, next(totals), layer.in_features) for kind in self.kinds}
                     for layer in order}
        return {layer.spec.name: by_leader[leaders[layer.spec.name]] for layer in self.layers}

    def _finished(self, kind: str, total: torch.Tensor, features: int) -> torch.Tensor:
        statistic = STATISTICS[kind]
        total = statistic.unpacked(total, features)
        total = total.mul_(statistic.factor) if statistic.factor != 1.0 else total
        return total / self.windows if statistic.per_window and self.windows else total


def agree_on_leaders(seen: dict[str, str], layers: list[BlockLayer], world: World,
                     firsts: set[str] = frozenset()) -> tuple[dict[str, str], str | None]:
    """Every rank's view of which layers share an input, merged (rank 0 gathers, then broadcasts),
    and the layer that read the block's first input (`firsts`: those a rank saw read first; None
    unless all ranks saw the same one). A layer no rank saw run leads itself; two views that
    disagree are a bug of the model's forward."""
    view = {"leaders": seen, "firsts": sorted(firsts)}
    if world.size == 1:
        merged = view
    else:
        gathered = world.gather_bytes(json.dumps(view).encode())
        merged = {"leaders": {}, "firsts": set()}
        for other in ([] if gathered is None else [json.loads(data) for data in gathered]):
            for layer, leader in other["leaders"].items():
                if merged["leaders"].setdefault(layer, leader) != leader:
                    raise RuntimeError(f"ranks disagree on the input {layer} shares ({leader} or {merged['leaders'][layer]})")
            merged["firsts"].update(other["firsts"])
        merged["firsts"] = sorted(merged["firsts"])
        merged = json.loads(world.broadcast_bytes(json.dumps(merged).encode() if world.is_root else None))
    leaders = {layer.spec.name: merged["leaders"].get(layer.spec.name, layer.spec.name) for layer in layers}
    return leaders, (merged["firsts"][0] if len(merged["firsts"]) == 1 else None)
