"""User errors caught where the input enters: config, flags, model code, checkpoints, data, output paths.

Every case runs the real CLI beside a finished run (the `workspace` fixture of tests.finished_run) and
asserts exit status 2, one `hpcprune: error:` line naming the culprit, and every file unchanged.
"""

from __future__ import annotations

import gzip
import os
import struct

import pytest

from hpcprune.config import ModelConfig
from hpcprune.models.builders import build_model, save_checkpoint
from tests import test_reliability_input as inputs
from tests.finished_run import refused, snapshot
from tests.helpers import ROOT, complete_rounds, driver, launch, run_cli
from tests.test_reliability_input import prune_into, write_config

# A copy of the data beside the finished run (`workspace`, a conftest fixture), for the data cases.
fashion_mnist_copy = inputs.fashion_mnist_copy


def config_file(folder, text: str):
    return ("prune", "--config", str(write_config(folder, text)), "--out", str(folder / "new.h5"))


# --- the config file and its overrides ----------------------------------------------------------------


def test_a_seed_beyond_64_bits_is_refused(workspace):
    refused(workspace, *prune_into(workspace, "--set", f"seed={2**64}"), fragment=f"seed: Input should be less than {2**63}")


def test_a_nan_threshold_is_refused(workspace):
    refused(workspace, *prune_into(workspace, "--set", "prune.rule=threshold", "--set", "prune.threshold=.nan"),
            fragment="prune.threshold: Input should be a finite number")


def test_a_config_that_is_not_utf8_is_named(workspace):
    bad = workspace / "latin1.yaml"
    bad.write_bytes("seed: 1\n# réglages\n".encode("latin-1"))
    refused(workspace, "prune", "--config", str(bad), "--out", str(workspace / "new.h5"),
            fragment=f"config {bad}: not UTF-8 text (byte 0xe9")


@pytest.mark.parametrize("text, name", [("seed: 1\nseed: 2\n", "seed"),
                                        ("prune:\n  sparsity: 0.5\n  sparsity: 0.6\n", "sparsity"),
                                        ("prune:\n  sparsity: 0.5\nprune:\n  rule: layer\n", "prune")])
def test_a_key_or_section_given_twice_is_refused(workspace, text, name):
    refused(workspace, *config_file(workspace, text), fragment=f"'{name}' is given twice")


def test_a_validation_split_as_large_as_fashion_mnist_is_refused(workspace, fashion_mnist_copy):
    refused(workspace, *prune_into(workspace, "--set", "data.dataset=fashion-mnist", "--set", f"data.path={fashion_mnist_copy}",
                                   "--set", "data.validation_size=60000"), fragment="data.validation_size=60000 leaves no training images")


def test_an_empty_out_is_refused(workspace):
    refused(workspace, "prune", "--config", str(workspace / "smoke.yaml"), "--out", "",
            fragment="output.path: must name the archive file to write")


@pytest.mark.parametrize("args, fragment", [
    (("prune", "--config", "{workspace}"), "Invalid value for '--config'"),
    (("inspect", "layers", "{workspace}/run.h5", "--round", "abc"), "Invalid value for '--round': 'abc' is not a valid integer"),
    (("submit", "--config", "{workspace}/smoke.yaml", "--nodes", "0"), "Invalid value for '--nodes': 0"),
])
def test_click_usage_errors_read_like_every_other_error(workspace, args, fragment):
    refused(workspace, *(arg.format(workspace=workspace) for arg in args), fragment=fragment)


# --- the user's model code -----------------------------------------------------------------------------


MODEL_CODE = """\
import torch
from torch import nn

def raises(**_):
    raise RuntimeError("no weights for this size")

def wrong_input(**_):
    return nn.Linear(10, 10)  # takes 10 features, not a 1x28x28 image

def wrong_output(**_):
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 3))  # 3 scores for 10 classes
"""


@pytest.mark.parametrize("builder, fragment", [
    ("raises", "building it with {'in_channels': 1, 'num_classes': 10} failed (RuntimeError: no weights for this size)"),
    ("wrong_input", "does not take the data's images of shape [2, 1, 28, 28]"),
    ("wrong_output", "returns [2, 3] for images of shape [2, 1, 28, 28]; training needs [2, 10]"),
])
def test_a_model_builder_that_fails_or_does_not_fit_the_data_is_refused(workspace, builder, fragment):
    (workspace / "user_models.py").write_text(MODEL_CODE)
    line = refused(workspace, *prune_into(workspace, "--set", f"model.name=user_models:{builder}"), fragment=fragment,
                   env={"PYTHONPATH": f"{ROOT}{os.pathsep}{workspace}"})
    assert f"user_models:{builder}" in line


def test_model_kwargs_of_the_wrong_type_are_refused(workspace):
    refused(workspace, *prune_into(workspace, "--set", "model.kwargs={hidden: abc}"),
            fragment="model 'lenet300': building it with")


# --- checkpoints -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, word", [(float("nan"), "NaN"), (float("inf"), "infinity")])
def test_a_checkpoint_with_nan_or_inf_weights_is_refused(workspace, value, word):
    state = build_model(ModelConfig(name="lenet300")).state_dict()
    state["fc2.weight"][3, 4] = value
    bad = workspace / "bad.safetensors"
    save_checkpoint(state, bad)
    refused(workspace, *prune_into(workspace, "--set", f"model.checkpoint={bad}"),
            fragment=f"checkpoint {bad}: tensor 'fc2.weight' holds {word} (1 of 30000 values)")


