"""hpcprune's decisions on a causal LM held whole in this process, one block after the other.

    python bench/llm_blocks.py --model DIR --windows W.safetensors --method sparsegpt \\
        --weights OUT.safetensors --report OUT.json      # what bench/llm.py runs, once per method

The hpcprune side of bench/llm.py until `schedule.kind: sequential` lands: the same schedule as
SparseGPT's `opt_sequential` and llm-compressor's sequential pipeline (hooks on a block's Linear
layers collect their inputs' statistics over all windows, the block's layers are decided, then the
pruned block makes the next block's inputs), with hpcprune's own decisions: the SparseGPT solve of
hpcprune.prune.sparsegpt, Wanda's |W|·‖X_j‖ and magnitude through hpcprune's keep_largest. Statistics
are float64 sums in window order, one window at a time. It measures the solvers on the real model;
the pipeline's memory and rank behaviour are measured once it exists. Its process and its report
are those of bench/llm_anchor.py (same arguments, same files), so the two sides compare one to one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from hpcprune.prune.patterns import keep_largest
from hpcprune.prune.selection import prune_count
from hpcprune.prune.sparsegpt import SparseGPTRule, sparsegpt


class _Captured(Exception):
    pass


def first_block_inputs(model, windows: torch.Tensor) -> tuple[list[torch.Tensor], dict]:
    """Each window's hidden states at the first block, and the block's other call arguments."""
    captured: list[torch.Tensor] = []
    arguments: dict = {}

    def stop(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(hidden.detach())
        arguments.update({key: value for key, value in kwargs.items() if key != "hidden_states"})
        raise _Captured

    handle = model.model.layers[0].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for window in windows:
            try:
                model(window[None], use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured, arguments


def _run(block: nn.Module, inputs: list[torch.Tensor], arguments: dict) -> list[torch.Tensor]:
    outputs = []
    for hidden in inputs:
        out = block(hidden, **arguments)
        outputs.append((out[0] if isinstance(out, tuple) else out).detach())
    return outputs


def _statistics(block: nn.Module, linears: dict[str, nn.Linear], inputs, arguments, method: str) -> dict:
    """Σ over windows of 2XᵀX (sparsegpt) or of Σ_t x_tj² (wanda), float64, per Linear."""
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def add(_module, args, _output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            term = 2.0 * x.T @ x if method.startswith("sparsegpt") else x.square().sum(dim=0)
            sums[name] = term if name not in sums else sums[name] + term
        return add

    handles = [linear.register_forward_hook(hook(name)) for name, linear in linears.items()]
    try:
        _run(block, inputs, arguments)
    finally:
        for handle in handles:
            handle.remove()
    return sums


def _keep(scores: torch.Tensor, sparsity: float, n: int | None, m: int | None) -> torch.Tensor:
    """hpcprune's row rule (or nm: n kept of every m inputs) on one Linear's scores."""
    if n is None:
        return keep_largest(scores, prune_count(sparsity, scores.shape[1]))
    return keep_largest(scores.reshape(-1, m), m - n).reshape(scores.shape)


def decide(method: str, weight: torch.Tensor, statistic: torch.Tensor | None, *, sparsity: float,
           n: int | None, m: int | None, blocksize: int, percdamp: float) -> torch.Tensor:
    """The pruned weight of one Linear under `method` (sparsegpt[-layer], wanda, magnitude)."""
    if method.startswith("sparsegpt"):
        selection = "nm" if n is not None else ("layer" if method == "sparsegpt-layer" else "row")
        rule = SparseGPTRule(sparsity=sparsity, selection=selection, n=n or 2, m=m or 4, blocksize=blocksize,
                             percdamp=percdamp)
        return sparsegpt(weight, statistic, rule).weight
    magnitude = weight.detach().abs().to(torch.float32)
    scores = magnitude * statistic.sqrt().to(torch.float32) if method == "wanda" else magnitude
    return weight.detach() * _keep(scores, sparsity, n, m)


@torch.no_grad()
def prune_blocks(model, windows: torch.Tensor, method: str, *, sparsity: float = 0.5, n: int | None = None,
                 m: int | None = None, blocksize: int = 128, percdamp: float = 0.01) -> None:
    """Prune every Linear of every block of `model` in place, block by block (see the module doc)."""
    inputs, arguments = first_block_inputs(model, windows)
    for block in model.model.layers:
        linears = {name: module for name, module in block.named_modules() if isinstance(module, nn.Linear)}
        statistics = {} if method == "magnitude" else _statistics(block, linears, inputs, arguments, method)
        for name, linear in linears.items():
            pruned = decide(method, linear.weight, statistics.get(name), sparsity=sparsity, n=n, m=m,
                            blocksize=blocksize, percdamp=percdamp)
            linear.weight.copy_(pruned)
        del statistics
        inputs = _run(block, inputs, arguments)


METHODS = {  # method -> (n kept, m) for N:M, or None
    "sparsegpt": None, "sparsegpt-layer": None, "sparsegpt-2:4": (2, 4),
    "wanda": None, "wanda-2:4": (2, 4), "magnitude": None, "magnitude-2:4": (2, 4),
}


def main(argv: list[str] | None = None) -> int:
    from llm_side import (  # bench/ is this script's folder
        block_weights,
        common_arguments,
        cpu_seconds,
        peak_rss_bytes,
    )
    from transformers import AutoModelForCausalLM

    parser = common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]), sorted(METHODS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, local_files_only=True).eval()
    windows = load_file(args.windows)["input_ids"]
    loaded = time.perf_counter()
    n, m = METHODS[args.method] or (None, None)
    prune_blocks(model, windows, args.method.removesuffix("-2:4"), sparsity=args.sparsity, n=n, m=m,
                 blocksize=args.blocksize, percdamp=args.percdamp)
    solved = time.perf_counter()
    save_file(block_weights(model), args.weights)
    report = {"method": args.method, "windows": list(windows.shape), "threads": args.threads,
              "prune_seconds": solved - loaded, "process_seconds": time.perf_counter() - started,
              "peak_rss_bytes": peak_rss_bytes(),
              "cpu_seconds": cpu_seconds()}
    Path(args.report).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
