"""Fuzzing: random configs, overrides and damaged archives never raise anything but UsageError.

Hypothesis draws YAML documents (trees over the real section and key names, with values of every
YAML type, and raw text), `--set` overrides, and byte flips and truncations of a real small archive.
Whatever it draws, the config loader returns a valid config or refuses with a one-line UsageError,
and the archive reader (open, header, rounds, masks, tables) reads or refuses the same way.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import h5py
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hpcprune.archive.codec import pack_mask
from hpcprune.archive.reader import open_archive
from hpcprune.archive.writer import Archive
from hpcprune.config import RunConfig, load_config, load_config_text
from hpcprune.errors import UsageError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

SECTIONS = {name: sorted(field.annotation.model_fields) if hasattr(field.annotation, "model_fields") else []
            for name, field in RunConfig.model_fields.items()}
KEYS = st.sampled_from(sorted({*SECTIONS, *(key for keys in SECTIONS.values() for key in keys), "name", "lr", "x"}))
SCALARS = (st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True) |
           st.text(max_size=20) | st.sampled_from(["magnitude", "global", "iterative", "sgd", "1e-3", "synthetic", "cpu"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS | st.text(max_size=8), inner, max_size=4),
                      max_leaves=12)
TREES = st.dictionaries(st.sampled_from(sorted(SECTIONS)) | KEYS, VALUES, max_size=6)


def loads_or_refuses(load) -> None:
    try:
        config = load()
    except UsageError as error:
        assert "\n" not in str(error) and str(error)
    else:
        assert isinstance(config, RunConfig)


@FUZZ
@given(tree=TREES)
def test_random_config_trees(tree):
    loads_or_refuses(lambda: load_config_text(yaml.safe_dump(tree), "fuzz.yaml"))


@FUZZ
@given(text=st.text(max_size=200) | st.binary(max_size=200).map(lambda data: data.decode("latin-1")))
@example(text="a: &x [*x]")  # a recursive alias
@example(text="prune: !!python/object/apply:os.system [true]")
@example(text="seed: !!binary aGVsbG8=")
@example(text="seed: 2001-12-14")
@example(text="- 1\n- 2")
@example(text="prune: {sparsity: .nan}")
@example(text="model: {kwargs: {1: 2}}")
def test_random_yaml_text(text):
    loads_or_refuses(lambda: load_config_text(text, "fuzz.yaml"))


@FUZZ
@given(text=st.text(max_size=120))
def test_random_config_files(text):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.yaml"
        path.write_text(text)
        loads_or_refuses(lambda: load_config(path))


OVERRIDE_KEYS = st.lists(KEYS | st.text(max_size=6), min_size=1, max_size=3).map(".".join)
OVERRIDES = st.lists(st.tuples(OVERRIDE_KEYS, st.sampled_from(["=", "", "=="]), st.text(max_size=15)).map("".join), max_size=4)


@FUZZ
@given(overrides=OVERRIDES)
@example(overrides=["prune=1", "prune.sparsity=0.5"])
@example(overrides=["=1"])
@example(overrides=["seed=[1"])
def test_random_overrides(overrides):
    loads_or_refuses(lambda: load_config(None, overrides))


# --- the archive reader ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_archive(tmp_path_factory) -> Path:
    """A real archive: header, dense record, two complete rounds and an event, a few kilobytes."""
    import torch

    path = tmp_path_factory.mktemp("fuzz") / "run.h5"
    shapes = {"fc1.weight": (40, 30), "fc2.weight": (10, 40)}
    archive = Archive.create(path, config_yaml=RunConfig().to_yaml(), model_name="lenet300",
                             params=[(name, shape, True) for name, shape in shapes.items()], world_size=1, backend="single")
    archive.write_dense(accuracy=0.9, loss=0.3, seconds=1.0, history=[], state_file=None)
    generator = torch.Generator().manual_seed(3)
    for index in (1, 2):
        masks = {name: torch.rand(shape, generator=generator) < 0.5 for name, shape in shapes.items()}
        kept = sum(int(mask.sum()) for mask in masks.values())
        archive.write_round(index, attrs=dict(criterion="magnitude", rule="global", target_sparsity=0.5,
                                              achieved_sparsity=0.5, kept=kept, total=1600),
                            masks={name: (pack_mask(mask), shape, int(mask.sum())) for (name, mask), shape in zip(masks.items(), shapes.values())},
                            layers=[dict(name=name, numel=mask.numel(), kept=int(mask.sum()), sparsity=0.5) for name, mask in masks.items()],
                            history=[dict(epoch=1, train_loss=1.0, eval_loss=1.0, eval_accuracy=0.5)])
        archive.mark_checkpoint(index, None)
    archive.record_event("finish", "fuzz")
    return path


def read_everything(path: Path) -> None:
    reader = open_archive(path)  # header, model table, dense record, checkpoint, events, round attrs
    for attrs in reader.rounds(include_incomplete=True):
        reader.read_masks(attrs["index"])
        reader.layers(attrs["index"])
        reader.history(attrs["index"])


def reads_or_refuses(path: Path) -> None:
    try:
        read_everything(path)
    except UsageError as error:
        assert "\n" not in str(error) and str(path) in str(error)


def test_the_fuzzed_archive_reads_whole(small_archive):
    read_everything(small_archive)
    with h5py.File(small_archive, "r") as file:
        assert [file[f"rounds/000{index}"].attrs["status"] for index in (1, 2)] == ["complete"] * 2


@FUZZ
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=8))
def test_byte_flips_in_an_archive(small_archive, tmp_path, flips):
    damaged = tmp_path / "damaged.h5"
    data = bytearray(small_archive.read_bytes())
    for where, xor in flips:
        data[int(where * len(data))] ^= xor
    damaged.write_bytes(bytes(data))
    reads_or_refuses(damaged)


@FUZZ
@given(keep=st.floats(0, 1, exclude_max=True))
def test_truncated_archives(small_archive, tmp_path, keep):
    damaged = tmp_path / "truncated.h5"
    data = small_archive.read_bytes()
    damaged.write_bytes(data[: int(keep * len(data))])
    reads_or_refuses(damaged)

