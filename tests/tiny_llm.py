"""The model folders and texts of the block-sequential tests, and the overrides of a small run.

    tiny_folders (a session fixture, in conftest)      sequential_overrides(folder, folders, out, ...)

The folders are tests/llm_folders.py's tiny random ones, under one root so that a driver started
by mpirun finds them from a single path (`Folders.at`): a 3-block LLaMA in float32 shards with an
index, a 2-block Gemma in bfloat16 whose LM head is its embeddings, a 2-block OPT, a 2-block BERT and
a 1-block LLaMA with a wide MLP (rows enough to be split over ranks).
In the LLaMA, the norms before attention and MLP make a few input channels loud, so that Wanda's
activation norms choose other weights than magnitude does. The texts are llm_folders' corpus (what
the tiny tokenizers were trained on): one for calibration, another seed for evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.llm_folders import build_folder, weight_files, write_corpus

LOUD = 8.0  # how much louder the first (before attention) and last (before the MLP) four channels are


@dataclass(frozen=True)
class Folders:
    llama: Path
    gemma_tied: Path
    opt: Path
    bert: Path
    llama_wide: Path  # one block whose gate and up projections have 288 rows: SparseGPT can cut them
    gpt2: Path  # Conv1D layers: weights stored in x out
    calibration: Path  # text files
    evaluation: Path

    @classmethod
    def at(cls, root: Path) -> Folders:
        """The folders `write_folders` wrote under `root` (what a driver under mpirun is given)."""
        return cls(*(root / name for name in MODELS), calibration=root / "calibration.txt",
                   evaluation=root / "evaluation.txt")


def loud_channels(folder: Path) -> Path:
    """Scale the LLaMA's norm weights in place in its safetensors files (shards and index unchanged)."""
    from safetensors.torch import load_file, save_file

    for file in weight_files(folder):
        tensors = load_file(file)
        for name, tensor in tensors.items():
            if name.endswith("input_layernorm.weight"):
                tensor[:4] *= LOUD
            elif name.endswith("post_attention_layernorm.weight"):
                tensor[-4:] *= LOUD
        save_file(tensors, file, metadata={"format": "pt"})
    return folder


MODELS = {
    "llama": lambda folder: loud_channels(build_folder("llama", folder, sharded=True)),
    "gemma_tied": lambda folder: build_folder("gemma", folder, dtype="bfloat16", layers=2, seed=1),
    "opt": lambda folder: build_folder("opt", folder, layers=2),
    "bert": lambda folder: build_folder("bert", folder, layers=2),
    "llama_wide": lambda folder: build_folder("llama", folder, layers=1, intermediate_size=288),
    "gpt2": lambda folder: build_folder("gpt2", folder, layers=2),
}


def write_folders(root: Path) -> Folders:
    for name, build in MODELS.items():
        build(root / name)
    write_corpus(root / "calibration.txt", lines=120, seed=2)
    write_corpus(root / "evaluation.txt", lines=40, seed=3)
    return Folders.at(root)


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory) -> Folders:
    from tests.conftest import require_module  # late: conftest imports this fixture

    require_module("transformers", "transformers", "pip install 'hpcprune[hf]'")
    return write_folders(tmp_path_factory.mktemp("tiny-llm"))


def sequential_overrides(folder: Path, folders: Folders, out: Path, *more: str) -> list[str]:
    """--set overrides of a small block-sequential Wanda run of `folder` (7 windows of 16 tokens)."""
    return [f"model.name=hf:{folder}", "schedule.kind=sequential", "pretrain.epochs=0", "finetune.epochs=0",
            "prune.criterion=wanda", "prune.sparsity=0.5", f"calibration.text={folders.calibration}",
            "calibration.samples=7", "calibration.sequence_length=16", f"eval.text={folders.evaluation}",
            "eval.sequence_length=24", f"output.path={out}", "progress=false", "seed=5", *more]
