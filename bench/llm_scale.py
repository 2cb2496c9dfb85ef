"""Memory of the block-sequential pipeline on a LLaMA-architecture checkpoint of 3 B parameters.

    nice python -m bench.llm_scale                          # full figures: 3e9 parameters, bench/results/llm_scale.*
    nice python -m bench.llm_scale --params 2e8 --out -     # a quick proof at small size, printed only

A random LLaMA checkpoint (bf16, sharded safetensors with model.safetensors.index.json, config.json
and a byte-level tokenizer) is written tensor by tensor through hpcprune's streamed safetensors
writer, never whole in memory; its shape is LLaMA's (RMSNorm, rotary, SwiGLU MLP, grouped key/value
heads, untied head) at a width chosen from --params and as many blocks as reach it. Then the real
CLI (`hpcprune prune`, schedule.kind: sequential, Wanda 50 % per output row, no evaluation text)
prunes it under `mpirun -n 2` and `mpirun -n 1`, a few short calibration windows (--samples x
--sequence-length tokens of a seeded text), one thread per rank. Each rank reports its own peak RSS
(bench/launched.py); the target is <= 25 % of the model's float32 bytes for every rank. Also
reported: the time per block (the archive's /blocks table), the 1-rank / 2-rank time ratio, and
whether the two runs' masks are bit-identical (hpcprune.read.diff). An idle rank's RSS (the same
imports, nothing run) is the floor under every figure: at small sizes it alone exceeds the target.

The model folder goes under --dir and is removed at the end unless --keep; --reuse prunes the one a
--keep run left there. On a shared machine, --concurrent runs -n 2 and -n 1 side by side: each
rank's memory and the masks are what they are alone, the times are no longer a ratio worth reading.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import statistics
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.launched import ROOT, idle_rank_rss, launch, mpirun, publish
from hpcprune.archive.atomic import replace_atomically
from hpcprune.models.safetensors_stream import TensorSpec, write_streamed

RESULTS = ROOT / "bench" / "results"
TARGET_SHARE = 0.25  # of the model's float32 bytes, per rank
VOCAB = 32000  # LLaMA-2's vocabulary size; the byte-level tokenizer uses the first 259 ids
GIB = 2**30


# --- the checkpoint ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int

    @property
    def block_parameters(self) -> int:
        head_dim = self.hidden // self.heads
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        return attention + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def parameters(self) -> int:
        return self.layers * self.block_parameters + 2 * VOCAB * self.hidden + self.hidden


def shape_for(parameters: float) -> Shape:
    """LLaMA proportions (MLP 8/3 of the width rounded up to 256, heads of 128, a quarter as many
    key/value heads) at a width that suits the size, with blocks added until `parameters` is reached."""
    hidden = 3072 if parameters >= 2e9 else 2048 if parameters >= 6e8 else 1024
    intermediate = 256 * math.ceil(8 * hidden / 3 / 256)
    heads = hidden // 128
    probe = Shape(hidden, intermediate, heads, heads // 4, 1)
    layers = max(1, math.ceil((parameters - 2 * VOCAB * hidden - hidden) / probe.block_parameters))
    return Shape(hidden, intermediate, heads, heads // 4, layers)


def llama_config(shape: Shape):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                       num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.kv_heads, max_position_embeddings=4096, tie_word_embeddings=False,
                       bos_token_id=0, eos_token_id=1, pad_token_id=2, torch_dtype="bfloat16",
                       architectures=["LlamaForCausalLM"])


def tensor_specs(config) -> list[TensorSpec]:
    """Every stored tensor of the model, in state-dict order, from a skeleton on the meta device."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return [TensorSpec(name, torch.bfloat16, tuple(tensor.shape)) for name, tensor in model.state_dict().items()]


def random_tensor(spec: TensorSpec, seed: int) -> torch.Tensor:
    """Norm weights 1, everything else N(0, 0.02²) as LLaMA initialises it; seeded per tensor."""
    if spec.name.endswith("norm.weight"):
        return torch.ones(spec.shape, dtype=spec.dtype)
    generator = torch.Generator().manual_seed(seed * 2**32 + zlib.crc32(spec.name.encode()))
    return (torch.randn(spec.shape, generator=generator) * 0.02).to(spec.dtype)


