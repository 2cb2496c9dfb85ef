"""Tiny random Hugging Face model folders, built offline, for the tests and benchmarks of `hf:` models.

    from tests.llm_folders import build_folder, write_corpus
    build_folder("llama", tmp / "llama", dtype="bfloat16", sharded=True)

A folder is laid out as a hub download would be: config.json, generation_config.json (decoders),
tokenizer.json + tokenizer_config.json, and safetensors weights, either one model.safetensors or
shards model-0000i-of-0000n.safetensors with model.safetensors.index.json (`sharded=True`: at
least three shards), in float32, bfloat16 or float16 as stored. The weights are transformers' own
random initialisation under a fixed seed; the blocks are few and narrow (hidden 32, 4 heads), so a
folder is built in well under a second.

Tokenizers are built locally with the `tokenizers` library, nothing downloaded:
- decoders get a byte-level BPE trained on `corpus_text()` (every byte is a token, so any UTF-8 text
  tokenizes, with merges for the corpus's words), wrapped as a PreTrainedTokenizerFast; the LLaMA,
  Mistral, Gemma and OPT folders prepend a BOS token as their real tokenizers do, GPT-2 and Qwen2 none;
- BERT gets a WordPiece vocabulary: the corpus's words plus every printable ASCII character alone and
  as a `##` continuation, so no word of an English text is unknown.
Both are deterministic: the same folder bytes in every process.
"""

from __future__ import annotations

import math
import os
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ("the of and to in is was for that with as on by he it at from his an were are which this be or had not "
         "but first one their its new after who they have her she two been other when there all during into "
         "school time may years more most only over city some world would where later up such used many can "
         "state about national out known university united then made team under season american film between "
         "three well high being both also through part number people early back called game war since long "
         "river water model weight layer block window text token prune sparse dense rank shard").split()

HIDDEN, HEADS, KV_HEADS, INTERMEDIATE, POSITIONS = 32, 4, 2, 64, 128
BPE_VOCAB = 384
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"


def corpus_text(lines: int = 400, seed: int = 0) -> str:
    """Sentences of common English words, one per line, the same for a seed everywhere."""
    generator = np.random.default_rng(seed)
    sentences = []
    for _ in range(lines):
        words = generator.choice(WORDS, size=int(generator.integers(5, 16)))
        sentences.append(" ".join(words).capitalize() + ".")
    return "\n".join(sentences) + "\n"


def write_corpus(path: Path, lines: int = 400, seed: int = 0) -> Path:
    path.write_text(corpus_text(lines, seed), encoding="utf-8")
    return path


# --- tokenizers ----------------------------------------------------------------------------------


def byte_bpe_tokenizer(bos: bool, max_length: int = POSITIONS):
    """A byte-level BPE trained on the corpus, as a transformers fast tokenizer."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=[BOS, EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus_text().splitlines(), trainer)
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=max_length)


def wordpiece_tokenizer(max_length: int = POSITIONS):
    """BERT's WordPiece over the corpus's words and every printable ASCII character."""
    from transformers import BertTokenizerFast

    characters = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *characters, *(f"##{c}" for c in characters), *WORDS]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    return BertTokenizerFast(vocab=vocab, model_max_length=max_length)


# --- the architectures ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    config: str  # transformers config class
    model: str  # transformers model class (config.json's architectures[0])
    sizes: Callable[[int], dict]  # layers -> config keyword arguments
    tokenizer: Callable[[], object]
    decoder: bool = True


def _llama_like(layers: int) -> dict:
    return dict(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
                num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=POSITIONS)


KINDS: dict[str, Kind] = {
    "llama": Kind("LlamaConfig", "LlamaForCausalLM", _llama_like, lambda: byte_bpe_tokenizer(bos=True)),
    "mistral": Kind("MistralConfig", "MistralForCausalLM", _llama_like, lambda: byte_bpe_tokenizer(bos=True)),
    "qwen2": Kind("Qwen2Config", "Qwen2ForCausalLM", _llama_like, lambda: byte_bpe_tokenizer(bos=False)),
    "gemma": Kind("GemmaConfig", "GemmaForCausalLM", lambda layers: {**_llama_like(layers), "head_dim": HIDDEN // HEADS},
                  lambda: byte_bpe_tokenizer(bos=True)),
    "gpt2": Kind("GPT2Config", "GPT2LMHeadModel",
                 lambda layers: dict(n_embd=HIDDEN, n_layer=layers, n_head=HEADS, n_inner=INTERMEDIATE, n_positions=POSITIONS),
                 lambda: byte_bpe_tokenizer(bos=False)),
    "opt": Kind("OPTConfig", "OPTForCausalLM",
                lambda layers: dict(hidden_size=HIDDEN, word_embed_proj_dim=HIDDEN, ffn_dim=INTERMEDIATE,
                                    num_hidden_layers=layers, num_attention_heads=HEADS, max_position_embeddings=POSITIONS),
                lambda: byte_bpe_tokenizer(bos=True)),
    "bert": Kind("BertConfig", "BertModel",
                 lambda layers: dict(hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=HEADS,
                                     intermediate_size=INTERMEDIATE, max_position_embeddings=POSITIONS),
                 wordpiece_tokenizer, decoder=False),
}
"""The architectures a test can ask for, by name."""


def _special_ids(tokenizer) -> dict:
    ids = {"pad_token_id": tokenizer.pad_token_id}
    if tokenizer.bos_token_id is not None:
        ids.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return ids


def build_folder(kind: str, out: Path, *, dtype: str = "float32", sharded: bool = False, layers: int = 3,
                 seed: int = 0, **sizes: int) -> Path:
    """Write a tiny random `kind` model (see KINDS) with its tokenizer into `out`; returns `out`.
    `sizes` override the kind's config sizes (intermediate_size=..., say)."""
    import transformers

    spec = KINDS[kind]
    tokenizer = spec.tokenizer()
    config = getattr(transformers, spec.config)(vocab_size=len(tokenizer), **{**spec.sizes(layers), **sizes},
                                              **_special_ids(tokenizer))
    torch.manual_seed(seed)
    model = getattr(transformers, spec.model)(config).to(DTYPES[dtype]).eval()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    stored = sum(tensor.nbytes for tensor in model.state_dict().values())
    # A shard holds whole tensors, so a limit of a third of the bytes gives three shards or more.
    model.save_pretrained(out, max_shard_size=math.ceil(stored / 3) if sharded else "50GB")
    return out


def weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors files (one, or the shards its index names)."""
    return sorted(folder.glob("*.safetensors"))


# --- the real model and texts, built once per machine --------------------------------------------

CACHE = Path(os.environ.get("HPCPRUNE_CACHE", Path.home() / ".cache" / "hpcprune"))
"""Where tests/run.sh has tests/build_smollm2.py and tests/build_texts.py write (HPCPRUNE_CACHE)."""
SMOLLM2 = CACHE / "smollm2-135m"
TEXTS = CACHE / "texts"
