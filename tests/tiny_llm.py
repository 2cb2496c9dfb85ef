"""Tiny random Hugging Face folders for the block-sequential tests, written without a download.

    tiny_folders (a session fixture, in conftest), sequential_overrides(folder, folders, out, ...)   # a run's --set list

Each folder holds config.json, the weights as transformers' `save_pretrained` writes them (one
model.safetensors, or shards with model.safetensors.index.json when `shard_bytes` is given) and a
word-level tokenizer over a small vocabulary (tokenizer.json), so AutoTokenizer and the model
class load it with local files only. Weights are random but seeded; in the LLaMA folders the norms
before attention and MLP make a few input channels loud, so that Wanda's activation norms matter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ("the a cat dog sat on mat ran fast slow big small red blue and under over near far old new "
         "bird fish tree house river stone light dark warm cold green yellow sings sleeps eats sees").split()
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def english_text(path: Path, sentences: int, seed: int) -> Path:
    """A file of random sentences over WORDS, one a line."""
    generator = np.random.default_rng(seed)
    lines = [" ".join(generator.choice(WORDS, size=int(generator.integers(5, 14)))) for _ in range(sentences)]
    path.write_text("\n".join(lines) + "\n")
    return path


def word_tokenizer(folder: Path) -> int:
    """A word-level tokenizer over SPECIALS + WORDS saved in `folder`; returns the vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate([*SPECIALS, *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(folder)
    return len(vocab)


def save(model: torch.nn.Module, folder: Path, dtype: torch.dtype, shard_bytes: int | None) -> Path:
    model = model.to(dtype)
    if shard_bytes is None:
        model.save_pretrained(folder)
    else:
        model.save_pretrained(folder, max_shard_size=shard_bytes)
    return folder


def llama_folder(folder: Path, *, layers: int = 3, hidden: int = 32, seed: int = 0, dtype: torch.dtype = torch.float32,
                 shard_bytes: int | None = None, tie: bool = False) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = word_tokenizer(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a few loud input channels: Wanda's norms then differ from magnitude's choice
        for layer in model.model.layers:
            layer.input_layernorm.weight[:4] *= 8
            layer.post_attention_layernorm.weight[-4:] *= 8
    return save(model, folder, dtype, shard_bytes)


def opt_folder(folder: Path, *, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    from transformers import OPTConfig, OPTForCausalLM

    vocab = word_tokenizer(folder)
    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=vocab, hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=hidden,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3)
    return save(OPTForCausalLM(config), folder, torch.float32, None)


def bert_folder(folder: Path, *, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = {token: index for index, token in enumerate([*BERT_SPECIALS, *WORDS])}
    BertTokenizerFast(vocab=vocab).save_pretrained(folder)  # [CLS] ... [SEP], as sentence encoders see text
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=128)
    return save(BertModel(config), folder, torch.float32, None)


@dataclass(frozen=True)
class Folders:
    llama: Path  # 3 blocks, float32, sharded with an index
    llama_tied: Path  # 2 blocks, bf16, one file, LM head tied to the embeddings
    opt: Path
    bert: Path
    calibration: Path  # text files
    evaluation: Path


    @classmethod
    def at(cls, root: Path) -> Folders:
        """The folders `write_folders` wrote under `root` (what a driver under mpirun is given)."""
        return cls(*(root / name for name in MODELS), calibration=root / "calibration.txt",
                   evaluation=root / "evaluation.txt")


MODELS = {
    "llama": lambda folder: llama_folder(folder, shard_bytes=24_000),
    "llama_tied": lambda folder: llama_folder(folder, layers=2, dtype=torch.bfloat16, tie=True, seed=1),
    "opt": opt_folder,
    "bert": bert_folder,
}


def write_folders(root: Path) -> Folders:
    for name, build in MODELS.items():
        (root / name).mkdir()
        build(root / name)
    english_text(root / "calibration.txt", 80, seed=2)
    english_text(root / "evaluation.txt", 40, seed=3)
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
