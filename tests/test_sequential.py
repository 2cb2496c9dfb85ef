"""The block-sequential pipeline in one process: exact sparsity per row/layer/N:M, what the archive
records, the perplexity it reports, one block in memory at a time, spilling, propagation, refusals.

    python -m pytest -q tests/test_sequential.py

The models are tiny random LLaMA, OPT and BERT folders written by tests/tiny_llm.py (no download).
"""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hpcprune.archive.blocks import round_tables
from hpcprune.config import load_config
from hpcprune.dist.world import SingleWorld
from hpcprune.errors import UsageError
from hpcprune.models.lazy import LazyModel
from hpcprune.models.skeleton import build_skeleton, find_blocks
from hpcprune.models.text_windows import eval_windows
from hpcprune.prune.plan import TensorSpec
from hpcprune.prune.selection import prune_count
from hpcprune.prune.sequential import activations
from hpcprune.prune.sequential.layers import BlockLayer
from hpcprune.prune.sequential.methods import METHODS, LayerRule
from hpcprune.prune.sequential.pieces import block_pieces
from hpcprune.prune.sparsegpt import ROW_TILE
from hpcprune.read.diff import diff
from hpcprune.read.report import write_report
from hpcprune.read.summary import render_summary, summary
from hpcprune.run.pipeline import run
from tests.helpers import CONFIGS, archive_masks, assert_same_masks, run_cli
from tests.tiny_llm import sequential_overrides

LLAMA_LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def prune_folder(folder, folders, out, *more):
    return run(load_config(None, sequential_overrides(folder, folders, out, *more)), SingleWorld(), force=True)


def bool_masks(path, shapes):
    return {name: torch.from_numpy(np.unpackbits(packed, count=math.prod(shapes[name])).astype(bool)).view(shapes[name])
            for name, packed in archive_masks(path, 1).items()}


def shapes_of(path):
    with h5py.File(path, "r") as archive:
        return {row["name"].decode(): tuple(int(size) for size in row["shape"].decode().split("x"))
                for row in archive["model/params"][()]}


def perplexity_of(model, windows: torch.Tensor) -> float:
    """A whole transformers model's perplexity over the windows, computed here independently."""
    with torch.no_grad():
        nll = sum(float(torch.nn.functional.cross_entropy(model(window[None]).logits[0, :-1].double(), window[1:],
                                                          reduction="sum")) for window in windows)
    return math.exp(nll / (windows.numel() - len(windows)))


def test_wanda_prunes_every_row_exactly_and_the_round_records_each_block(tiny_folders, tmp_path):
    out = tmp_path / "wanda.h5"
    result = prune_folder(tiny_folders.llama, tiny_folders, out)
    names = [f"model.layers.{block}.{layer}.weight" for block in range(3) for layer in LLAMA_LAYERS]
    masks = bool_masks(out, shapes_of(out))
    assert list(masks) == names  # state-dict names, plan order; embeddings, norms and head untouched
    for name, keep in masks.items():
        assert (keep.sum(dim=1) == keep.shape[1] - prune_count(0.5, keep.shape[1])).all(), name
    assert result.kept == sum(int(keep.sum()) for keep in masks.values()) and result.achieved_sparsity == 0.5
    tables = round_tables(out, 1)
    assert [row["block"] for row in tables["blocks"]] == [0, 1, 2]
    assert all(row["weights_file"] == "" for row in tables["blocks"])  # Wanda changes no weight: no shard
    assert [row["name"] for row in tables["reconstruction"]] == names
    assert all(0 < row["error"] < 1 for row in tables["reconstruction"])
    with h5py.File(out, "r") as archive:
        attrs = dict(archive["rounds/0001"].attrs)
        assert "model.embed_tokens.weight" in [row["name"].decode() for row in archive["model/params"][()]]
    assert attrs["status"] == "complete" and attrs["eval_metric"] == "perplexity" and math.isnan(attrs["threshold"])
    assert attrs["eval_dense"] == result.eval_dense and attrs["eval_pruned"] == result.eval_pruned
    assert 100 < result.eval_dense < 1000 and result.eval_pruned != result.eval_dense  # random: ~ the 384-token vocabulary
    assert not (tmp_path / "wanda.h5.states" / "activations").exists()

    facts = summary(out)  # what `hpcprune inspect` shows of it
    assert facts["sequential"]["eval"] == {"metric": "perplexity", "dense": result.eval_dense, "pruned": result.eval_pruned}
    assert [(block["block"], block["layers"], block["sparsity"]) for block in facts["sequential"]["blocks"]] == \
        [(0, 7, 0.5), (1, 7, 0.5), (2, 7, 0.5)]
    assert [layer["error"] for layer in facts["layers"]] == [row["error"] for row in tables["reconstruction"]]
    assert "reconstruction error" in render_summary(facts) and "eval      perplexity: dense" in render_summary(facts)


