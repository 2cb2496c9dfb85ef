"""Hugging Face style models from a local folder (config.json + model.safetensors): BERT-like encoders.

    hpcprune prune --set model.name=hf:path/to/folder --set prune.criterion=wanda \\
        --set calibration.text=sentences.txt --set pretrain.epochs=0 --set finetune.epochs=0

Needs the optional `transformers` extra (`pip install hpcprune[hf]`). Everything is read from the
folder with `local_files_only=True`: nothing is downloaded at run time, and weights load from
safetensors. The class is the folder's `config.json` `architectures[0]` (else AutoModel), so a
BertModel, a BertForSequenceClassification... come back as saved. Prunable are the Linear layers:
attention query/key/value/output and the MLP's intermediate and output, pooler and heads;
embeddings and LayerNorms stay dense. These models are pruned, not trained, here: the run's
data are sentences for calibration (`calibration.text`, one per line), tokenized with the folder's
tokenizer, joined, and cut into sequences of `calibration.sequence_length` tokens (no padding, so
every token counts in Wanda's input norms).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from hpcprune.config import CalibrationConfig
from hpcprune.errors import UsageError

PREFIX = "hf:"


def is_hf_model(name: str) -> bool:
    return name.startswith(PREFIX)


def _transformers():
    try:
        return importlib.import_module("transformers")
    except ImportError:
        raise UsageError("model.name 'hf:...' needs the transformers package: pip install 'hpcprune[hf]'") from None


def folder_of(name: str) -> Path:
    folder = Path(name.removeprefix(PREFIX))
    if not (folder / "config.json").is_file():
        raise UsageError(f"model.name {name!r}: {folder} has no config.json (a Hugging Face model folder is expected)")
    return folder


def hf_builder(name: str):
    """A builder for `build_model`: no arguments, the model as saved in the folder."""
    def build() -> nn.Module:
        transformers = _transformers()
        folder = folder_of(name)
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        architecture = (getattr(config, "architectures", None) or ["AutoModel"])[0]
        model_class = getattr(transformers, architecture, None) or transformers.AutoModel
        try:
            return model_class.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        except (OSError, ValueError) as error:
            raise UsageError(f"model.name {name!r}: cannot load the model ({error})") from None
    return build


def text_sequences(name: str, cfg: CalibrationConfig) -> torch.Tensor:
    """Token ids of `cfg.text`'s sentences, joined and cut into rows of `cfg.sequence_length` (int64)."""
    if cfg.text is None:
        raise UsageError("a Hugging Face model calibrates on text: set calibration.text to a file of sentences")
    try:
        sentences = [line.strip() for line in Path(cfg.text).read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as error:
        raise UsageError(f"calibration.text {cfg.text}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise UsageError(f"calibration.text {cfg.text}: not UTF-8 text (at byte offset {error.start})") from None
    tokenizer = _transformers().AutoTokenizer.from_pretrained(folder_of(name), local_files_only=True)
    ids = [token for sentence in sentences for token in tokenizer(sentence, add_special_tokens=False)["input_ids"]]
    rows = len(ids) // cfg.sequence_length
    if rows == 0:
        raise UsageError(f"calibration.text {cfg.text}: {len(ids)} tokens, fewer than one sequence of "
                         f"calibration.sequence_length={cfg.sequence_length}")
    return torch.tensor(ids[: rows * cfg.sequence_length], dtype=torch.int64).view(rows, cfg.sequence_length)


def encoder_inputs(rows: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": rows, "attention_mask": torch.ones_like(rows)}
