"""What running calibration windows one at a time costs against one batch of all of them.

    python bench/window_batching.py                         # SmolLM2-135M's block shape, 16 windows x 256 tokens
    python bench/window_batching.py --windows 8 --tokens 128 --repeats 3 --no-write    # a quick look

The block-sequential pipeline runs a block on one window at a time, so that a window's forward and
statistics are computed the same way whichever rank holds it (a batch's composition changes with
the world size, and a matrix product's last bits may change with its shape). The anchor is the
obvious alternative: all of a rank's windows in one batch. Both run one LLaMA decoder block of
SmolLM2-135M's shape (hidden 576, MLP 1536, 9 heads, 3 key/value heads; random weights, float32)
with Wanda's statistics on: hpcprune's own hooks (hpcprune.prune.sequential.input_statistics, one
exact-sum term per window) for the windows one at a time, a plain float64 Σx² of the whole batch's
rows for the anchor. Also timed: the forward alone, both ways. Each repeat interleaves the cases so
that a change in the machine's load hits all alike; the medians of the process's CPU time (the cost
on a quiet machine, whatever else shares this one) and of the wall time are reported, as ratios
window-at-a-time / batched, for 1 and 2 torch threads.

Results go to bench/results/window_batching.json and bench/results/window_batching.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from hpcprune.models.block_calls import BlockCall, BlockRunner
from hpcprune.prune.plan import TensorSpec
from hpcprune.prune.sequential.input_statistics import InputStatistics
from hpcprune.prune.sequential.layers import BlockLayer

RESULTS = Path(__file__).resolve().parent / "results"


def smollm2_block(seed: int):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import (
        LlamaDecoderLayer,
        LlamaRotaryEmbedding,
    )

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, num_hidden_layers=1, max_position_embeddings=8192, rope_theta=100000.0)
    config._attn_implementation = "sdpa"  # what a folder's model gets by default, and so the pipeline
    torch.manual_seed(seed)
    block = LlamaDecoderLayer(config, layer_idx=0).eval().requires_grad_(False)
    return block, LlamaRotaryEmbedding(config), config


def block_layers(block: torch.nn.Module) -> list[BlockLayer]:
    return [BlockLayer(TensorSpec(index, f"{name}.weight", tuple(module.weight.shape)), module)
            for index, (name, module) in enumerate((name, module) for name, module in block.named_modules()
                                                   if isinstance(module, torch.nn.Linear))]


def one_at_a_time(block, windows, call, with_statistics: bool) -> None:
    runner = BlockRunner(torch.device("cpu"))
    if not with_statistics:
        for window in windows:
            runner(block, window[None], call)
        return
    with InputStatistics(block_layers(block), ("input_squares",), len(windows), torch.device("cpu")) as hooks:
        for window in windows:
            with hooks.window(None):
                runner(block, window[None], call)


def batched(block, windows, call, with_statistics: bool) -> None:
    sums, handles = {}, []
    if with_statistics:
        def add(module, args):
            rows = args[0].reshape(-1, args[0].shape[-1]).to(torch.float64)
            sums[id(module)] = rows.square().sum(0)
        handles = [layer.module.register_forward_pre_hook(add) for layer in block_layers(block)]
    try:
        with torch.no_grad():
            block(windows, *call.args, **call.kwargs)
    finally:
        for handle in handles:
            handle.remove()


def timed(work) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    work()
    return time.process_time() - cpu, time.perf_counter() - wall


def measure(windows: int, tokens: int, repeats: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    block, rotary, config = smollm2_block(seed=0)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(windows, tokens, config.hidden_size, generator=generator)
    positions = torch.arange(tokens)[None]
    with torch.no_grad():
        single = BlockCall((), dict(position_embeddings=rotary(hidden[:1], positions), position_ids=positions))
        many = BlockCall((), dict(position_embeddings=rotary(hidden, positions.expand(windows, -1)),
                                  position_ids=positions.expand(windows, -1)))
    cases = {
        "forward, one window at a time": lambda: one_at_a_time(block, hidden, single, False),
        "forward, batched": lambda: batched(block, hidden, many, False),
        "forward + Wanda statistics, one window at a time": lambda: one_at_a_time(block, hidden, single, True),
        "forward + Wanda statistics, batched": lambda: batched(block, hidden, many, True),
    }
    for work in cases.values():  # warm-up: allocator, kernels
        work()
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, work in cases.items():
            times[name].append(timed(work))
    medians = {name: {"cpu_s": statistics.median(t[0] for t in runs), "wall_s": statistics.median(t[1] for t in runs)}
               for name, runs in times.items()}
    ratios = {kind: {clock: medians[f"{kind}, one window at a time"][clock] / medians[f"{kind}, batched"][clock]
                     for clock in ("cpu_s", "wall_s")}
              for kind in ("forward", "forward + Wanda statistics")}
    return {"threads": threads, "medians": medians, "ratios": ratios}


def table(result: dict, windows: int, tokens: int) -> str:
    lines = [
        "# Calibration windows one at a time against one batch",
        "",
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        f"(load average at the end {', '.join(f'{load:.2f}' for load in os.getloadavg())}); one LLaMA block of "
        f"SmolLM2-135M's shape, {windows} windows of {tokens} tokens, float32; medians of {result['repeats']} "
        "interleaved repeats. Anchor: the same windows as one batch.",
        "",
        "| torch threads | what | CPU s one at a time / batched | ratio (CPU) | wall s one at a time / batched | ratio (wall) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for run in result["runs"]:
        for kind in ("forward", "forward + Wanda statistics"):
            one, many = run["medians"][f"{kind}, one window at a time"], run["medians"][f"{kind}, batched"]
            lines.append(f"| {run['threads']} | {kind} | {one['cpu_s']:.3f} / {many['cpu_s']:.3f} | "
                         f"{run['ratios'][kind]['cpu_s']:.2f}x | {one['wall_s']:.3f} / {many['wall_s']:.3f} | "
                         f"{run['ratios'][kind]['wall_s']:.2f}x |")
    lines += ["", "Ratios above 1 are what exactness costs: a window's result does not depend on which other "
              "windows share its rank, so masks are bit-identical for any world size. With one thread (the "
              "default of `sequential.threads`) a window's activations stay in cache; with more threads the "
              "per-window matrices are small for the threads to share, and on a loaded machine their waiting "
              "counts as CPU time too."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-write", action="store_true", help="print the table, write nothing")
    args = parser.parse_args()
    result = {"windows": args.windows, "tokens": args.tokens, "repeats": args.repeats,
              "runs": [measure(args.windows, args.tokens, args.repeats, threads) for threads in args.threads]}
    text = table(result, args.windows, args.tokens)
    if args.no_write:
        print(text)
        return
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "window_batching.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "window_batching.md").write_text(text)


if __name__ == "__main__":
    main()
