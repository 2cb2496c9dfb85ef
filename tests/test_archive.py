"""The HDF5 archive: round trip, storage properties, refusal of existing/foreign/damaged files, resume."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch
import yaml

from hpcprune.archive.codec import pack_mask
from hpcprune.archive.reader import FORMAT_VERSION, open_archive
from hpcprune.archive.writer import Archive, escape_name, state_path
from hpcprune.config import RunConfig
from hpcprune.errors import UsageError
from tests.helpers import flip_mask_byte

SHAPES = {"fc1.weight": (301, 7), "conv.0.weight": (5, 3, 3, 3), "block/odd.weight": (13,), "empty.weight": (0, 4),
          "fc1.bias": (301,)}
PRUNABLE = ("fc1.weight", "conv.0.weight", "block/odd.weight", "empty.weight")
BIG = {"big.weight": (1000, 1001)}  # ~125 KB packed: its chunk is surely written to disk


def config_yaml(**prune) -> str:
    return RunConfig.model_validate({"prune": prune, "output": {"path": "x.h5"}}).to_yaml()


def random_masks(seed: int, shapes=None) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.rand(shape, generator=generator) < 0.3 for name, shape in (shapes or
            {name: SHAPES[name] for name in PRUNABLE}).items()}


def round_attrs(index: int, masks) -> dict:
    kept = sum(int(mask.sum()) for mask in masks.values())
    total = sum(mask.numel() for mask in masks.values())
    return dict(criterion="magnitude", rule="global", target_sparsity=0.7, achieved_sparsity=1 - kept / total,
                threshold=0.01 * index, kept=kept, total=total, accuracy=0.8, loss=0.5, seconds_record=1.0,
                seconds_select=0.5, seconds_finetune=2.0, state_file=f"run.h5.states/round-{index:04d}.safetensors")


def write_round(archive: Archive, index: int, masks) -> None:
    packed = {name: (pack_mask(mask), tuple(mask.shape), int(mask.sum())) for name, mask in masks.items()}
    layers = [dict(name=name, numel=mask.numel(), kept=int(mask.sum()), sparsity=1 - int(mask.sum()) / max(1, mask.numel()))
              for name, mask in masks.items()]
    history = [dict(epoch=1, train_loss=0.9, eval_loss=0.8, eval_accuracy=0.7)]
    archive.write_round(index, attrs=round_attrs(index, masks), masks=packed, layers=layers, history=history)


def create(path, *, force=False, shapes=None, **prune) -> Archive:
    shapes = shapes or SHAPES
    params = [(name, shape, name in PRUNABLE or name in BIG) for name, shape in shapes.items()]
    return Archive.create(path, config_yaml=config_yaml(**prune), model_name="lenet300", params=params,
                          world_size=1, backend="single", force=force)


@pytest.fixture
def run(tmp_path):
    """An archive with a dense record and two complete rounds."""
    path = tmp_path / "out" / "run.h5"
    archive = create(path)
    archive.write_dense(accuracy=0.9, loss=0.3, seconds=4.0, history=[], state_file="run.h5.states/dense.safetensors")
    masks = {index: random_masks(index) for index in (1, 2)}
    for index, round_masks in masks.items():
        write_round(archive, index, round_masks)
        archive.mark_checkpoint(index, f"run.h5.states/round-{index:04d}.safetensors")
    return path, masks


def test_round_trip_gives_identical_masks_and_figures(run):
    path, masks = run
    reader = open_archive(path)
    for index in (1, 2):
        read = reader.read_masks(index)
        assert list(read) == list(masks[index])  # plan order, real names (dots and "/") preserved
        for name, mask in masks[index].items():
            assert read[name].dtype == torch.bool and torch.equal(read[name], mask)
    rounds = reader.rounds()
    assert [r["index"] for r in rounds] == [1, 2]
    assert rounds[1]["threshold"] == pytest.approx(0.02) and rounds[1]["status"] == "complete"
    assert rounds[0]["kept"] == sum(int(m.sum()) for m in masks[1].values())
    assert [layer["name"] for layer in reader.layers(2)] == list(masks[2])
    assert reader.history(2) == [dict(epoch=1, train_loss=0.9, eval_loss=0.8, eval_accuracy=0.7)]
    assert reader.dense["accuracy"] == 0.9 and reader.dense["history"] == []
    assert reader.config_yaml == config_yaml()
    assert reader.attrs["format"] == "hpcprune" and reader.attrs["format_version"] == FORMAT_VERSION
    assert {p["name"]: p["shape"] for p in reader.params}["fc1.weight"] == "301x7"
    assert reader.model["num_params"] == sum(math.prod(shape) for shape in SHAPES.values())


def test_state_paths_are_stored_relative_and_read_absolute(run):
    path, _ = run
    assert state_path(path, "dense") == path.parent / "run.h5.states" / "dense.safetensors"
    with h5py.File(path, "r") as file:
        assert file["checkpoint"].attrs["state_file"] == "run.h5.states/round-0002.safetensors"
    reader = open_archive(path)
    assert reader.checkpoint["round"] == 2
    assert reader.checkpoint["state_file"] == str((path.parent / "run.h5.states/round-0002.safetensors").absolute())
    assert reader.dense["state_file"] == str(state_path(path, "dense").absolute())


def test_absolute_state_paths_become_relative(tmp_path):
    path = tmp_path / "run.h5"
    archive = create(path)
    archive.mark_checkpoint(0, str(state_path(path, "dense").absolute()))
    with h5py.File(path, "r") as file:
        assert file["checkpoint"].attrs["state_file"] == "run.h5.states/dense.safetensors"


def test_masks_are_chunked_compressed_checksummed_and_plain_h5py_readable(run):
    path, masks = run
    with h5py.File(path, "r") as file:
        assert file.attrs["format"] == "hpcprune"
        dataset = file[f"rounds/0001/masks/{escape_name('block/odd.weight')}"]
        assert dataset.chunks is not None and dataset.compression == "gzip"
        assert dataset.fletcher32 and dataset.dtype == np.uint8
        dataset = file["rounds/0001/masks/fc1.weight"]
        shape = tuple(dataset.attrs["shape"])
        bits = np.unpackbits(dataset[()], count=math.prod(shape)).astype(bool).reshape(shape)
        assert np.array_equal(bits, masks[1]["fc1.weight"].numpy())
        assert dataset.attrs["kept"] == int(masks[1]["fc1.weight"].sum())
        assert "yaml" not in file["config"].asstr()[()] and "prune:" in file["config"].asstr()[()]


def test_existing_file_is_refused_without_force_and_untouched(run):
    path, _ = run
    before = path.read_bytes()
    with pytest.raises(UsageError, match="exists; pass --resume to continue it or --force to overwrite"):
        create(path)
    assert path.read_bytes() == before


def test_force_keeps_the_old_archive_until_the_new_run_records_its_first_step(run):
    path, _ = run
    before = path.read_bytes()
    archive = create(path, force=True)
    assert path.read_bytes() == before and len(open_archive(path).rounds()) == 2  # still the old run
    archive.write_dense(accuracy=0.5, loss=1.0, seconds=1.0, history=[], state_file=None)
    assert open_archive(path).rounds() == [] and open_archive(path).dense["accuracy"] == 0.5
    archive.close()
    # The old run's masks folder went with it; no temporary, no lock file is left.
    assert sorted(p.name for p in path.parent.iterdir()) == ["run.h5"]


def test_failed_forced_create_keeps_the_old_archive(run, monkeypatch):
    path, _ = run
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise RuntimeError("interrupted while writing")

    monkeypatch.setattr("hpcprune.archive.layout.write_header", fail)
    with pytest.raises(RuntimeError):
        create(path, force=True)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["run.h5", "run.h5.masks"]


def test_create_refuses_a_folder_it_cannot_make(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UsageError, match="cannot create the folder"):
        create(blocker / "run.h5")


def test_resume_lists_complete_rounds_only_and_replaces_an_incomplete_one(run):
    path, masks = run
    with h5py.File(path, "a") as file:  # what a run killed while writing round 3 leaves
        file.create_group("rounds/0003").attrs["status"] = "writing"
    archive = Archive.open_resume(path, config_yaml=config_yaml(), world_size=1)
    assert archive.completed_rounds() == [1, 2] and archive.dense_done()
    assert [r["index"] for r in open_archive(path).rounds()] == [1, 2]
    assert [r["index"] for r in open_archive(path).rounds(include_incomplete=True)] == [1, 2, 3]
    third = random_masks(3)
    write_round(archive, 3, third)
    assert archive.completed_rounds() == [1, 2, 3]
    assert torch.equal(open_archive(path).read_masks(3)["fc1.weight"], third["fc1.weight"])
    with pytest.raises(ValueError, match="already complete"):
        write_round(archive, 3, third)


def test_resume_ignores_output_path_and_progress(run):
    path, _ = run
    other = RunConfig.model_validate({"progress": False, "output": {"path": "elsewhere.h5"}}).to_yaml()
    assert Archive.open_resume(path, config_yaml=other, world_size=1).completed_rounds() == [1, 2]


def test_resume_with_a_different_config_names_the_key(run):
    path, _ = run
    with pytest.raises(UsageError, match=r"prune\.sparsity is 0\.9 in the archive and 0\.8 now"):
        Archive.open_resume(path, config_yaml=config_yaml(sparsity=0.8), world_size=1)


def test_an_archive_written_before_a_new_key_resumes_with_its_default(run):
    """Config keys added since an archive was written take their defaults in the comparison."""
    path, _ = run
    stored = yaml.safe_load(config_yaml())
    del stored["calibration"]["samples"], stored["eval"]
    with h5py.File(path, "a") as file:
        del file["config"]
        file.create_dataset("config", data=yaml.safe_dump(stored), dtype=h5py.string_dtype())
    assert Archive.open_resume(path, config_yaml=config_yaml(), world_size=1).completed_rounds() == [1, 2]
    other = RunConfig.model_validate({"calibration": {"samples": 64}, "output": {"path": "x.h5"}}).to_yaml()
    with pytest.raises(UsageError, match=r"calibration\.samples is 128 in the archive and 64 now"):
        Archive.open_resume(path, config_yaml=other, world_size=1)


def test_newer_format_is_refused(run):
    path, _ = run
    with h5py.File(path, "a") as file:
        file.attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(UsageError, match=f"newer hpcprune \\(format {FORMAT_VERSION + 1}, this reads 1 to {FORMAT_VERSION}\\)"):
        open_archive(path)


def test_foreign_hdf5_file_is_refused(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as file:
        file["x"] = 1
    with pytest.raises(UsageError, match="not an hpcprune archive"):
        open_archive(path)


def test_non_hdf5_truncated_and_missing_files_are_refused(run, tmp_path):
    path, _ = run
    text = tmp_path / "notes.h5"
    text.write_text("just text\n")
    truncated = tmp_path / "truncated.h5"
    data = path.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    for bad in (text, truncated, tmp_path / "missing.h5"):
        with pytest.raises(UsageError, match=f"{bad.name} is not a readable hpcprune archive"):
            open_archive(bad)


def test_a_flipped_byte_in_a_mask_fails_its_checksum(tmp_path):
    path = tmp_path / "run.h5"
    archive = create(path, shapes=BIG)
    write_round(archive, 1, random_masks(1, BIG))
    flip_mask_byte(path, 1, "big.weight")
    reader = open_archive(path)  # metadata is intact: only the mask is damaged
    with pytest.raises(UsageError, match="round 1, mask big.weight is corrupted"):
        reader.read_masks(1)