def shards_of(specs: list[TensorSpec], limit: int) -> list[list[TensorSpec]]:
    """Consecutive tensors in shards of at most `limit` bytes (a larger tensor alone), as save_pretrained cuts them."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def write_model(folder: Path, shape: Shape, shard_bytes: int, seed: int) -> dict:
    """config.json, tokenizer and sharded bf16 safetensors with an index, one tensor in memory at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    config = llama_config(shape)
    config.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    specs = tensor_specs(config)
    # Three shards at least, so that a small model takes the index's path as a large one does.
    shards = shards_of(specs, min(shard_bytes, math.ceil(sum(spec.nbytes for spec in specs) / 3)))
    names = [f"model-{number:05d}-of-{len(shards):05d}.safetensors" for number in range(1, len(shards) + 1)]
    started = time.perf_counter()
    total = sum(write_streamed(folder / name, shard, lambda spec: random_tensor(spec, seed), {"format": "pt"})
                for name, shard in zip(names, shards))
    index = {"metadata": {"total_size": total},
             "weight_map": {spec.name: name for name, shard in zip(names, shards) for spec in shard}}
    with replace_atomically(folder / "model.safetensors.index.json") as temporary:
        temporary.write_text(json.dumps(index, indent=2) + "\n")
    return {"parameters": sum(math.prod(spec.shape) for spec in specs), "stored_bytes": total, "shards": len(shards),
            "seconds_written": time.perf_counter() - started}


def model_figures(folder: Path, shape: Shape) -> dict:
    """What write_model returns, for a folder it wrote before (--reuse): from its index."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    specs = tensor_specs(llama_config(shape))
    if {spec.name for spec in specs} != set(index["weight_map"]):
        raise SystemExit(f"--reuse: {folder} holds another model than --params asks for")
    return {"parameters": sum(math.prod(spec.shape) for spec in specs), "stored_bytes": index["metadata"]["total_size"],
            "shards": len(set(index["weight_map"].values())), "seconds_written": None}


def byte_tokenizer():
    """A byte-level BPE without merges (every byte one token, a BOS in front): any text tokenizes, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<pad>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: index for index, token in enumerate([*specials, *sorted(alphabet)])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def write_text(path: Path, seed: int, lines: int = 400) -> Path:
    """Seeded lines of pseudo-words: a random model has no language to calibrate on, only tokens."""
    draw = random.Random(seed)
    words = ["".join(draw.choice("etaoinshrdlucmfwypvbgkqjxz") for _ in range(draw.randint(2, 9))) for _ in range(500)]
    path.write_text("\n".join(" ".join(draw.choice(words) for _ in range(12)) for _ in range(lines)) + "\n")
    return path


# --- the runs ------------------------------------------------------------------------------------


def write_run_config(path: Path, folder: Path, text: Path, archive: Path, samples: int, length: int) -> Path:
    path.write_text(
        f"seed: 0\nmodel: {{name: 'hf:{folder}'}}\npretrain: {{epochs: 0}}\nfinetune: {{epochs: 0}}\n"
        f"schedule: {{kind: sequential}}\nprune: {{criterion: wanda, rule: row, sparsity: 0.5}}\n"
        f"calibration: {{text: '{text}', samples: {samples}, sequence_length: {length}, seed: 0}}\n"
        f"sequential: {{threads: 1, propagate: pruned}}\nprogress: false\noutput: {{path: '{archive}'}}\n")
    return path


def run(ranks: int, config: Path, archive: Path) -> dict:
    from hpcprune.archive.reader import open_archive

    launched = launch(mpirun(ranks, "prune", "--config", str(config), "--force", "-q"), f"mpirun -n {ranks}")
    if len(launched.peak_rss_bytes) != ranks:
        raise SystemExit(f"mpirun -n {ranks}: {len(launched.peak_rss_bytes)} peak RSS reports, not {ranks}")
    reader = open_archive(archive)
    seconds = [float(row["seconds"]) for row in reader.blocks(1)]
    attrs = reader.rounds()[-1]
    figures = {"ranks": ranks, "wall_seconds": launched.wall_seconds, "peak_rss_bytes": launched.peak_rss_bytes,
            "block_seconds_median": statistics.median(seconds), "block_seconds_total": sum(seconds),
            "blocks": len(seconds), "achieved_sparsity": float(attrs["achieved_sparsity"])}
    archive.with_suffix(".json").write_text(json.dumps(figures, indent=2) + "\n")  # kept should a later step fail
    return figures


