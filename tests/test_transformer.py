"""A tiny random BERT from a local Hugging Face style folder, pruned end to end with Wanda and magnitude.

    python -m pytest tests/test_transformer.py -q

The folder (config.json, model.safetensors, tokenizer files) is written by the test itself: nothing
is downloaded.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from hpcprune.config import load_config
from hpcprune.dist.world import SingleWorld
from hpcprune.errors import UsageError
from hpcprune.models.builders import load_state_file
from hpcprune.prune.selection import prune_count
from hpcprune.run.pipeline import run
from tests.conftest import missing
from tests.helpers import CONFIGS, archive_masks

WORDS = "the a cat dog sat on mat ran fast slow big small red blue and under over near far old new".split()
ATTENTION = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")
MLP = ("intermediate.dense", "output.dense")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    try:
        from transformers import BertConfig, BertModel, BertTokenizerFast
    except ImportError:
        missing("transformers", "pip install 'hpcprune[hf]'")
    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = {token: index for index, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    BertTokenizerFast(vocab=vocab).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)  # config.json + model.safetensors
    generator = np.random.default_rng(0)
    sentences = [" ".join(generator.choice(WORDS, size=int(generator.integers(4, 12)))) for _ in range(120)]
    text = folder / "sentences.txt"
    text.write_text("\n".join(sentences) + "\n")
    return folder, text


def bert_config(folder, text, out, *overrides):
    return load_config(CONFIGS / "oneshot_global.yaml", [
        f"model.name=hf:{folder}", "pretrain.epochs=0", "finetune.epochs=0", "prune.sparsity=0.6",
        f"calibration.text={text}", "calibration.sequence_length=16", "calibration.batch_size=8",
        f"output.path={out}", "progress=false", *overrides])


def block_weights(layers: int = 2) -> list[str]:
    return [f"encoder.layer.{layer}.{part}.weight" for layer in range(layers) for part in ATTENTION + MLP]


@pytest.mark.parametrize("criterion", ["wanda", "magnitude"])
def test_tiny_bert_prunes_end_to_end_and_lists_attention_and_mlp_weights(tiny_bert, tmp_path, criterion):
    folder, text = tiny_bert
    out = tmp_path / f"{criterion}.h5"
    rule = "row" if criterion == "wanda" else "global"
    result = run(bert_config(folder, text, out, f"prune.criterion={criterion}", f"prune.rule={rule}"),
                 SingleWorld(), force=True)
    assert result.achieved_sparsity == pytest.approx(0.6, abs=0.01)  # rows of 32 and 64 round to 19/32, 38/64
    with h5py.File(out, "r") as archive:
        params = {row["name"].decode(): bool(row["prunable"]) for row in archive["model/params"][()]}
        assert archive["model"].attrs["name"] == f"hf:{folder}"
    assert all(params[name] for name in block_weights())  # attention and MLP Linear weights
    assert not params["embeddings.word_embeddings.weight"] and not params["encoder.layer.0.output.LayerNorm.weight"]
    masks = archive_masks(out, 1)
    assert set(block_weights()) <= set(masks)
    final = load_state_file(tmp_path / f"{criterion}.h5.states" / "round-0001.safetensors")
    for name in block_weights():
        weight = final[name]
        keep = torch.from_numpy(np.unpackbits(masks[name], count=weight.numel()).astype(bool)).view(weight.shape)
        assert torch.count_nonzero(weight[~keep]) == 0
        if criterion == "wanda":  # compared within each output row: every row prunes the same count
            assert (keep.sum(dim=1) == weight.shape[1] - prune_count(0.6, weight.shape[1])).all(), name


def test_wanda_on_bert_uses_the_token_activations(tiny_bert, tmp_path):
    folder, text = tiny_bert
    wanda = run(bert_config(folder, text, tmp_path / "w.h5", "prune.criterion=wanda", "prune.rule=row"),
                SingleWorld(), force=True)
    magnitude = run(bert_config(folder, text, tmp_path / "m.h5", "prune.criterion=magnitude", "prune.rule=row"),
                    SingleWorld(), force=True)
    assert wanda.kept == magnitude.kept
    ours, theirs = archive_masks(tmp_path / "w.h5", 1), archive_masks(tmp_path / "m.h5", 1)
    assert any(not np.array_equal(ours[name], theirs[name]) for name in block_weights())


def test_bert_runs_refuse_what_they_cannot_do(tiny_bert, tmp_path):
    folder, text = tiny_bert
    with pytest.raises(UsageError, match="calibration.text"):
        run(bert_config(folder, text, tmp_path / "a.h5", "prune.criterion=wanda", "calibration.text=null"),
            SingleWorld(), force=True)
    with pytest.raises(UsageError, match="needs labelled calibration data"):
        run(bert_config(folder, text, tmp_path / "b.h5", "prune.criterion=taylor"), SingleWorld(), force=True)
    with pytest.raises(UsageError, match="pruned without training"):
        bert_config(folder, text, tmp_path / "c.h5", "finetune.epochs=1")
    with pytest.raises(UsageError, match="has no config.json"):
        run(bert_config(tmp_path, text, tmp_path / "d.h5"), SingleWorld(), force=True)
