"""One block of a block-sequential run: statistics, decisions, masks applied, next inputs, errors.

    hpcprune prune --config configs/llm_wanda.yaml     # hpcprune.run.sequential calls this per block

`BlockEngine.prune(block, layers)`, with the block's weights loaded:
1. the block runs the rank's calibration windows one at a time, dense, with hooks that add each
   layer's input statistics (hpcprune.prune.sequential.input_statistics), in float64 within a group of
   windows and exactly over groups and ranks; unless its outputs feed the next block (propagate
   dense), a window's forward stops once the last layer has read its input;
2. each layer, or range of a layer's rows when there are more ranks than layers, is decided on the
   rank that owns it (hpcprune.prune.sequential.pieces, by the method's cost, costliest first) and
   the decisions reach every rank (hpcprune.prune.sequential.decisions);
3. masks (and new weights) are applied: pruned weights are exactly +0.0;
4. the pruned block runs the windows again, measuring each layer's reconstruction error, and its
   outputs become the next block's inputs (`sequential.propagate: pruned`); with `dense`, the dense
   outputs of step 1 do. With `sequential.errors: false` nothing is measured (NaN errors), and
   with `dense` as well the pruned block does not run at all.
`replay(block, layers, decisions)` does steps 3 and 4 (or 1 and 3) with recorded decisions and no
statistics: resume rebuilds a block's inputs from the blocks already done. A window is the unit
of every pass, so what a rank computes for a window does not depend on which other windows it holds.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from hpcprune.dist.exact_sum import SpreadTooWide
from hpcprune.dist.world import World
from hpcprune.models.block_calls import BlockRunner
from hpcprune.prune.masks import zero_pruned_
from hpcprune.prune.sequential.activations import Stream, WindowStore
from hpcprune.prune.sequential.decisions import BlockDecisions, share_decisions
from hpcprune.prune.sequential.input_statistics import AllInputsSeen, InputStatistics, LayerStatistics
from hpcprune.prune.sequential.layers import BlockLayer
from hpcprune.prune.sequential.methods import BlockMethod, Decision, LayerRule
from hpcprune.prune.sequential.pieces import block_pieces
from hpcprune.prune.sequential.reconstruction import ReconstructionErrors

RETRIES = 3  # passes with fewer fixed-point bits after a SpreadTooWide, before giving up


@dataclass(frozen=True)
class SharedInputs:
    """From the dense pass: layer -> the first layer that read the same input, and the layer that
    read the block's first Linear input (None when unknown)."""

    leaders: dict[str, str] = field(default_factory=dict)
    first: str | None = None


@dataclass
class BlockOutcome:
    decisions: BlockDecisions
    errors: dict[str, float]  # layer name -> reconstruction error (NaN without calibration windows)


