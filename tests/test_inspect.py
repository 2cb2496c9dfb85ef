"""`hpcprune inspect`: the summary's figures and the rendered tables."""

from __future__ import annotations

import json

import h5py
import pytest
import torch

from hpcprune.archive import Archive
from hpcprune.config import RunConfig
from hpcprune.inspect import render_summary, summary
from hpcprune.masks import pack_mask

SHAPES = {"fc1.weight": (30, 20), "fc2.weight": (10, 30)}


def make_run(path) -> dict[int, dict[str, torch.Tensor]]:
    params = [(name, shape, True) for name, shape in SHAPES.items()] + [("fc1.bias", (30,), False)]
    archive = Archive.create(path, config_yaml=RunConfig().to_yaml(), model_name="lenet300", params=params,
                             world_size=2, backend="mpi")
    archive.write_dense(accuracy=0.91, loss=0.25, seconds=3.0, history=[], state_file=None)
    generator = torch.Generator().manual_seed(0)
    written = {}
    for index, density in ((1, 0.5), (2, 0.2)):
        masks = {name: torch.rand(shape, generator=generator) < density for name, shape in SHAPES.items()}
        kept = {name: int(mask.sum()) for name, mask in masks.items()}
        total = sum(mask.numel() for mask in masks.values())
        attrs = dict(criterion="magnitude", rule="global", target_sparsity=1 - density,
                     achieved_sparsity=1 - sum(kept.values()) / total, threshold=None if index == 1 else 0.125,
                     kept=sum(kept.values()), total=total, accuracy=0.9 - 0.01 * index, loss=0.3,
                     seconds_select=1.0, seconds_finetune=2.0, seconds_record=3.0, state_file=None)
        archive.write_round(index, attrs=attrs,
                            masks={name: (pack_mask(mask), mask.shape, kept[name]) for name, mask in masks.items()},
                            layers=[dict(name=name, numel=mask.numel(), kept=kept[name],
                                         sparsity=1 - kept[name] / mask.numel()) for name, mask in masks.items()],
                            history=[])
        written[index] = masks
    return written


def test_summary_has_the_recorded_figures(tmp_path):
    path = tmp_path / "run.h5"
    masks = make_run(path)
    facts = summary(path)
    json.dumps(facts, allow_nan=False)  # strict JSON: no NaN
    assert facts["model"] == "lenet300" and facts["num_params"] == 600 + 300 + 30
    assert facts["world_size"] == 2 and facts["backend"] == "mpi" and facts["format_version"] == 1
    assert facts["dense"] == {"accuracy": 0.91, "loss": 0.25, "seconds": 3.0}
    assert [r["index"] for r in facts["rounds"]] == [1, 2]
    assert facts["rounds"][0]["threshold"] is None and facts["rounds"][1]["threshold"] == 0.125
    assert facts["rounds"][1]["kept"] == sum(int(m.sum()) for m in masks[2].values())
    with h5py.File(path, "r") as file:
        written = float(file["rounds/0002"].attrs["seconds_write"])  # measured by the archive itself
    assert facts["rounds"][1]["seconds"] == pytest.approx(6.0 + written)
    last = {layer["name"]: layer for layer in facts["layers"]}
    assert last["fc1.weight"]["shape"] == "30x20" and last["fc1.weight"]["kept"] == int(masks[2]["fc1.weight"].sum())


def test_render_shows_round_rows_and_layer_names(tmp_path):
    path = tmp_path / "run.h5"
    make_run(path)
    facts = summary(path)
    text = render_summary(facts)
    lines = text.splitlines()
    second = facts["rounds"][1]
    row = next(line for line in lines if line.split()[:2] == ["2", "magnitude"])
    assert f"{second['kept']}/{second['total']}" in row and f"{100 * second['achieved_sparsity']:.4f} %" in row
    assert "0.125" in row and "88.00 %" in row
    assert any(line.split()[:2] == ["1", "magnitude"] for line in lines)
    assert "layers of round 2" in text
    assert any(line.startswith("fc2.weight") and "10x30" in line for line in lines)
    assert "91.00 %" in text and "lenet300" in text


def test_render_of_an_archive_without_rounds(tmp_path):
    path = tmp_path / "run.h5"
    Archive.create(path, config_yaml=RunConfig().to_yaml(), model_name="lenet5", params=[("w", (2, 2), True)],
                   world_size=1, backend="single")
    text = render_summary(summary(path))
    assert "no complete rounds" in text and "dense     not recorded" in text
