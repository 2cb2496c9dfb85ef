"""What both sides of bench/llm.py share: their arguments and the tensors they hand back.

    bench/llm_anchor.py and bench/llm_blocks.py import it (bench/ is on sys.path when they run)

Nothing here imports hpcprune or llmcompressor, so each side's own environment can load it.
"""

from __future__ import annotations

import argparse
import resource

import torch


def block_weights(model) -> dict[str, torch.Tensor]:
    """The weights of the Linear layers inside the repeated blocks: what the methods prune."""
    return {f"{name}.weight": module.weight.detach().to(torch.float32).contiguous()
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}."}


def common_arguments(parser: argparse.ArgumentParser, methods: list[str]) -> argparse.ArgumentParser:
    """The arguments both sides take (this script and bench/llm_blocks.py)."""
    parser.add_argument("--model", required=True)
    parser.add_argument("--windows", required=True)
    parser.add_argument("--method", required=True, choices=methods)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--report", required=True)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--blocksize", type=int, default=128)
    parser.add_argument("--percdamp", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=1)
    return parser


def peak_rss_bytes() -> int:
    """This process's peak resident memory since its exec: VmHWM. Not ru_maxrss, which Linux keeps
    across fork and exec, so a side started by bench/llm.py (which holds the dense model) would report
    at least the parent's memory at the fork."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # no /proc: an upper bound


def cpu_seconds() -> float:
    """User and system CPU seconds of this process: what wall time is on a machine shared with others."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