class BlockEngine:
    def __init__(self, method: BlockMethod, rule: LayerRule, world: World, runner: BlockRunner,
                 calibration: Stream | None, windows: int, propagate: str, window_group: int = 1,
                 errors: bool = True):
        self.method, self.rule, self.world, self.runner = method, rule, world, runner
        self.calibration = calibration  # this rank's calibration windows (None: the run has none)
        self.windows = windows  # calibration windows over all ranks
        self.propagate = propagate
        self.window_group = window_group  # consecutive windows summed before the exact sum (on one rank)
        self.errors = errors and calibration is not None  # reconstruction errors measured (sequential.errors)

    def prune(self, block: nn.Module, layers: list[BlockLayer]) -> BlockOutcome:
        statistics, dense_outputs, shared = self._dense_pass(block, layers)
        pieces = block_pieces(layers, self.world.size, self.method, self.rule)
        mine = {piece.key: self._decide(piece, statistics) for piece, owner in pieces if owner == self.world.rank}
        decisions = share_decisions(mine, self.world).joined([piece for piece, _ in pieces])
        dense_weights = ({layer.spec.name: layer.module.weight.detach().clone() for layer in layers}
                         if self.errors else {})
        apply_decisions(layers, decisions)
        errors = self._pruned_pass(block, layers, dense_weights, shared, statistics)
        if dense_outputs is not None:
            self.calibration.store.take(dense_outputs)
        return BlockOutcome(decisions, errors)

    def _decide(self, piece, statistics: LayerStatistics) -> Decision:
        """The method decides out x in; the decision is kept in the layer's stored orientation."""
        layer = piece.layer
        decision = self.method.decide(layer.linear_spec, layer.linear_weight(), statistics.get(layer.spec.name, {}),
                                      self.rule, rows=piece.rows)
        return Decision(layer.stored(decision.mask), None if decision.weight is None else layer.stored(decision.weight))

    def replay(self, block: nn.Module, layers: list[BlockLayer], decisions: BlockDecisions) -> None:
        if self.calibration is not None and self.propagate == "dense":
            pass_stream(self.calibration, block, self.runner)
        apply_decisions(layers, decisions)
        if self.calibration is not None and self.propagate == "pruned":
            pass_stream(self.calibration, block, self.runner)

    def _dense_pass(self, block, layers) -> tuple[LayerStatistics, WindowStore | None, SharedInputs]:
        """Statistics the method needs, the dense outputs when they feed the next block, and which
        layers read the same input (none known without statistics)."""
        kinds = self.method.statistics
        keep = self.calibration is not None and self.propagate == "dense"
        if self.calibration is None or (not kinds and not keep):
            return {}, None, SharedInputs()
        bits = None
        for _ in range(RETRIES):
            outputs = self.calibration.store.fork() if keep else None
            statistics = (InputStatistics(layers, kinds, self.windows, _device(block), bits, self.window_group,
                                          stop_early=outputs is None)  # nobody reads this pass's outputs
                          if kinds else None)
            with statistics or contextlib.nullcontext():
                run_windows(self.calibration, block, self.runner, outputs, scope=statistics)
            try:
                if statistics is None:
                    return {}, outputs, SharedInputs()
                totals = statistics.reduce(self.world)
                return totals, outputs, SharedInputs(statistics.shared, statistics.first)
            except SpreadTooWide as refused:  # raised on every rank alike: all retry with the same bits
                bits = refused.mantissa_bits
                if outputs is not None:
                    outputs.remove()
        raise RuntimeError(f"block statistics: the windows' scales still differ too much after {RETRIES} passes")

    def _pruned_pass(self, block, layers, dense_weights, shared: SharedInputs,
                     statistics: LayerStatistics) -> dict[str, float]:
        outputs = self.calibration.store if self.calibration is not None and self.propagate == "pruned" else None
        if not self.errors:
            if outputs is not None:  # the next block's inputs, nothing measured
                run_windows(self.calibration, block, self.runner, outputs)
            return {layer.spec.name: math.nan for layer in layers}
        # The layers reading the block's first input see the same X pruned: their Hessian is their Gram matrix (× 2/N).
        known = ({name: kinds["hessian"] for name, kinds in statistics.items()
                  if "hessian" in kinds and shared.leaders.get(name) == shared.first}
                 if shared.first is not None else {})
        with ReconstructionErrors(layers, dense_weights, self.windows, shared.leaders, known,
                                  group=self.window_group) as errors:
            run_windows(self.calibration, block, self.runner, outputs, scope=errors)
        return errors.reduce(self.world)


def run_windows(stream: Stream, block: nn.Module, runner: BlockRunner, outputs: WindowStore | None, scope=None) -> None:
    """The block on each of the stream's windows; outputs into `outputs` (None: dropped); `scope`:
    hooks whose `window(token_mask)` frames each window."""
    for position in range(len(stream)):
        hidden, call = stream.store.get(position), stream.calls[position]
        if scope is None:
            output = runner(block, hidden, call)
        else:
            with scope.window(stream.keeps[position], stream.windows[position]):
                try:
                    output = runner(block, hidden, call)
                except AllInputsSeen:  # only where `outputs` is None
                    continue
        if outputs is not None:
            outputs.put(position, output)


def pass_stream(stream: Stream, block: nn.Module, runner: BlockRunner) -> None:
    """The stream's windows through the block, in place (evaluation streams, replayed blocks)."""
    run_windows(stream, block, runner, stream.store)


def apply_decisions(layers: list[BlockLayer], decisions: BlockDecisions) -> None:
    """New weights where a method gave them, then every pruned weight set to exactly +0.0."""
    with torch.no_grad():
        for layer in layers:
            weight = layer.module.weight
            if layer.spec.name in decisions.weights:
                weight.copy_(decisions.weights[layer.spec.name])
            zero_pruned_(weight, decisions.mask(layer.spec.name, layer.spec.shape).to(weight.device))


def _device(block: nn.Module) -> torch.device:
    return next(block.parameters()).device
