"""Token windows of plain text for Hugging Face models: what they are calibrated and evaluated on.

    hpcprune prune --config configs/llm_wanda.yaml     # calibration.text, eval.text

A text is a plain UTF-8 file (a leading byte-order mark is ignored). It is tokenized with the model
folder's own tokenizer (AutoTokenizer, local files only: nothing is downloaded), the whole file as
one string and with the tokenizer's default special tokens (a LLaMA tokenizer puts one BOS in front,
a GPT-2 one none), as SparseGPT's and Wanda's data loaders tokenize WikiText-2.

    calibration_windows  causal LMs: `calibration.samples` windows of `calibration.sequence_length`
                         tokens at seeded random offsets into the tokenized text, drawn as those
                         repositories draw them: Python's random.Random(calibration.seed), one
                         randint(0, N - L - 1) per window in window order (N tokens, L per window;
                         windows may overlap, and the text needs at least L + 1 tokens).
    sentence_windows     encoders: one line of the text per window, tokenized alone with the
                         tokenizer's special tokens ([CLS] ... [SEP]), truncated or padded to
                         `calibration.sequence_length`, with its attention mask. The lines are a
                         seeded choice: random.Random(calibration.seed).sample of the non-empty lines'
                         indices, in the order drawn (so the windows cover the whole file, not its
                         beginning).
    eval_windows         perplexity: the tokenized text cut into consecutive, non-overlapping windows
                         of `sequence_length` tokens, from the first token on; the last partial window
                         is dropped (SparseGPT's and Wanda's WikiText-2 evaluation does the same).

Python's Mersenne Twister and its randint/sample are specified to give the same draws for a seed on
every platform and Python version, and nothing here depends on the number of ranks or threads:
every rank of every run computes the same windows, bit for bit, and takes its share by window index.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path

import torch

from hpcprune.config import CalibrationConfig
from hpcprune.errors import UsageError
from hpcprune.models.hf import _transformers, folder_of


def calibration_windows(folder: str | Path, cfg: CalibrationConfig) -> torch.Tensor:
    """[cfg.samples, cfg.sequence_length] int64 token ids drawn from `cfg.text` (see the module docstring)."""
    ids = token_ids(folder, read_text(cfg.text, "calibration.text"))
    length = cfg.sequence_length
    if ids.numel() < length + 1:
        raise UsageError(f"calibration.text {cfg.text}: {ids.numel()} tokens, fewer than one window of "
                         f"calibration.sequence_length={length} plus the token after it")
    draw = random.Random(cfg.seed)
    starts = torch.tensor([draw.randint(0, ids.numel() - length - 1) for _ in range(cfg.samples)], dtype=torch.int64)
    return ids[starts[:, None] + torch.arange(length)]


def sentence_windows(folder: str | Path, cfg: CalibrationConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each [cfg.samples, cfg.sequence_length] int64: one line of `cfg.text` per row."""
    lines = [line.strip() for line in read_text(cfg.text, "calibration.text").splitlines() if line.strip()]
    if len(lines) < cfg.samples:
        raise UsageError(f"calibration.text {cfg.text}: {len(lines)} non-empty lines, fewer than "
                         f"calibration.samples={cfg.samples} (a sentence model takes one line per window)")
    chosen = random.Random(cfg.seed).sample(range(len(lines)), cfg.samples)
    tokenizer = tokenizer_of(folder)
    if tokenizer.pad_token is None:
        raise UsageError(f"model folder {folder}: its tokenizer has no padding token, which windows of one line "
                         f"padded to calibration.sequence_length need")
    batch = tokenizer([lines[index] for index in chosen], padding="max_length", truncation=True,
                      max_length=cfg.sequence_length, return_tensors="pt")
    return batch["input_ids"].to(torch.int64), batch["attention_mask"].to(torch.int64)


def eval_windows(folder: str | Path, text: str | None, sequence_length: int, key: str = "eval.text") -> torch.Tensor:
    """[n, sequence_length] int64: consecutive windows of the tokenized `text`, the last partial one dropped."""
    ids = token_ids(folder, read_text(text, key))
    count = ids.numel() // sequence_length
    if count == 0:
        raise UsageError(f"{key} {text}: {ids.numel()} tokens, fewer than one window of {sequence_length}")
    return ids[: count * sequence_length].view(count, sequence_length)


def read_text(path: str | Path | None, key: str) -> str:
    """The file's text; a missing, unreadable or non-UTF-8 file is one UsageError naming `key`."""
    if path is None:
        raise UsageError(f"{key} is not set: a Hugging Face model needs a plain text file there")
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise UsageError(f"{key} {path}: cannot read it ({error.strerror or error})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UsageError(f"{key} {path}: not UTF-8 text (byte {error.start}: {error.reason})") from None


def token_ids(folder: str | Path, text: str) -> torch.Tensor:
    """The whole text as one int64 vector of the folder tokenizer's ids, default special tokens included."""
    # verbose=False: a text is meant to be longer than the model's context; the tokenizer would warn.
    ids = tokenizer_of(folder)(text, add_special_tokens=True, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(folder: str):
    try:
        return _transformers().AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise UsageError(f"model folder {folder}: cannot load its tokenizer ({str(error).splitlines()[0]})") from None


def tokenizer_of(folder: str | Path):
    """The folder's own tokenizer, loaded once per process (calibration and evaluation share it)."""
    return _cached_tokenizer(str(folder_of(str(folder)).resolve()))