def measure(args: argparse.Namespace) -> dict:
    from hpcprune.read.diff import diff

    shape = shape_for(args.params)
    work, folder = args.dir, args.dir / "model"
    reused = args.reuse and (folder / "model.safetensors.index.json").is_file()
    if work.exists():
        for path in work.iterdir():
            if path.is_dir() and not (reused and path == folder):
                shutil.rmtree(path)
            elif path.is_file():
                path.unlink()
    try:
        written = model_figures(folder, shape) if reused else write_model(folder, shape, args.shard_gb * 1e9, args.seed)
        text = write_text(work / "calibration.txt", args.seed)
        configs = {ranks: write_run_config(work / f"n{ranks}.yaml", folder, text, work / f"n{ranks}.h5", args.samples,
                                           args.sequence_length) for ranks in (2, 1)}
        with ThreadPoolExecutor(max_workers=2 if args.concurrent else 1) as pool:
            futures = {ranks: pool.submit(run, ranks, config, work / f"n{ranks}.h5") for ranks, config in configs.items()}
            runs = {ranks: future.result() for ranks, future in futures.items()}
        identical = bool(diff(work / "n1.h5", work / "n2.h5")["identical"])
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    float32_bytes = 4 * written["parameters"]
    target = TARGET_SHARE * float32_bytes
    return {
        "params_asked": args.params, "shape": asdict(shape), **written, "float32_bytes": float32_bytes,
        "float32_bytes_per_block": 4 * shape.block_parameters, "target_rss_bytes": target,
        "samples": args.samples, "sequence_length": args.sequence_length, "idle_rank_rss_bytes": idle_rank_rss(),
        "runs": [runs[1], runs[2]], "masks_identical": identical,
        "time_ratio_1_over_2": runs[1]["wall_seconds"] / runs[2]["wall_seconds"],
        "block_time_ratio_1_over_2": runs[1]["block_seconds_median"] / runs[2]["block_seconds_median"],
        "max_rss_over_float32": max(runs[2]["peak_rss_bytes"]) / float32_bytes,
        "meets_target": all(peak <= target for result in runs.values() for peak in result["peak_rss_bytes"]),
        "concurrent": args.concurrent, "cores": os.cpu_count(), "load_average_before": args.load, "python": platform.python_version(),
        "torch": torch.__version__, "small_size": args.params < 3e9,
    }


def render(result: dict) -> str:
    shape = result["shape"]
    label = " (SMALL SIZE: a proof that the benchmark runs, not the figure)" if result["small_size"] else ""
    lines = [
        f"# Block-sequential Wanda on a {result['parameters'] / 1e9:.2f} B-parameter LLaMA checkpoint{label}",
        "",
        f"Random LLaMA, bf16, {result['shards']} shards ({result['stored_bytes'] / GIB:.2f} GiB); {shape['layers']} blocks "
        f"of hidden {shape['hidden']}, MLP {shape['intermediate']}, {shape['heads']} heads / {shape['kv_heads']} "
        f"key-value heads ({result['float32_bytes_per_block'] / GIB:.2f} GiB per block in float32). Wanda 50 % per "
        f"output row, {result['samples']} calibration windows x {result['sequence_length']} tokens, one thread per "
        f"rank, {result['cores']} cores (load average {result['load_average_before']:.2f} before).",
        "",
        f"Target: every rank's peak RSS <= 25 % of the model's float32 bytes = {result['target_rss_bytes'] / GIB:.2f} GiB. "
        f"An idle rank (the same imports, nothing run) peaks at {result['idle_rank_rss_bytes'] / GIB:.2f} GiB.",
        "",
        "| ranks | wall s | s per block (median) | peak RSS per rank (GiB) | max RSS / float32 bytes | within target |",
        "|---:|---:|---:|---|---:|---|",
    ]
    for run_result in result["runs"]:
        peaks = run_result["peak_rss_bytes"]
        lines.append(f"| {run_result['ranks']} | {run_result['wall_seconds']:.1f} | {run_result['block_seconds_median']:.2f} | "
                     f"{', '.join(f'{peak / GIB:.2f}' for peak in peaks)} | {max(peaks) / result['float32_bytes']:.3f} | "
                     f"{'yes' if max(peaks) <= result['target_rss_bytes'] else 'no'} |")
    concurrent = " (the two runs ran at the same time: not a speedup)" if result["concurrent"] else ""
    lines += [
        "",
        f"- 1-rank / 2-rank time: {result['time_ratio_1_over_2']:.2f}x wall, "
        f"{result['block_time_ratio_1_over_2']:.2f}x per block{concurrent}.",
        f"- Masks bit-identical for 1 and 2 ranks: {result['masks_identical']}.",
        f"- Every rank within the memory target: {result['meets_target']}.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=3e9, help="parameters of the checkpoint (>= 3e9 for the figure)")
    parser.add_argument("--samples", type=int, default=4, help="calibration windows")
    parser.add_argument("--sequence-length", type=int, default=64, help="tokens per calibration window")
    parser.add_argument("--shard-gb", type=float, default=2.0, help="largest safetensors shard, GB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/hpcprune-llm-scale"))
    parser.add_argument("--keep", action="store_true", help="keep the model folder")
    parser.add_argument("--reuse", action="store_true", help="prune the model folder a --keep run left in --dir")
    parser.add_argument("--concurrent", action="store_true",
                        help="run -n 2 and -n 1 at the same time (memory and masks as alone; times not comparable)")
    parser.add_argument("--out", default=str(RESULTS / "llm_scale"), help="results stem, or - to only print")
    args = parser.parse_args()
    args.load = os.getloadavg()[0]
    publish(measure(args), render, args.out)


if __name__ == "__main__":
    main()
