"""`hpcprune export --format hf`: a pruned round as a Hugging Face folder its own class loads.

    python -m pytest -q tests/test_export_hf.py

The archives are written here with hpcprune.archive.writer as a block-sequential run writes them:
one round, masks named as in the model's state dict, and a /blocks table whose weights files hold
the blocks' updated weights. A real (seconds-long) BERT run of the pipeline checks the older
`hf:` path, whose export used to die on an image it fed to count FLOPs.
"""

from __future__ import annotations

import json
import math
import shutil

import h5py
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hpcprune.archive.codec import pack_mask
from hpcprune.archive.writer import Archive
from hpcprune.config import load_config
from hpcprune.deploy.export import export
from hpcprune.dist.world import SingleWorld
from hpcprune.errors import UsageError
from hpcprune.models.builders import load_state_file
from hpcprune.models.safetensors_stream import TensorSpec, write_streamed
from hpcprune.models.text_windows import eval_windows
from hpcprune.run.pipeline import run
from tests.helpers import CONFIGS, run_cli

BLOCKS_DTYPE = np.dtype([("block", "i8"), ("seconds", "f8"), ("weights_file", h5py.string_dtype())])
LLAMA_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def folder_tensors(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as file:
            tensors.update((name, file.get_tensor(name)) for name in file.keys())
    return tensors


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, so that equality is bit for bit (0.0 and -0.0, NaNs)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def random_masks(tensors, names, seed=0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.rand(tensors[name].shape, generator=generator) >= 0.5 for name in names}


def write_archive(path, folder, masks, blocks=()):
    """An archive as the block-sequential pipeline leaves it: round 1, its masks, its /blocks table."""
    config = load_config(None, [f"model.name=hf:{folder}", "pretrain.epochs=0", "finetune.epochs=0",
                                "prune.criterion=wanda", "prune.sparsity=0.5", f"output.path={path}"])
    tensors = folder_tensors(folder)
    params = [(name, tuple(tensor.shape), name in masks) for name, tensor in tensors.items()]
    archive = Archive.create(path, config_yaml=config.to_yaml(), model_name=config.model.name, params=params,
                             world_size=1, backend="single")
    kept = sum(int(mask.sum()) for mask in masks.values())
    archive.write_round(1, attrs={"criterion": "wanda", "rule": "row", "target_sparsity": 0.5,
                                  "achieved_sparsity": 0.5, "kept": kept, "total": sum(m.numel() for m in masks.values())},
                        masks={name: (pack_mask(mask), tuple(mask.shape), int(mask.sum())) for name, mask in masks.items()},
                        layers=[], history=[])
    archive.close()  # as a run ends: the lock goes with it
    if blocks:
        with h5py.File(path, "a") as file:
            file["rounds/0001"].create_dataset("blocks", data=np.array(list(blocks), dtype=BLOCKS_DTYPE))
    return path


@pytest.fixture(scope="module")
def pruned_llama(llm_folder, tmp_path_factory):
    """A sharded bf16 LLaMA: every block Linear masked, block 1's q_proj and up_proj updated by its weights file."""
    folder = llm_folder("llama", dtype="bfloat16", sharded=True)
    tensors = folder_tensors(folder)
    linears = [f"model.layers.{block}.{part}.weight" for block in range(3) for part in LLAMA_LINEARS]
    masks = random_masks(tensors, linears)
    generator = torch.Generator().manual_seed(1)
    updates = {name: torch.randn(tensors[name].shape, generator=generator).to(torch.bfloat16)
               for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight")}
    work = tmp_path_factory.mktemp("pruned-llama")
    (work / "run.blocks").mkdir()
    save_file(updates, str(work / "run.blocks" / "block-0001.safetensors"))
    blocks = [(0, 0.1, ""), (1, 0.1, "run.blocks/block-0001.safetensors"), (2, 0.1, "")]
    archive = write_archive(work / "run.h5", folder, masks, blocks)
    out = work / "export"
    report = export(archive, fmt="hf", out=out)
    return {"folder": folder, "original": tensors, "masks": masks, "updates": updates, "archive": archive,
            "out": out, "report": report}


def test_the_export_loads_with_its_own_class_in_its_stored_dtype_in_the_original_shards(pruned_llama):
    from transformers import LlamaForCausalLM

    out, folder = pruned_llama["out"], pruned_llama["folder"]
    model = LlamaForCausalLM.from_pretrained(out, local_files_only=True)
    assert model.dtype == torch.bfloat16
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    originals = sorted(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()))
    assert shards == [f"model-{i:05d}-of-{len(originals):05d}.safetensors" for i in range(1, len(originals) + 1)]
    assert set(index["weight_map"]) == set(pruned_llama["original"])
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (folder / name).read_bytes(), name
    assert not (out / "model.safetensors").exists()


def test_pruned_positions_are_zero_updates_are_the_blocks_and_the_rest_is_the_original_bit_for_bit(pruned_llama):
    written, original = folder_tensors(pruned_llama["out"]), pruned_llama["original"]
    masks, updates = pruned_llama["masks"], pruned_llama["updates"]
    assert set(written) == set(original)
    for name, tensor in written.items():
        assert tensor.dtype == original[name].dtype and tensor.shape == original[name].shape, name
        source = updates.get(name, original[name])
        if name in masks:
            assert torch.equal(bits(tensor[~masks[name]]), bits(torch.zeros_like(tensor[~masks[name]]))), name
            assert torch.equal(bits(tensor[masks[name]]), bits(source[masks[name]])), name
        else:
            assert torch.equal(bits(tensor), bits(source)), name


def test_the_exported_perplexity_is_the_in_memory_masked_models(pruned_llama, corpus_file):
    from transformers import LlamaForCausalLM

    windows = eval_windows(pruned_llama["folder"], str(corpus_file), 32)[:4]
    expected = LlamaForCausalLM.from_pretrained(pruned_llama["folder"], local_files_only=True).eval()
    with torch.no_grad():
        for name, parameter in expected.named_parameters():
            value = pruned_llama["updates"].get(name, parameter)
            mask = pruned_llama["masks"].get(name)
            parameter.copy_(value if mask is None else value.masked_fill(~mask, 0))
        exported = LlamaForCausalLM.from_pretrained(pruned_llama["out"], local_files_only=True).eval()
        losses = [model(input_ids=windows, labels=windows).loss for model in (expected, exported)]
    assert math.exp(losses[0]) == math.exp(losses[1])
    dense = LlamaForCausalLM.from_pretrained(pruned_llama["folder"], local_files_only=True).eval()
    with torch.no_grad():
        assert dense(input_ids=windows, labels=windows).loss != losses[1]  # the pruning did change the model


def test_the_export_is_measured_and_recorded(pruned_llama):
    report, original = pruned_llama["report"], pruned_llama["original"]
    pruned = sum(int((~mask).sum()) for mask in pruned_llama["masks"].values())
    assert report.format == "hf" and report.round == 1
    assert report.parameters == sum(tensor.numel() for tensor in original.values())
    assert report.nonzero_parameters <= report.parameters - pruned
    assert report.dense_bytes == sum(tensor.nbytes for tensor in original.values())
    assert report.details["updated_tensors"] == 2 and report.details["masked_tensors"] == 21
    assert math.isnan(report.flops) and "n/a" in report.render()
    with h5py.File(pruned_llama["archive"], "r") as file:
        recorded = file["exports/0001"].attrs
        assert recorded["format"] == "hf" and recorded["nonzero_parameters"] == report.nonzero_parameters


def test_a_tied_head_a_wrong_shape_and_a_missing_block_file_are_refused_and_nothing_is_written(llm_folder, tmp_path):
    folder = llm_folder("gpt2")  # ties lm_head.weight to the embeddings: the folder stores one of them
    tensors = folder_tensors(folder)
    # A mask of a tensor the folder lacks, or of another shape, does not match the archive's own plan
    # (its /model/params are the folder's tensors): the archive is refused before the folder is read.
    cases = {
        "which /model/params does not plan": {"lm_head.weight": torch.ones(len(tensors["transformer.wte.weight"]), 32,
                                                                            dtype=torch.bool)},
        "has shape 3x3, where /model/params plans": {"transformer.h.0.mlp.c_fc.weight": torch.ones(3, 3, dtype=torch.bool)},
    }
    for number, (fragment, masks) in enumerate(cases.items()):
        archive = write_archive(tmp_path / f"run{number}.h5", folder, masks)
        with pytest.raises(UsageError, match=fragment):
            export(archive, fmt="hf", out=tmp_path / f"out{number}")
        assert not (tmp_path / f"out{number}").exists()
    archive = write_archive(tmp_path / "blocks.h5", folder, random_masks(tensors, ["transformer.h.0.mlp.c_fc.weight"]),
                            [(0, 0.1, "blocks.blocks/block-0000.safetensors")])
    with pytest.raises(UsageError, match="block 0: weights file .* is missing"):
        export(archive, fmt="hf", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert "exports" not in h5py.File(archive, "r")


def test_cli_refusals_are_one_line_exit_2_and_leave_the_output_alone(llm_folder, tmp_path):
    folder = llm_folder("qwen2")
    moved = shutil.copytree(folder, tmp_path / "moved-away")
    archive = write_archive(tmp_path / "run.h5", moved, random_masks(folder_tensors(moved), ["model.layers.0.mlp.up_proj.weight"]))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    result = run_cli("export", str(archive), "--format", "hf", "--out", str(busy))
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "exists and is not empty; pass --force" in result.stderr and (busy / "keep.txt").read_text() == "mine"
    shutil.rmtree(moved)
    result = run_cli("export", str(archive), "--format", "hf", "--out", str(tmp_path / "new"))
    assert result.returncode == 2 and "has no config.json (moved or deleted?)" in result.stderr
    assert result.stderr.startswith("hpcprune: error:") and not (tmp_path / "new").exists()


def test_force_replaces_an_earlier_export_and_removes_its_stale_weights(llm_folder, tmp_path):
    folder = llm_folder("mistral")
    archive = write_archive(tmp_path / "run.h5", folder, random_masks(folder_tensors(folder), ["model.layers.2.mlp.down_proj.weight"]))
    out = tmp_path / "out"
    out.mkdir()
    save_file({"stale": torch.zeros(2)}, str(out / "model.safetensors"))  # transformers would load this first
    with pytest.raises(UsageError, match="--force"):
        export(archive, fmt="hf", out=out)
    with pytest.raises(UsageError, match="which this command reads"):
        export(archive, fmt="hf", out=folder, force=True)
    export(archive, fmt="hf", out=out, force=True)
    assert not (out / "model.safetensors").exists() and (out / "model-00001-of-00001.safetensors").is_file()
    with h5py.File(archive, "r") as file:
        assert file["exports/0001"].attrs["format"] == "hf" and "exports/0002" not in file  # the refusal recorded nothing


def test_a_bert_run_of_the_pipeline_exports_in_every_format_without_image_flops(llm_folder, corpus_file, tmp_path):
    from transformers import BertModel

    folder = llm_folder("bert")
    archive = tmp_path / "bert.h5"
    run(load_config(CONFIGS / "oneshot_global.yaml", [
        f"model.name=hf:{folder}", "pretrain.epochs=0", "finetune.epochs=0", "prune.sparsity=0.5",
        "prune.criterion=magnitude", f"calibration.text={corpus_file}", f"output.path={archive}", "progress=false"]),
        SingleWorld(), force=True)
    for fmt in ("masked", "sparse", "int8"):
        report = export(archive, fmt=fmt, out=tmp_path / f"bert.{fmt}.safetensors")
        assert math.isnan(report.flops) and math.isnan(report.accuracy) and report.nonzero_parameters < report.parameters
    export(archive, fmt="hf", out=tmp_path / "bert-hf")
    model = BertModel.from_pretrained(tmp_path / "bert-hf", local_files_only=True)
    state = load_state_file(tmp_path / "bert.h5.states" / "round-0001.safetensors")
    for name, tensor in model.state_dict().items():
        if name in state:
            assert torch.equal(bits(tensor), bits(state[name])), name
    with h5py.File(archive, "r") as file:
        assert [file[f"exports/{n:04d}"].attrs["format"] for n in range(1, 5)] == ["masked", "sparse", "int8", "hf"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool, torch.uint8])
def test_streamed_safetensors_read_back_with_safetensors_itself(tmp_path, dtype):
    generator = torch.Generator().manual_seed(0)
    tensors = {"a.weight": (torch.randn(5, 7, generator=generator) * 10).to(dtype), "b.scalar": torch.ones((), dtype=dtype),
               "c.empty": torch.zeros(0, 3, dtype=dtype), "d.odd": (torch.randn(3, generator=generator) * 10).to(dtype)}
    specs = [TensorSpec(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in tensors.items()]
    write_streamed(tmp_path / "x.safetensors", specs, lambda spec: tensors[spec.name], {"format": "pt"})
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as file:
        assert file.metadata() == {"format": "pt"} and set(file.keys()) == set(tensors)
        for name, tensor in tensors.items():
            assert torch.equal(bits(file.get_tensor(name)), bits(tensor)) and file.get_tensor(name).dtype == dtype
    with pytest.raises(ValueError, match="the header says"):
        write_streamed(tmp_path / "y.safetensors", specs, lambda spec: tensors[spec.name].double(), {})
    assert not (tmp_path / "y.safetensors").exists()
