"""The tensors of a Hugging Face folder's safetensors, read by name: one file, or shards with an index.

    hpcprune prune --config configs/llm_wanda.yaml     # block b's tensors, read only while b is pruned

`model.safetensors.index.json` maps each tensor to its shard; a folder without one has a single
`model.safetensors`. Tensors are read with safetensors' own `safe_open`, in their stored dtype
(bf16, fp16, fp32), only those asked for: a rank never holds more of the checkpoint than the block it
works on. Names a model uses and a file does not hold are looked up through the model's tied
parameters (an LM head stored once as the input embeddings) and its base-model prefix (a `bert.`
that a task head's class adds or drops).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from hpcprune.errors import UsageError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class TensorFiles:
    """Where each tensor of a folder lives, and reading a few of them."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files = _weight_map(folder)  # tensor name -> file

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def resolve(self, name: str, aliases: Iterable[str] = (), prefix: str = "") -> str:
        """The stored name holding module tensor `name`: itself, a tied alias, or with `prefix` added or dropped."""
        for candidate in (name, *aliases):
            for spelled in _spellings(candidate, prefix):
                if spelled in self.files:
                    return spelled
        raise UsageError(f"{self.folder}: no tensor {name!r} in its safetensors files (a checkpoint of another model?)")

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The stored tensors `names` (stored names), each file opened once, in stored dtype on the CPU."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        tensors = {}
        for file, wanted in by_file.items():
            try:
                with safe_open(file, framework="pt", device="cpu") as opened:
                    for name in wanted:
                        tensors[name] = opened.get_tensor(name)
            except (OSError, SafetensorError) as error:
                raise UsageError(f"cannot read {file}: {error}") from None
        return tensors


def _spellings(name: str, prefix: str) -> list[str]:
    if not prefix:
        return [name]
    dropped = name.removeprefix(prefix + ".") if name.startswith(prefix + ".") else None
    return [name, *([dropped] if dropped else []), f"{prefix}.{name}"]


def _weight_map(folder: Path) -> dict[str, Path]:
    index = folder / INDEX
    if index.is_file():
        try:
            mapping: Mapping[str, str] = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise UsageError(f"{index}: not a safetensors index ({error})") from None
        return {name: folder / file for name, file in mapping.items()}
    single = folder / SINGLE
    if not single.is_file():
        raise UsageError(f"{folder}: neither {SINGLE} nor {INDEX} (the weights of a Hugging Face folder)")
    try:
        with safe_open(single, framework="pt", device="cpu") as opened:
            return dict.fromkeys(opened.keys(), single)
    except (OSError, SafetensorError) as error:
        raise UsageError(f"cannot read {single}: {error}") from None
