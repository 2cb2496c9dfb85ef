"""Calibration and evaluation windows of plain text (hpcprune.models.text_windows) on tiny model folders.

    python -m pytest tests/test_text_windows.py -q
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import sys

import pytest
import torch

from hpcprune.config import CalibrationConfig, load_config
from hpcprune.errors import UsageError
from hpcprune.models.text_windows import (
    calibration_windows,
    eval_windows,
    sentence_windows,
    token_ids,
)
from tests.helpers import ROOT


def calibration(text, **settings) -> CalibrationConfig:
    return CalibrationConfig(text=str(text), **{"sequence_length": 16, "samples": 12, **settings})


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def test_calibration_windows_start_where_the_sparsegpt_and_wanda_loaders_draw_them(llm_folder, corpus_file):
    folder = llm_folder("llama")
    windows = calibration_windows(folder, calibration(corpus_file, seed=3))
    assert windows.shape == (12, 16) and windows.dtype == torch.int64
    ids = token_ids(folder, corpus_file.read_text())
    random.seed(3)  # their get_wikitext2: one global seed, one randint(0, N - L - 1) per sample
    starts = [random.randint(0, ids.numel() - 16 - 1) for _ in range(12)]
    assert torch.equal(windows, torch.stack([ids[start:start + 16] for start in starts]))


def test_calibration_windows_are_the_same_bits_in_another_process(llm_folder, corpus_file):
    folder = llm_folder("gpt2", dtype="bfloat16", sharded=True)
    here = calibration_windows(folder, calibration(corpus_file))
    assert torch.equal(here, calibration_windows(folder, calibration(corpus_file)))
    program = ("import hashlib, sys; from hpcprune.config import CalibrationConfig; "
               "from hpcprune.models.text_windows import calibration_windows; "
               "w = calibration_windows(sys.argv[1], CalibrationConfig(text=sys.argv[2], sequence_length=16, samples=12)); "
               "print(hashlib.sha256(w.numpy().tobytes()).hexdigest())")
    other = subprocess.run([sys.executable, "-c", program, str(folder), str(corpus_file)], capture_output=True,
                           text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": ""},
                           check=True)
    assert other.stdout.strip() == digest(here)


def test_the_seed_and_the_counts_choose_the_windows(llm_folder, corpus_file):
    folder = llm_folder("qwen2")
    first = calibration_windows(folder, calibration(corpus_file, seed=0))
    assert not torch.equal(first, calibration_windows(folder, calibration(corpus_file, seed=1)))
    more = calibration_windows(folder, calibration(corpus_file, seed=0, samples=20, sequence_length=16))
    assert more.shape == (20, 16) and torch.equal(more[:12], first)  # window i depends on draws 0..i only


def test_a_llama_tokenizer_puts_one_bos_in_front_of_the_text_and_gpt2_none(llm_folder, corpus_file):
    llama, gpt2 = token_ids(llm_folder("llama"), corpus_file.read_text()), token_ids(llm_folder("gpt2"), corpus_file.read_text())
    bos = json.loads((llm_folder("llama") / "config.json").read_text())["bos_token_id"]
    assert llama[0] == bos and int((llama == bos).sum()) == 1
    assert torch.equal(llama[1:], gpt2)  # same BPE underneath


def test_eval_windows_are_consecutive_and_drop_the_last_partial_window(llm_folder, corpus_file):
    folder = llm_folder("mistral")
    ids = token_ids(folder, corpus_file.read_text())
    windows = eval_windows(folder, str(corpus_file), 24)
    assert windows.shape == (ids.numel() // 24, 24) and ids.numel() % 24  # there is a partial window to drop
    assert torch.equal(windows.flatten(), ids[: windows.numel()])


def test_sentence_windows_are_seeded_lines_with_special_tokens_padded(llm_folder, corpus_file):
    from transformers import AutoTokenizer

    folder = llm_folder("bert")
    input_ids, attention = sentence_windows(folder, calibration(corpus_file, seed=5, sequence_length=12))
    assert input_ids.shape == attention.shape == (12, 12) and input_ids.dtype == attention.dtype == torch.int64
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    lines = corpus_file.read_text().splitlines()
    truncated = 0
    for row, index in enumerate(random.Random(5).sample(range(len(lines)), 12)):  # the lines, in the order drawn
        tokens = tokenizer(lines[index])["input_ids"]  # [CLS] ... [SEP]
        if len(tokens) > 12:  # truncation keeps [SEP] last
            tokens, truncated = [*tokens[:11], tokenizer.sep_token_id], truncated + 1
        assert input_ids[row, :len(tokens)].tolist() == tokens and int(attention[row].sum()) == len(tokens)
        assert (input_ids[row, len(tokens):] == tokenizer.pad_token_id).all()
    assert 0 < truncated < 12  # both cases were seen
    assert tokenizer.unk_token_id not in input_ids.tolist()  # the WordPiece covers every ASCII word


@pytest.mark.parametrize("problem, match", [
    ("missing", "cannot read it"), ("folder", "cannot read it"), ("latin1", "not UTF-8"),
    ("short", "fewer than one window"), ("unset", "calibration.text is not set"),
])
def test_calibration_text_problems_are_one_line_naming_the_file(llm_folder, tmp_path, problem, match):
    text = tmp_path / "text.txt"
    if problem == "folder":
        text.mkdir()
    elif problem == "latin1":
        text.write_bytes("Caf\xe9 au lait is a drink.".encode("latin-1") * 20)
    elif problem == "short":
        text.write_text("Too short.")
    cfg = CalibrationConfig(text=None if problem == "unset" else str(text), sequence_length=16, samples=4)
    with pytest.raises(UsageError, match=match) as caught:
        calibration_windows(llm_folder("llama"), cfg)
    assert "\n" not in str(caught.value) and (problem == "unset" or str(text) in str(caught.value))


def test_a_window_needs_the_token_after_it_and_eval_a_whole_window(llm_folder, tmp_path):
    folder = llm_folder("gpt2")
    text = tmp_path / "text.txt"
    text.write_text("the river was high and the water was long in the city of the world")
    ids = token_ids(folder, text.read_text())
    count = ids.numel()
    tight = calibration_windows(folder, calibration(text, sequence_length=count - 1, samples=8))
    assert torch.equal(tight, ids[:count - 1].expand(8, -1))  # randint(0, 0): only the window at 0 fits
    with pytest.raises(UsageError, match=f"{count} tokens"):
        calibration_windows(folder, calibration(text, sequence_length=count, samples=3))
    assert eval_windows(folder, str(text), count).shape == (1, count)
    with pytest.raises(UsageError, match="eval.text"):
        eval_windows(folder, str(text), count + 1)


def test_sentence_windows_refuse_too_few_lines_and_a_tokenizer_without_padding(llm_folder, corpus_file, tmp_path):
    with pytest.raises(UsageError, match="400 non-empty lines, fewer than calibration.samples=500"):
        sentence_windows(llm_folder("bert"), calibration(corpus_file, samples=500))
    unpadded = shutil.copytree(llm_folder("gpt2"), tmp_path / "unpadded")
    settings = json.loads((unpadded / "tokenizer_config.json").read_text())
    settings.pop("pad_token", None)
    (unpadded / "tokenizer_config.json").write_text(json.dumps(settings))
    with pytest.raises(UsageError, match="no padding token"):
        sentence_windows(unpadded, calibration(corpus_file))


def test_the_text_keys_have_defaults_and_are_validated():
    config = load_config(None)
    assert (config.calibration.samples, config.calibration.seed, config.calibration.text) == (128, 0, None)
    assert (config.eval.text, config.eval.sequence_length) == (None, None)
    for bad in ("calibration.samples=0", "calibration.seed=-1", "eval.sequence_length=1", "eval.texts=a.txt"):
        with pytest.raises(UsageError, match=bad.split("=")[0].split(".")[-1]):
            load_config(None, [bad])
