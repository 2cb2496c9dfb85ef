"""The calls of a model's blocks as its own forward makes them: captured at the first block, replayed per block.

    hpcprune prune --config configs/llm_wanda.yaml     # schedule.kind: sequential

`capture_first_call` runs the model's forward on one window with the first block replaced by a
catcher that records what it is called with (hidden states, attention mask, position ids, rotary
position embeddings, ...) and stops the forward there: the embeddings ran, nothing after them did
(the "catcher" of SparseGPT's `opt_sequential` and llm-compressor's sequential pipeline). The same
call then feeds every block (`BlockRunner`), since a block's extra arguments do not change from
block to block. `model_outputs` goes the other way: it runs the model's forward with the first
block replaced by one that returns given final hidden states and the others passing them on, so
the model's own final norm and head (or pooling) turn them into its outputs.

Calls of different windows that hold equal tensors share one copy (`share_equal`): the rotary
embeddings of windows of one length are the same, and a rank keeps them once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class BlockCall:
    """What a block is called with besides its hidden states (positional after them, and keywords)."""

    args: tuple
    kwargs: dict[str, Any]


class _Reached(Exception):
    def __init__(self, hidden: torch.Tensor, call: BlockCall):
        super().__init__("first block reached")
        self.hidden, self.call = hidden, call


class _StandIn(nn.Module):
    """Takes a block's place in the list; attributes the model's forward reads of a block (an
    `attention_type`, a layer index) still come from the block."""

    def __init__(self, block: nn.Module):
        super().__init__()
        object.__setattr__(self, "_block", block)  # not a submodule: its parameters stay the block's

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)


class _Catcher(_StandIn):
    def forward(self, *args, **kwargs):
        hidden, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
        raise _Reached(hidden, BlockCall(tuple(rest), dict(kwargs)))


class _Returns(_StandIn):
    """Returns `hidden` in place of the first block's output (as a tuple when blocks return one)."""

    def __init__(self, block: nn.Module, hidden: torch.Tensor, as_tuple: bool):
        super().__init__(block)
        self.hidden, self.as_tuple = hidden, as_tuple

    def forward(self, *args, **kwargs):
        return (self.hidden,) if self.as_tuple else self.hidden


class _PassesOn(_StandIn):
    def __init__(self, block: nn.Module, as_tuple: bool):
        super().__init__(block)
        self.as_tuple = as_tuple

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden,) if self.as_tuple else hidden


@contextlib.contextmanager
def _replaced(blocks: nn.ModuleList, stand_ins: Mapping[int, nn.Module]) -> Iterator[None]:
    originals = {index: blocks[index] for index in stand_ins}
    for index, module in stand_ins.items():
        blocks[index] = module
    try:
        yield
    finally:
        for index, module in originals.items():
            blocks[index] = module


@torch.no_grad()
def capture_first_call(model: nn.Module, blocks: nn.ModuleList, inputs: Mapping[str, torch.Tensor]
                       ) -> tuple[torch.Tensor, BlockCall]:
    """(hidden states, call) the model's forward gives its first block for `inputs` (batch of one window)."""
    with _replaced(blocks, {0: _Catcher(blocks[0])}):
        try:
            model(**inputs)
        except _Reached as reached:
            return reached.hidden, reached.call
    raise RuntimeError(f"{type(model).__name__}'s forward never called its first block")


@torch.no_grad()
def call_block(block: nn.Module, hidden: torch.Tensor, call: BlockCall, device: torch.device) -> Any:
    """The block's own output for one window (a tensor, or a tuple whose first item is the hidden states)."""
    return block(hidden.to(device), *moved(call.args, device), **moved(call.kwargs, device))


class BlockRunner:
    """Runs blocks on windows and remembers whether they return a tuple, which `model_outputs` imitates."""

    def __init__(self, device: torch.device):
        self.device = device
        self.as_tuple: bool | None = None  # unknown until a block has run

    def __call__(self, block: nn.Module, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
        output = call_block(block, hidden, call, self.device)
        self.as_tuple = not isinstance(output, torch.Tensor)
        return first_tensor(output)


@torch.no_grad()
def model_outputs(model: nn.Module, blocks: nn.ModuleList, inputs: Mapping[str, torch.Tensor],
                  hidden: torch.Tensor, as_tuple: bool) -> Any:
    """The model's outputs (logits, last hidden state...) when its last block has produced `hidden`."""
    stand_ins = {0: _Returns(blocks[0], hidden, as_tuple)}
    stand_ins.update({index: _PassesOn(blocks[index], as_tuple) for index in range(1, len(blocks))})
    with _replaced(blocks, stand_ins):
        return model(**inputs)


def first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        return next(iter(output.values()))
    return output[0]


def moved(value: Any, device: torch.device) -> Any:
    """Tensors inside `value` (tuples, lists, dicts) on `device`; other values as they are."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(moved(item, device) for item in value)
    if isinstance(value, list):
        return [moved(item, device) for item in value]
    if isinstance(value, dict):
        return {key: moved(item, device) for key, item in value.items()}
    return value


def share_equal(value: Any, previous: Any) -> Any:
    """`value` with every tensor equal to the one at the same place in `previous` replaced by that one."""
    if isinstance(value, torch.Tensor):
        same = (isinstance(previous, torch.Tensor) and previous.shape == value.shape and previous.dtype == value.dtype
                and torch.equal(previous, value))
        return previous if same else value
    if isinstance(value, (tuple, list)) and isinstance(previous, type(value)) and len(previous) == len(value):
        return type(value)(share_equal(item, old) for item, old in zip(value, previous))
    if isinstance(value, dict) and isinstance(previous, dict):
        return {key: share_equal(item, previous.get(key)) for key, item in value.items()}
    return value
