"""hpcprune export: compact equals masked, sparse round-trips bit for bit, int8 reports its accuracy, refusals.

    python -m pytest -q tests/test_export.py

The archives come from real (seconds-long) runs of the pipeline on synthetic data: structured runs
of LeNet-300-100, LeNet-5 and ResNet-8 for compaction, an unstructured LeNet-300-100 run for the
sparse and int8 formats, and a masks-only run on a safetensors checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math

import h5py
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from hpcprune.cli import main
from hpcprune.config import ModelConfig, load_config
from hpcprune.deploy.compact import compact_model, compaction_groups
from hpcprune.deploy.export import count_flops, export, load_exported
from hpcprune.deploy.quantize import int8_parameters, quantize_int8
from hpcprune.deploy.sparse import PARTS, decode_sparse, encode_sparse
from hpcprune.dist.world import SingleWorld
from hpcprune.models.builders import build_model
from hpcprune.run.pipeline import run
from tests.helpers import run_cli

QUICK = ["device=cpu", "progress=false", "data.dataset=synthetic", "data.synthetic_size=256",
         "data.validation_size=64", "data.batch_size=64", "data.eval_batch_size=256", "pretrain.epochs=0",
         "finetune.epochs=1", "finetune.optimizer.name=adam", "finetune.optimizer.lr=0.001"]
STRUCTURED = ["prune.granularity=channel", "prune.criterion=l1", "prune.sparsity=0.5"]


def prune_run(folder, *overrides: str):
    out = folder / "run.h5"
    result = run(load_config(None, [*QUICK, *overrides, f"output.path={out}"]), SingleWorld())
    return out, result


@pytest.fixture(scope="module")
def unstructured(tmp_path_factory):
    """LeNet-300-100 at 90 % unstructured sparsity."""
    return prune_run(tmp_path_factory.mktemp("unstructured"), "model.name=lenet300", "prune.sparsity=0.9")[0]


@pytest.fixture(scope="module", params=["lenet300", "lenet5", "resnet8"])
def structured(request, tmp_path_factory):
    """Half of the channels (neurons) of each built-in model pruned, then one epoch of fine-tuning."""
    return prune_run(tmp_path_factory.mktemp(request.param), f"model.name={request.param}", *STRUCTURED)[0]


def cli(capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    """The real `hpcprune` entry point in this process (exit status, stdout, stderr): no torch import per call."""
    monkeypatch.setattr("sys.argv", ["hpcprune", *args])
    with pytest.raises(SystemExit) as stopped:
        main()
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return stopped.value.code, out, err


def exports_of(archive) -> list[dict]:
    with h5py.File(archive, "r") as file:
        return [dict(group.attrs) for group in file.get("exports", {}).values()]


def bits(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


# --- compact ---------------------------------------------------------------------------------


def test_compacted_model_computes_the_masked_one(structured, tmp_path):
    export(structured, fmt="masked", out=tmp_path / "masked.safetensors")
    report = export(structured, fmt="compact", out=tmp_path / "compact.safetensors")
    masked, compact = (load_exported(tmp_path / f"{name}.safetensors").model for name in ("masked", "compact"))

    inputs = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(compact(inputs), masked(inputs), rtol=1e-4, atol=1e-5)

    # It is physically smaller: every group keeps exactly the channels the mask keeps, and the
    # parameters that remain are the nonzero ones of the masked model (plus none that are zero).
    masked_parameters = sum(p.numel() for p in masked.parameters())
    compact_parameters = sum(p.numel() for p in compact.parameters())
    assert compact_parameters < 0.75 * masked_parameters
    nonzero_masked = sum(int(p.count_nonzero()) for p in masked.parameters())
    assert compact_parameters >= nonzero_masked  # nothing alive was dropped
    assert report.parameters == compact_parameters and report.flops < count_flops(masked, (1, 28, 28))[0]
    for group in report.details["channels"]:
        rows = dict(masked.named_parameters())[f"{group['group']}.weight"]
        assert group["kept"] == int((rows.reshape(rows.shape[0], -1) != 0).any(dim=1).sum())
    assert report.accuracy == pytest.approx(report.recorded_accuracy, abs=1.5 / 64)  # same predictions, up to float ties


class ConvBnHead(torch.nn.Module):
    def __init__(self, affine: bool):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, bias=False)
        self.norm = torch.nn.BatchNorm2d(4, affine=affine)
        self.head = torch.nn.Linear(4 * 6 * 6, 2)

    def forward(self, x):
        return self.head(torch.flatten(torch.relu(self.norm(self.conv(x))), 1))


@pytest.mark.parametrize("affine", [True, False])
def test_only_silent_channels_are_cut(affine):
    """A channel goes only when it carries exactly 0.0: without a BatchNorm affine it carries -mean/std."""
    model = ConvBnHead(affine).eval()
    with torch.no_grad():
        model.norm.running_mean.uniform_(0.5, 1.0)
        model.conv.weight[1:3] = 0.0
        if affine:
            model.norm.weight[1:3] = 0.0
            model.norm.bias[1:3] = 0.0
    inputs = torch.randn(3, 1, 8, 8)
    expected = model(inputs)
    compaction = compact_model(model, compaction_groups(model))
    assert compaction.channels == [("conv", 2 if affine else 4, 4)]
    assert model.head.in_features == (2 if affine else 4) * 36 and tuple(model.norm.running_var.shape) == ((2,) if affine else (4,))
    torch.testing.assert_close(model(inputs), expected)


def test_int8_of_the_compacted_model(structured, tmp_path):
    report = export(structured, fmt="int8", out=tmp_path / "int8.safetensors", int8_base="compact")
    compact = export(structured, fmt="compact", out=tmp_path / "compact.safetensors")
    assert report.bytes < compact.bytes
    assert 0.0 <= report.accuracy <= 1.0 and report.details["base"] == "compact"


# --- sparse ----------------------------------------------------------------------------------


def test_sparse_encodings_round_trip_bit_for_bit():
    generator = torch.Generator().manual_seed(0)
    state, masks = {}, {}
    for name, shape, density in [("dense_ish", (64, 64), 0.99), ("half", (32, 3, 5, 5), 0.5),
                                 ("sparse", (40, 900), 0.01), ("empty", (8, 8), 0.0), ("wide", (2, 40000), 0.02)]:
        mask = torch.rand(shape, generator=generator) < density
        tensor = torch.randn(shape, generator=generator).masked_fill(~mask, 0.0)
        tensor[mask & (torch.rand(shape, generator=generator) < 0.1)] = -0.0  # kept zeros, with their sign
        state[name], masks[name] = tensor, mask
    state["bias"] = torch.randn(7, generator=generator)
    tensors, metadata = encode_sparse(state, masks)
    decoded = decode_sparse(tensors, metadata)
    assert list(decoded) == list(state)
    for name in state:
        assert decoded[name].dtype == state[name].dtype and bits(decoded[name]) == bits(state[name]), name
    encodings = {name: entry for name, entry in json.loads(metadata["hpcprune.sparse"]).items()}
    assert {entry["encoding"] for entry in encodings.values()} == {"dense", "bitmask", "csr"}
    # bitmask costs 1/32 of dense float32 plus the kept values: dense wins above 31/32 density
    assert encodings["dense_ish"]["encoding"] == "dense" and encodings["sparse"]["encoding"] == "csr"
    assert tensors["wide::col"].dtype == torch.int32  # 40000 columns do not fit int16


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 40), columns=st.integers(1, 70), density=st.floats(0.0, 1.0), seed=st.integers(0, 2**31),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
def test_any_mask_round_trips_in_every_encoding(rows, columns, density, seed, dtype):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, columns, generator=generator) < density
    tensor = torch.randn(rows, columns, generator=generator).to(dtype).masked_fill(~mask, 0.0)
    for encoding in PARTS:  # each encoding on its own, not only the one that wins on size
        tensors, metadata = encode_sparse({"w": tensor}, {"w": mask}, only=encoding)
        assert set(tensors) == {f"w::{part}" for part in PARTS[encoding]}
        decoded = decode_sparse(tensors, metadata)["w"]
        assert decoded.dtype == dtype and bits(decoded) == bits(tensor), encoding


def test_sparse_export_restores_the_masked_state_exactly(unstructured, tmp_path):
    masked = export(unstructured, fmt="masked", out=tmp_path / "masked.safetensors")
    sparse = export(unstructured, fmt="sparse", out=tmp_path / "sparse.safetensors")
    restored, reference = load_exported(tmp_path / "sparse.safetensors"), load_exported(tmp_path / "masked.safetensors")
    assert sorted(restored.state) == sorted(reference.state)
    for name, tensor in reference.state.items():
        assert bits(restored.state[name]) == bits(tensor), name
    assert sparse.bytes < 0.6 * masked.bytes  # 90 % sparse: bitmask + values is ~0.52x of dense float32
    assert sparse.accuracy == masked.accuracy and sparse.nonzero_flops == masked.nonzero_flops
    assert [row["format"] for row in exports_of(unstructured)][-2:] == ["masked", "sparse"]


# --- int8 ------------------------------------------------------------------------------------


def test_int8_export_reports_its_accuracy(unstructured, tmp_path):
    out = tmp_path / "int8.safetensors"
    report = export(unstructured, fmt="int8", out=out)
    masked = load_exported(export(unstructured, fmt="masked", out=tmp_path / "masked.safetensors").path).model
    assert not math.isnan(report.accuracy) and 0.0 <= report.accuracy <= 1.0
    assert abs(report.accuracy - report.recorded_accuracy) < 0.05  # int8 rounding costs little on this task
    assert report.bytes < 0.3 * report.dense_bytes

    # The file restores torch's quantized weights exactly, and pruned weights stay exactly zero.
    restored = load_exported(out).model
    expected = quantize_int8(masked)
    for (name, module), (_, reference) in zip(restored.named_modules(), expected.named_modules()):
        for got, want in zip(int8_parameters(module), int8_parameters(reference)):
            assert bits(got) == bits(want), name
    weight = int8_parameters(dict(restored.named_modules())["fc1"])[0]
    assert torch.equal(weight == 0, dict(masked.named_parameters())["fc1.weight"] == 0)
    recorded = exports_of(unstructured)[-2]
    assert recorded["format"] == "int8" and recorded["accuracy"] == report.accuracy and recorded["bytes"] == out.stat().st_size


# The old path is what configs stored in archives written before the floors name.
@pytest.mark.parametrize("builder", ["hpcprune.deploy.export:exported_model", "hpcprune.export:exported_model"])
def test_an_export_is_a_model_builder(unstructured, tmp_path, builder):
    out = tmp_path / "masked.safetensors"
    export(unstructured, fmt="masked", out=out, record=False)
    built = build_model(ModelConfig(name=builder, kwargs={"path": str(out)}))
    inputs = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(built(inputs), load_exported(out).model(inputs))


# --- checkpoint archives and refusals ------------------------------------------------------


@pytest.fixture(scope="module")
def masks_only(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoint")
    generator = torch.Generator().manual_seed(3)
    save_file({"a.weight": torch.randn(20, 30, generator=generator), "a.bias": torch.randn(20, generator=generator),
               "b.weight": torch.randn(10, 20, generator=generator)}, folder / "big.safetensors")
    out, _ = prune_run(folder, "model.name=checkpoint", f"model.checkpoint={folder / 'big.safetensors'}",
                       "finetune.epochs=0", "prune.sparsity=0.8")
    return out


def test_checkpoint_archive_exports_masked_and_sparse_only(masks_only, tmp_path, capsys, monkeypatch):
    sparse = export(masks_only, fmt="sparse", out=tmp_path / "s.safetensors")
    masked = export(masks_only, fmt="masked", out=tmp_path / "m.safetensors")
    assert math.isnan(sparse.accuracy) and math.isnan(sparse.flops) and sparse.bytes < masked.bytes
    assert load_exported(tmp_path / "s.safetensors").model is None
    state = load_exported(tmp_path / "s.safetensors").state
    assert int((state["a.weight"] != 0).sum() + (state["b.weight"] != 0).sum()) == round(0.2 * 800)
    status, _, stderr = cli(capsys, monkeypatch, "export", str(masks_only), "--format", "compact", "--out", str(tmp_path / "c.safetensors"))
    assert status == 2 and len(stderr.strip().splitlines()) == 1
    assert "no module" in stderr and "masked, sparse" in stderr
    assert not (tmp_path / "c.safetensors").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--round", "9"], "no complete round 9"),
    (["--format", "onnx"], "unknown format"),
    (["--int8-base", "sparse", "--format", "int8"], "--int8-base"),
    (["--out", "{existing}"], "exists; pass --force"),
    (["--out", "{existing}/inside.safetensors"], "cannot write"),
])
def test_cli_refusals_are_one_line_and_touch_nothing(unstructured, tmp_path, capsys, monkeypatch, args, fragment):
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep me")
    args = [arg.format(existing=existing) for arg in args]
    if "--format" not in args:
        args += ["--format", "masked"]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "new.safetensors")]
    before = (hashlib.sha256(unstructured.read_bytes()).hexdigest(), len(exports_of(unstructured)))
    status, _, stderr = cli(capsys, monkeypatch, "export", str(unstructured), *args)
    assert status == 2, stderr
    assert len(stderr.strip().splitlines()) == 1 and fragment in stderr, stderr
    assert existing.read_bytes() == b"keep me" and not (tmp_path / "new.safetensors").exists()
    assert (hashlib.sha256(unstructured.read_bytes()).hexdigest(), len(exports_of(unstructured))) == before


def test_the_export_command_prints_records_and_overwrites_with_force(unstructured, tmp_path):
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"old")
    done = run_cli("export", str(unstructured), "--round", "1", "--format", "sparse", "--out", str(out), "--force")
    assert done.returncode == 0, done.stderr
    recorded = exports_of(unstructured)[-1]
    assert recorded["format"] == "sparse" and recorded["bytes"] == out.stat().st_size
    assert f"{recorded['bytes']:,} on disk" in done.stdout and f"{100 * recorded['accuracy']:.2f} %" in done.stdout
    assert load_exported(out).metadata["format"] == "sparse"
