"""The dense and the pruned model measured on `eval.text`, data-parallel, once the last block is done.

    hpcprune prune --config configs/llm_wanda.yaml --set eval.text=heldout.txt

The evaluation windows went through every block twice (dense weights before each block was
pruned, pruned weights after: no block is read a second time); here the model's own final norm and
head turn both streams' last hidden states into outputs (hpcprune.models.block_calls.model_outputs),
each window into float64 terms (hpcprune.models.evaluation), and the terms are summed exactly over
ranks. Causal LMs: perplexity, exp(Σ NLL / tokens predicted); encoders: mean cosine of the pruned
model's mean-pooled embeddings to the dense model's (the dense model's own figure is 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hpcprune.dist.exact_sum import ExactSum, reduce_exactly
from hpcprune.dist.world import World
from hpcprune.models.block_calls import BlockRunner, model_outputs, moved
from hpcprune.models.evaluation import (
    mean_pooled,
    perplexity,
    window_cosine,
    window_nll,
)
from hpcprune.models.lazy import LazyModel
from hpcprune.prune.sequential.activations import Stream


@dataclass
class Evaluation:
    metric: str  # "perplexity" or "cosine"
    dense: float = math.nan
    pruned: float = math.nan


def evaluate(lazy: LazyModel, dense: Stream | None, pruned: Stream | None, windows: int, world: World,
             runner: BlockRunner) -> Evaluation:
    """Both figures on every rank; NaN without evaluation windows (`windows`: over all ranks)."""
    metric = "perplexity" if lazy.causal else "cosine"
    if dense is None:
        return Evaluation(metric)
    with lazy.outer_modules_on_call():
        return _perplexities(lazy, dense, pruned, windows, world, runner) if lazy.causal else \
            _cosine(lazy, dense, pruned, windows, world, runner)


def _perplexities(lazy, dense: Stream, pruned: Stream, windows: int, world: World, runner: BlockRunner) -> Evaluation:
    sums = [ExactSum.of((1,), windows), ExactSum.of((1,), windows)]
    tokens = 0
    for position in range(len(dense)):
        inputs = moved(dense.inputs[position], lazy.device)
        ids = inputs["input_ids"][0]
        for stream, total in zip((dense, pruned), sums):
            logits = model_outputs(lazy.model, lazy.blocks, inputs, stream.store.get(position).to(lazy.device),
                                   runner.as_tuple).logits[0]
            total.add(window_nll(logits, ids))
        tokens += len(ids) - 1
    dense_nll, pruned_nll = (float(total[0]) for total in reduce_exactly(sums, world))
    predicted = int(world.allreduce_sum(np.array([tokens], dtype=np.int64))[0])
    return Evaluation("perplexity", perplexity(dense_nll, predicted), perplexity(pruned_nll, predicted))


def _cosine(lazy, dense: Stream, pruned: Stream, windows: int, world: World, runner: BlockRunner) -> Evaluation:
    total = ExactSum.of((1,), windows)
    base = getattr(lazy.model, "base_model", lazy.model)  # its output has the last hidden state
    for position in range(len(dense)):
        inputs, keep = moved(dense.inputs[position], lazy.device), dense.keeps[position]
        pooled = [mean_pooled(model_outputs(base, lazy.blocks, inputs, stream.store.get(position).to(lazy.device),
                                            runner.as_tuple).last_hidden_state[0], keep)
                  for stream in (pruned, dense)]
        total.add(window_cosine(*pooled))
    (cosines,) = reduce_exactly([total], world)
    return Evaluation("cosine", 1.0, float(cosines[0]) / windows)
