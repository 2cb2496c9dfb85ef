"""The anchor side of bench/llm.py: llm-compressor's `oneshot` on one model, in its own environment.

    bench/.venv-llmcompressor/bin/python bench/llm_anchor.py --model DIR --windows W.safetensors \\
        --method sparsegpt --weights OUT.safetensors --report OUT.json

bench/llm.py creates that environment (CPU torch, llmcompressor) and runs this script there, once
per method, on the calibration windows it drew for both sides (`input_ids`, [samples, length]).
It imports torch, transformers, datasets, safetensors and llmcompressor, never hpcprune. It writes
the pruned blocks' Linear weights (the tensors llm-compressor changed) to --weights, so that
bench/llm.py measures perplexity and sparsity of both sides with one function, and to --report the
seconds of `oneshot`, this process's peak RSS and the versions used.
"""

from __future__ import annotations

import argparse
import json
import time
from importlib.metadata import version

import torch
from datasets import Dataset
from llm_side import (  # bench/ is this script's folder
    block_weights,
    common_arguments,
    cpu_seconds,
    peak_rss_bytes,
)
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning import (
    MagnitudePruningModifier,
    WandaPruningModifier,
)
from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

# method -> (modifier class, mask_structure); "n:m" names the n pruned of every m, as llm-compressor reads it
METHODS = {
    "sparsegpt": (SparseGPTModifier, "0:0"),
    "sparsegpt-2:4": (SparseGPTModifier, "2:4"),
    "wanda": (WandaPruningModifier, "0:0"),
    "wanda-2:4": (WandaPruningModifier, "2:4"),
    "magnitude": (MagnitudePruningModifier, None),
}
IGNORE = ["re:.*lm_head"]  # the LM head shares the embedding's weights in SmolLM2: never pruned


def modifier(method: str, sparsity: float, blocksize: int, percdamp: float):
    kind, structure = METHODS[method]
    if kind is MagnitudePruningModifier:  # one shot at the final sparsity, as its docs show for oneshot
        return kind(targets=["re:.*layers.*proj"], init_sparsity=sparsity, final_sparsity=sparsity,
                    start=0, end=1, update=1, mask_structure="unstructured")
    options = {"block_size": blocksize, "dampening_frac": percdamp} if kind is SparseGPTModifier else {}
    return kind(sparsity=sparsity, mask_structure=structure, targets=["Linear"], ignore=IGNORE, **options)


def main(argv: list[str] | None = None) -> int:
    args = common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]), sorted(METHODS)).parse_args(argv)

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, local_files_only=True).eval()
    windows = load_file(args.windows)["input_ids"]
    data = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    loaded = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=modifier(args.method, args.sparsity, args.blocksize, args.percdamp),
            num_calibration_samples=len(data), max_seq_length=windows.shape[1], shuffle_calibration_samples=False,
            pipeline="sequential" if args.method != "magnitude" else "independent")
    solved = time.perf_counter()
    save_file(block_weights(model), args.weights)
    report = {
        "method": args.method, "windows": list(windows.shape), "threads": args.threads,
        "prune_seconds": solved - loaded, "process_seconds": time.perf_counter() - started,
        "peak_rss_bytes": peak_rss_bytes(),
        "cpu_seconds": cpu_seconds(),
        "versions": {name: version(name) for name in ("llmcompressor", "torch", "transformers", "compressed-tensors")},
    }
    with open(args.report, "w") as out:
        json.dump(report, out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