def test_the_recorded_perplexities_are_those_of_the_whole_model_dense_and_masked(tiny_folders, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "wanda.h5"
    result = prune_folder(tiny_folders.llama, tiny_folders, out)
    windows = eval_windows(str(tiny_folders.llama), str(tiny_folders.evaluation), 24)
    model = AutoModelForCausalLM.from_pretrained(tiny_folders.llama).float().eval()

    assert perplexity_of(model, windows) == pytest.approx(result.eval_dense, rel=1e-12)
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, keep in bool_masks(out, shapes_of(out)).items():
            parameters[name].masked_fill_(~keep, 0.0)
    assert perplexity_of(model, windows) == pytest.approx(result.eval_pruned, rel=1e-12)


def test_the_exported_folder_loads_with_transformers_and_gives_the_recorded_perplexity(tiny_folders, tmp_path):
    from transformers import AutoModelForCausalLM

    from hpcprune.deploy.export import export

    result = prune_folder(tiny_folders.llama, tiny_folders, tmp_path / "wanda.h5")
    export(tmp_path / "wanda.h5", fmt="hf", out=tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    windows = eval_windows(str(tmp_path / "hf"), str(tiny_folders.evaluation), 24)
    assert perplexity_of(model, windows) == pytest.approx(result.eval_pruned, rel=1e-12)
    masks = bool_masks(tmp_path / "wanda.h5", shapes_of(tmp_path / "wanda.h5"))
    parameters = dict(model.named_parameters())
    assert all(torch.count_nonzero(parameters[name][~keep]) == 0 for name, keep in masks.items())


@pytest.mark.parametrize("rule, more", [("layer", ["prune.rule=layer", "prune.sparsity=0.7"]),
                                        ("nm", ["prune.rule=nm", "prune.n=2", "prune.m=4", "prune.sparsity=0.5"])])
def test_layer_and_nm_rules_keep_exactly_what_they_promise(tiny_folders, tmp_path, rule, more):
    out = tmp_path / f"{rule}.h5"
    prune_folder(tiny_folders.llama, tiny_folders, out, *more)
    for name, keep in bool_masks(out, shapes_of(out)).items():
        if rule == "layer":
            assert int(keep.sum()) == keep.numel() - prune_count(0.7, keep.numel()), name
        else:
            assert (keep.reshape(keep.shape[0], -1, 4).sum(dim=2) == 2).all(), name


def test_wanda_reconstructs_the_layers_better_than_magnitude(tiny_folders, tmp_path):
    """The tiny LLaMA has a few loud input channels (tests/tiny_llm.py): Wanda keeps their weights."""
    errors = {}
    for criterion in ("wanda", "magnitude"):
        out = tmp_path / f"{criterion}.h5"
        prune_folder(tiny_folders.llama, tiny_folders, out, f"prune.criterion={criterion}", "prune.rule=row")
        errors[criterion] = np.array([row["error"] for row in round_tables(out, 1)["reconstruction"]])
    assert errors["wanda"].mean() < 0.5 * errors["magnitude"].mean()
    assert (errors["wanda"] < errors["magnitude"]).mean() > 0.8

    # `hpcprune inspect diff` and `hpcprune report` read the block-sequential archives like any other
    compared = diff(tmp_path / "wanda.h5", tmp_path / "magnitude.h5")
    assert [t["name"] for t in compared["tensors"]] == [row["name"] for row in round_tables(out, 1)["metrics"]]
    assert not compared["identical"] and 0 < compared["jaccard"] < 1
    write_report(tmp_path / "wanda.h5", tmp_path / "wanda.html")
    assert "perplexity" in (tmp_path / "wanda.html").read_text()


def test_sparsegpt_reconstructs_the_layers_better_than_wanda(tiny_folders, tmp_path):
    """Same masks' freedom, plus the OBS update of the kept weights: a smaller error in every layer."""
    errors = {}
    for criterion in ("sparsegpt", "wanda"):
        out = tmp_path / f"{criterion}.h5"
        prune_folder(tiny_folders.llama, tiny_folders, out, f"prune.criterion={criterion}")
        errors[criterion] = np.array([row["error"] for row in round_tables(out, 1)["reconstruction"]])
    assert errors["sparsegpt"].mean() < 0.7 * errors["wanda"].mean()
    assert (errors["sparsegpt"] < errors["wanda"]).all(), errors


def test_errors_from_the_hessian_and_from_gram_matrices_are_those_of_the_products(tiny_folders, tmp_path, monkeypatch):
    """SparseGPT's q, k and v take their errors from the dense pass's Hessian (their input is the
    block's first, the same pruned), o, gate, up and down from their inputs' float32 Gram matrices
    in the pruned pass (in this model down reads 64 features for 32 outputs, enough; SmolLM2's down,
    1536 for 576, goes through its product): the recorded errors are those of every layer by its product."""
    from hpcprune.prune.sequential import engine, input_statistics, reconstruction

    measured = []

    class Watched(reconstruction.ReconstructionErrors):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            measured.append((set(self.known), set(self.by_gram)))

    monkeypatch.setattr(engine, "ReconstructionErrors", Watched)
    prune_folder(tiny_folders.llama, tiny_folders, tmp_path / "ways.h5", "prune.criterion=sparsegpt")
    ways = {row["name"]: row["error"] for row in round_tables(tmp_path / "ways.h5", 1)["reconstruction"]}
    known, by_gram = measured[0]
    assert {name.rsplit(".", 1)[0].split(".", 3)[-1] for name in known} == {"self_attn.q_proj", "self_attn.k_proj",
                                                                            "self_attn.v_proj"}
    assert {name.rsplit(".", 1)[0].split(".", 3)[-1] for name in by_gram} == {"self_attn.o_proj", "mlp.gate_proj",
                                                                              "mlp.up_proj", "mlp.down_proj"}

    agree = input_statistics.agree_on_leaders
    monkeypatch.setattr(input_statistics, "agree_on_leaders", lambda *args: (agree(*args)[0], None))
    monkeypatch.setattr(reconstruction, "GRAM_WIDTH", 10**9)
    measured.clear()
    prune_folder(tiny_folders.llama, tiny_folders, tmp_path / "products.h5", "prune.criterion=sparsegpt")
    assert measured[0][0] == set() and measured[0][1] == set()
    products = {row["name"]: row["error"] for row in round_tables(tmp_path / "products.h5", 1)["reconstruction"]}
    assert ways.keys() == products.keys()
    for name, error in products.items():
        assert 0 < error < 1 and ways[name] == pytest.approx(error, rel=1e-5), name


@pytest.mark.parametrize("propagate, pruned_passes", [("pruned", 1), ("dense", 0)])
def test_without_errors_the_masks_and_weights_are_the_same_and_nothing_is_measured(tiny_folders, tmp_path,
                                                                                   monkeypatch, propagate,
                                                                                   pruned_passes):
    """sequential.errors false: NaN errors, no measuring hooks, the pruned block run only to feed the
    next block (not at all under propagate dense), and the masks and SparseGPT's weights unchanged."""
    from safetensors.torch import load_file

    from hpcprune.prune.sequential import engine

    passes, run_windows = [], engine.run_windows

    def counted(stream, *args, scope=None):
        passes.append((stream, scope))
        return run_windows(stream, *args, scope=scope)

    monkeypatch.setattr(engine, "run_windows", counted)
    runs = {}
    for errors in ("true", "false"):
        passes.clear()
        out = tmp_path / f"errors-{errors}.h5"
        prune_folder(tiny_folders.llama, tiny_folders, out, "prune.criterion=sparsegpt",
                     f"sequential.propagate={propagate}", f"sequential.errors={errors}")
        calibration = next(stream for stream, scope in passes if scope is not None)  # the dense pass's windows
        runs[errors] = out, [scope for stream, scope in passes if stream is calibration]
    (measured, measuring), (skipped, skipping) = runs["true"], runs["false"]
    blocks = len(round_tables(skipped, 1)["blocks"])
    assert sum(isinstance(scope, engine.ReconstructionErrors) for scope in measuring) == blocks
    assert not any(isinstance(scope, engine.ReconstructionErrors) for scope in skipping)
    assert len(skipping) == blocks * (1 + pruned_passes)  # the dense pass, and the pruned one where it feeds on
    assert all(math.isnan(row["error"]) for row in round_tables(skipped, 1)["reconstruction"])
    assert all(0 < row["error"] < 1 for row in round_tables(measured, 1)["reconstruction"])
    assert_same_masks(skipped, measured)
    for shard in sorted((Path(f"{measured}.states") / "blocks").glob("block-*.safetensors")):
        theirs = load_file(Path(f"{skipped}.states") / "blocks" / shard.name)
        assert all(torch.equal(tensor, theirs[name]) for name, tensor in load_file(shard).items()), shard.name


def test_sparsegpt_exports_its_updated_weights_to_a_folder_transformers_loads(tiny_folders, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from hpcprune.deploy.export import export

    out = tmp_path / "sparsegpt.h5"
    result = prune_folder(tiny_folders.llama, tiny_folders, out, "prune.criterion=sparsegpt", "prune.rule=nm")
    export(out, fmt="hf", out=tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    dense = dict(AutoModelForCausalLM.from_pretrained(tiny_folders.llama, dtype=torch.float32).named_parameters())
    parameters = dict(model.named_parameters())
    shards = sorted((tmp_path / "sparsegpt.h5.states" / "blocks").glob("block-*.safetensors"))
    updated = {name: tensor for shard in shards for name, tensor in load_file(shard).items()}
    masks = bool_masks(out, shapes_of(out))
    assert len(shards) == 3 and set(updated) == set(masks)
    for name, keep in masks.items():
        assert torch.equal(parameters[name], updated[name] * keep), name  # the solve's weights, exact zeros
        assert (keep.reshape(keep.shape[0], -1, 4).sum(dim=2) == 2).all(), name
        assert not torch.equal(parameters[name][keep], dense[name][keep]), name  # the kept weights moved
    windows = eval_windows(str(tmp_path / "hf"), str(tiny_folders.evaluation), 24)
    assert perplexity_of(model, windows) == pytest.approx(result.eval_pruned, rel=1e-12)


SMOLLM2_LAYERS = dict(zip(LLAMA_LAYERS, [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576),
                                         (576, 1536)]))


def smollm2_block_layers() -> list[BlockLayer]:
    return [BlockLayer(TensorSpec(position, f"model.layers.0.{name}.weight", shape),
                       torch.nn.Linear(shape[1], shape[0], bias=False, device="meta"))
            for position, (name, shape) in enumerate(SMOLLM2_LAYERS.items())]


def test_a_blocks_solves_go_costliest_first_and_rows_are_cut_only_for_more_ranks_than_layers():
    layers, sparsegpt = smollm2_block_layers(), METHODS["sparsegpt"]()
    row = LayerRule("row", 0.5)
    two = block_pieces(layers, 2, sparsegpt, row)
    assert [piece.rows for piece, _ in two] == [None] * 7
    loads = [sum(sparsegpt.cost(piece.spec(0)) for piece, owner in two if owner == rank) for rank in (0, 1)]
    assert max(loads) < 1.1 * min(loads)  # down_proj alone weighs a third of the block
    assert dict((piece.key, owner) for piece, owner in two)["model.layers.0.mlp.down_proj.weight"] == 0  # costliest first
    nine = block_pieces(layers, 9, sparsegpt, row)
    assert len(nine) == 9 and sorted({owner for _, owner in nine}) == list(range(9))
    for layer in layers:  # the cuts of a layer cover its rows in order, on tile boundaries
        cuts = [piece.rows for piece, _ in nine if piece.layer is layer]
        if cuts != [None]:
            assert cuts[0][0] == 0 and cuts[-1][1] == layer.spec.shape[0]
            assert all(end == start and start % ROW_TILE == 0 for (_, end), (start, _) in zip(cuts, cuts[1:]))
    assert [piece.rows for piece, _ in block_pieces(layers, 9, sparsegpt, LayerRule("layer", 0.5))] == [None] * 7
    assert [piece.rows for piece, _ in block_pieces(layers, 9, METHODS["wanda"](), row)] == [None] * 7
    wide = [BlockLayer(TensorSpec(position, f"model.layers.0.mlp.{name}.weight", (288, 32)),
                       torch.nn.Linear(32, 288, bias=False, device="meta")) for position, name in enumerate(("gate", "up"))]
    three = block_pieces(wide, 3, sparsegpt, row)  # tests/test_sequential_ranks.py's wide case under mpirun -n 3
    assert [(piece.key, owner) for piece, owner in three] == [
        ("model.layers.0.mlp.gate.weight[0:128]", 2), ("model.layers.0.mlp.gate.weight[128:288]", 1),
        ("model.layers.0.mlp.up.weight", 0)]  # the whole layer costs most: rank 0, then the larger range


def test_only_one_block_is_in_memory_at_a_time(tiny_folders, tmp_path, monkeypatch):
    seen = []
    load = LazyModel.load_block

    def watched(self, index):
        assert self.materialised() == [], f"before block {index}: {self.materialised()} still loaded"
        block = load(self, index)
        seen.append((index, sorted(self.materialised())))
        return block

    monkeypatch.setattr(LazyModel, "load_block", watched)
    prune_folder(tiny_folders.llama, tiny_folders, tmp_path / "run.h5")
    assert [index for index, _ in seen] == [0, 1, 2]
    for index, names in seen:
        assert names and all(name.startswith(f"model.layers.{index}.") for name in names), names


def test_blocks_run_one_by_one_give_the_whole_models_outputs_bit_for_bit(tiny_folders):
    """Sharded and single-file, fp32 and bf16, a tied head, LLaMA, Gemma, OPT and BERT: the lazy path is the model."""
    from transformers import AutoModel, AutoModelForCausalLM

    from hpcprune.models.block_calls import (
        BlockRunner,
        capture_first_call,
        model_outputs,
    )

    ids = torch.tensor([[5, 9, 7, 12, 30, 4, 18, 22, 6, 11]])
    for folder in (tiny_folders.llama, tiny_folders.gemma_tied, tiny_folders.opt, tiny_folders.bert):
        lazy = LazyModel(f"hf:{folder}", None, torch.device("cpu"))
        inputs = {"input_ids": ids} if lazy.causal else {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        with lazy.outer_modules_on_call():
            hidden, call = capture_first_call(lazy.model, lazy.blocks, inputs)
        runner = BlockRunner(torch.device("cpu"))
        for index in range(len(lazy)):
            hidden = runner(lazy.load_block(index), hidden, call)
            lazy.release_block(index)
        with lazy.outer_modules_on_call():
            ours = model_outputs(lazy.model, lazy.blocks, inputs, hidden, runner.as_tuple)
        assert lazy.materialised() == []
        # In float32 as the pipeline computes: a bf16 build would round buffers such as Gemma's embedding scale.
        whole = (AutoModelForCausalLM if lazy.causal else AutoModel).from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            theirs = whole(**inputs)
        field = "logits" if lazy.causal else "last_hidden_state"
        assert torch.equal(getattr(ours, field), getattr(theirs, field)), folder


def test_activations_spilled_to_disk_give_the_same_masks_and_are_cleaned_up(tiny_folders, tmp_path, monkeypatch):
    folders = []
    store = activations.WindowStore.__init__

    def noted(self, folder=None):
        folders.append(folder)
        store(self, folder)

    monkeypatch.setattr(activations.WindowStore, "__init__", noted)
    prune_folder(tiny_folders.llama, tiny_folders, tmp_path / "memory.h5")
    assert folders and all(folder is None for folder in folders)
    folders.clear()
    prune_folder(tiny_folders.llama, tiny_folders, tmp_path / "spilled.h5", "sequential.activation_budget_mb=0.01")
    assert folders and all(folder is not None and "spilled.h5.states/activations/rank-0" in str(folder) for folder in folders)
    assert_same_masks(tmp_path / "spilled.h5", tmp_path / "memory.h5")
    assert not (tmp_path / "spilled.h5.states" / "activations" / "rank-0").exists()


def test_dense_propagation_calibrates_later_blocks_on_the_dense_activations(tiny_folders, tmp_path):
    prune_folder(tiny_folders.llama, tiny_folders, tmp_path / "pruned.h5")
    prune_folder(tiny_folders.llama, tiny_folders, tmp_path / "dense.h5", "sequential.propagate=dense")
    pruned, dense = archive_masks(tmp_path / "pruned.h5", 1), archive_masks(tmp_path / "dense.h5", 1)
    differ = {name for name in pruned if not np.array_equal(pruned[name], dense[name])}
    assert differ and not any(name.startswith("model.layers.0.") for name in differ)  # block 0 sees the same inputs


def test_encoders_and_opt_run_too(tiny_folders, tmp_path):
    bert = prune_folder(tiny_folders.bert, tiny_folders, tmp_path / "bert.h5")
    assert bert.eval_metric == "cosine" and bert.eval_dense == 1.0 and 0.5 < bert.eval_pruned < 1.0
    masks = bool_masks(tmp_path / "bert.h5", shapes_of(tmp_path / "bert.h5"))
    assert len(masks) == 12 and all(name.startswith("encoder.layer.") for name in masks)
    opt = prune_folder(tiny_folders.opt, tiny_folders, tmp_path / "opt.h5", "prune.rule=layer")
    assert opt.eval_metric == "perplexity" and opt.achieved_sparsity == 0.5


def test_magnitude_needs_no_text_and_a_finished_run_resumes_to_its_figures(tiny_folders, tmp_path):
    out = tmp_path / "magnitude.h5"
    overrides = sequential_overrides(tiny_folders.llama, tiny_folders, out, "prune.criterion=magnitude",
                                     "prune.rule=row", "calibration.text=null", "eval.text=null")
    first = run(load_config(None, overrides), SingleWorld(), force=True)
    assert math.isnan(first.eval_dense) and all(math.isnan(row["error"]) for row in round_tables(out, 1)["reconstruction"])
    before = out.read_bytes()
    again = run(load_config(None, overrides), SingleWorld(), resume=True)
    assert again.kept == first.kept and again.achieved_sparsity == 0.5
    with h5py.File(out, "r") as archive:  # only a resume event was added
        assert [row["kind"].decode() for row in archive["events"][()]] == ["start", "finish", "resume"]
    assert len(out.read_bytes()) >= len(before)


@pytest.mark.parametrize("override, message", [
    ("model.name=lenet5", "model.name must be hf:<folder>"),
    ("finetune.epochs=1", "prunes without training"),
    ("fanout.backend=inline", "runs in this job's own ranks"),
    ("prune.rule=global", "prune.rule must be one of row, layer, nm"),
    ("prune.criterion=taylor", "is not one of its criteria"),
    ("calibration.text=null", "reads calibration windows"),
    ("prune.criterion=sparsegpt;calibration.text=null", "reads calibration windows"),
    ("prune.criterion=sparsegpt;sparsegpt.damping=-0.1", "sparsegpt.damping"),
    ("prune.criterion=sparsegpt;sparsegpt.block_size=0", "sparsegpt.block_size"),
    ("prune.criterion=sparsegpt;prune.rule=nm;prune.n=2;prune.m=4;sparsegpt.block_size=6",
     "sparsegpt.block_size 6 must be a multiple of prune.m 4"),
])
def test_what_the_sequential_schedule_cannot_do_is_refused_by_the_config(tiny_folders, tmp_path, override, message):
    with pytest.raises(UsageError, match=message):
        load_config(None, sequential_overrides(tiny_folders.llama, tiny_folders, tmp_path / "x.h5", *override.split(";")))


def test_refusals_found_at_run_time_name_the_key(tiny_folders, tmp_path):
    with pytest.raises(UsageError, match="not a multiple of prune.m=3"):
        prune_folder(tiny_folders.llama, tiny_folders, tmp_path / "a.h5", "prune.rule=nm", "prune.n=1", "prune.m=3",
                     "prune.sparsity=0.6666666666666667")
    with pytest.raises(UsageError, match="model.blocks 'model.norm'"):
        prune_folder(tiny_folders.llama, tiny_folders, tmp_path / "b.h5", "model.blocks=model.norm")
    assert not (tmp_path / "a.h5").exists() and not (tmp_path / "b.h5").exists()  # refused before the archive


def test_blocks_without_linear_layers_are_refused_by_name():
    from torch import nn

    from hpcprune.config import PruneConfig
    from hpcprune.prune.sequential.layers import sequential_plan

    blocks = nn.ModuleList([nn.Sequential(nn.LayerNorm(4), nn.GELU()) for _ in range(2)])
    with pytest.raises(UsageError, match=r"the blocks model\.layers hold no nn\.Linear \(or GPT-2 Conv1D\) layer"):
        sequential_plan(blocks, "model.layers", PruneConfig())


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_gpt2s_conv1d_layers_are_pruned_in_their_stored_orientation(tiny_folders, llm_folder, tmp_path, criterion):
    """GPT-2's Conv1D stores its weight in x out: each output row (a stored column) keeps exactly half,
    the recorded masks have the stored shapes, and the exported folder loads with its zeros in place."""
    from transformers import AutoModelForCausalLM

    folder, out = llm_folder("gpt2", layers=2), tmp_path / "gpt2.h5"
    prune_folder(folder, tiny_folders, out, f"prune.criterion={criterion}")
    shapes = {name: shape for name, shape in shapes_of(out).items() if name in archive_masks(out, 1)}
    assert len(shapes) == 2 * 4 and all(".attn.c_attn." in name or ".c_proj." in name or ".c_fc." in name for name in shapes)
    masks = bool_masks(out, shapes)
    for name, mask in masks.items():
        assert mask.shape == shapes[name]  # in x out, as GPT-2 stores it
        assert (mask.sum(dim=0) == mask.shape[0] // 2).all(), name  # half of each output's inputs
    assert all(0 < row["error"] < 1 for row in round_tables(out, 1)["reconstruction"])
    exported = tmp_path / "gpt2-hf"
    assert run_cli("export", str(out), "--format", "hf", "--out", str(exported)).returncode == 0
    state = AutoModelForCausalLM.from_pretrained(exported).state_dict()
    for name, mask in masks.items():
        assert (state[name][~mask] == 0).all() and (state[name][mask] != 0).float().mean() > 0.99, name


def test_ambiguous_blocks_are_named_and_model_blocks_chooses(tmp_path):
    from transformers import BartConfig, BartModel

    config = BartConfig(vocab_size=40, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32)
    BartModel(config).save_pretrained(tmp_path)
    skeleton = build_skeleton(f"hf:{tmp_path}")
    with pytest.raises(UsageError, match=r"ambiguous: (encoder|decoder)\.layers .*, (encoder|decoder)\.layers .*model\.blocks"):
        find_blocks(skeleton, None, "hf:bart")
    assert find_blocks(skeleton, "decoder.layers", "hf:bart")[0] == "decoder.layers"


def test_the_documented_config_runs_end_to_end_and_the_cli_refuses_in_one_line(tiny_folders, tmp_path):
    out = tmp_path / "llm.h5"
    finished = run_cli("prune", "--config", str(CONFIGS / "llm_wanda.yaml"), "--out", str(out), "-q",
                       "--set", f"model.name=hf:{tiny_folders.llama}", "--set", f"calibration.text={tiny_folders.calibration}",
                       "--set", "calibration.samples=4", "--set", "calibration.sequence_length=16",
                       "--set", f"eval.text={tiny_folders.evaluation}", "--set", "eval.sequence_length=32")
    assert finished.returncode == 0, finished.stderr
    lines = finished.stdout.splitlines()
    assert lines[0] == f"archive {out}" and lines[1].startswith("dense perplexity ") and lines[2].startswith("pruned perplexity ")
    assert "sparsity             50.0000 % achieved, 50.0000 % asked" in finished.stdout
    refused = run_cli("prune", "--config", str(CONFIGS / "llm_wanda.yaml"), "--out", str(tmp_path / "no.h5"),
                      "--set", "model.name=lenet5")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert refused.stderr.startswith("hpcprune: error: ") and "model.name must be hf:<folder>" in refused.stderr