def test_a_masks_only_checkpoint_with_nan_weights_is_refused(workspace):
    """Masks-only runs read a tensor only to score it, after the new archive exists: it holds no round."""
    state = build_model(ModelConfig(name="lenet300")).state_dict()
    state["fc1.weight"][0, 0] = float("nan")
    bad = workspace / "bad.safetensors"
    save_checkpoint(state, bad)
    refused_once_started(workspace, *prune_into(workspace, "--set", "model.name=checkpoint", "--set", f"model.checkpoint={bad}",
                                                "--set", "finetune.epochs=0"),
                         line=f"hpcprune: error: checkpoint {bad}: tensor 'fc1.weight' holds NaN (1 of 235200 values)")


def test_a_truncated_masks_only_checkpoint_is_refused_before_scoring(workspace):
    whole = (workspace / "run.h5.states" / "dense.safetensors").read_bytes()
    cut = workspace / "cut.safetensors"
    cut.write_bytes(whole[: len(whole) - 1000])
    refused(workspace, *prune_into(workspace, "--set", "model.name=checkpoint", "--set", f"model.checkpoint={cut}",
                                   "--set", "finetune.epochs=0"), fragment=f"checkpoint {cut} is truncated: {len(whole) - 1000} bytes")


# --- the data ----------------------------------------------------------------------------------------------


def idx(magic_dims: int, shape: tuple[int, ...]) -> bytes:
    """An IDX file of unsigned bytes with `shape` and no data beyond its header when shape holds a 0."""
    count = 1
    for size in shape:
        count *= size
    return bytes([0, 0, 0x08, magic_dims]) + b"".join(struct.pack(">I", size) for size in shape) + bytes(count)


def test_a_test_set_without_images_is_refused(workspace, fashion_mnist_copy):
    images = fashion_mnist_copy / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(gzip.compress(idx(3, (0, 28, 28))))
    (fashion_mnist_copy / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx(1, (0,))))
    refused(workspace, *prune_into(workspace, "--set", "data.dataset=fashion-mnist", "--set", f"data.path={fashion_mnist_copy}"),
            fragment=f"{images}: the test set holds no images")


# --- what the selection would keep -------------------------------------------------------------------


def test_a_sparsity_that_keeps_no_weight_is_refused_before_anything_is_written(workspace):
    refused(workspace, *prune_into(workspace, "--set", "prune.sparsity=0.999999999"),
            fragment="prune.sparsity 0.999999999 keeps none of the 266200 prunable weights (rule global)")


def test_a_threshold_that_prunes_every_weight_is_refused_and_changes_no_file(workspace):
    """The threshold rule learns that it keeps nothing only by selecting: its new archive holds no round."""
    refused_once_started(workspace, *prune_into(workspace, "--set", "prune.rule=threshold", "--set", "prune.threshold=1e9"),
                         line="hpcprune: error: prune.threshold 1000000000.0 prunes every one of the 266200 prunable weights")


def refused_once_started(folder, *args: str, line: str) -> None:
    """Exit 2 with exactly `line` on stderr, every file that was there unchanged, and no round recorded."""
    before = snapshot(folder)
    result = run_cli(*args, "-q")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [line], result.stderr
    after = snapshot(folder)
    assert {name: after[name] for name in before} == before
    assert complete_rounds(folder / "new.h5") == []


# --- output paths ---------------------------------------------------------------------------------------


def test_an_archive_name_longer_than_the_filesystem_allows_is_refused(workspace):
    long = "r" * 300 + ".h5"
    refused(workspace, *prune_into(workspace)[:-2], "--out", str(workspace / long),
            fragment=f"is {len(long)} bytes; the filesystem holds names of at most 255")


def test_an_archive_name_whose_states_folder_would_be_too_long_is_refused(workspace):
    name = "r" * 250 + ".h5"  # fits, but "<archive name>.states" beside it does not
    refused(workspace, *prune_into(workspace)[:-2], "--out", str(workspace / name), fragment=".h5.states' is 260 bytes")


def test_a_masks_file_name_longer_than_the_filesystem_allows_is_refused(workspace):
    refused(workspace, "inspect", "masks", str(workspace / "run.h5"), "--out", str(workspace / ("m" * 260)),
            fragment="the filesystem holds names of at most 255")


def test_an_unusable_mplbackend_is_named(workspace):
    refused(workspace, "inspect", "plot", str(workspace / "run.h5"), "--out", str(workspace / "plots"),
            fragment="MPLBACKEND='no-such-backend' is not a matplotlib backend", env={"MPLBACKEND": "no-such-backend"})


# --- a bug is not a user error -----------------------------------------------------------------------


def test_a_genuine_bug_keeps_its_traceback(workspace):
    """tests.drivers adds a criterion that raises RuntimeError: not the user's fault, so not one line."""
    before = snapshot(workspace)
    result = launch(driver("cli", *prune_into(workspace, "--set", "prune.criterion=explode")))
    assert result.returncode == 1, result.stderr
    assert "Traceback (most recent call last)" in result.stderr and "RuntimeError: injected failure during scoring" in result.stderr
    assert "hpcprune: error:" not in result.stderr
    assert {name: digest for name, digest in snapshot(workspace).items() if name in before} == before
