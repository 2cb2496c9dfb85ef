"""Bad input through the real CLI: one line naming the culprit, exit status 2, and nothing on disk changed.

Every test runs `hpcprune` in a folder that already holds a finished run (archive, model states,
config, data) and checks, by hashing every file, that the refusal neither changed nor added a file.
test_pipeline.py already covers an existing archive without --resume/--force, --resume with another
config, a missing data folder, an unknown model name and a missing checkpoint.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import pytest
import torch

from hpcprune.archive.reader import FORMAT_VERSION
from hpcprune.config import ModelConfig
from hpcprune.models.builders import build_model, save_checkpoint
from tests.finished_run import refused, snapshot
from tests.helpers import (
    CONFIGS,
    ROOT,
    archive_masks,
    assert_same_masks,
    flip_mask_byte,
    launch,
    run_cli,
)
from tests.mounts import fill


def prune_into(folder: Path, *args: str) -> tuple[str, ...]:
    """`prune` arguments writing a new archive in `folder` (the existing run stays where it is)."""
    return ("prune", "--config", str(folder / "smoke.yaml"), "--out", str(folder / "new.h5"), *args)


def write_config(folder: Path, text: str) -> Path:
    path = folder / "bad.yaml"
    path.write_text(textwrap.dedent(text))
    return path


# --- the config ------------------------------------------------------------------------------


def test_malformed_yaml_names_the_file_and_line(workspace):
    bad = write_config(workspace, "seed: 1\nprune:\n  sparsity: [0.5\n  rule: global\n")
    line = refused(workspace, "prune", "--config", str(bad), "--out", str(workspace / "new.h5"), fragment=str(bad))
    assert "malformed YAML" in line and "line " in line


def test_unknown_key_in_the_file_is_named(workspace):
    bad = write_config(workspace, "prune:\n  sparsity: 0.5\n  sparsityy: 0.6\n")
    refused(workspace, "prune", "--config", str(bad), "--out", str(workspace / "new.h5"),
            fragment=f"{bad}: prune.sparsityy: unknown key")


def test_wrong_type_is_named_with_the_value(workspace):
    bad = write_config(workspace, "data:\n  batch_size: many\n")
    refused(workspace, "prune", "--config", str(bad), "--out", str(workspace / "new.h5"),
            fragment="data.batch_size: Input should be a valid integer")


@pytest.mark.parametrize("command", ["prune", "submit"])
def test_a_bad_config_is_refused_before_torch_is_imported(tmp_path, command):
    """A refusal costs a fraction of a second, not the seconds torch takes to import."""
    done = run_cli(command, "--set", "prune.sparsityy=0.5", "--out", str(tmp_path / "run.h5"),
                   python_args=("-X", "importtime"))
    assert done.returncode == 2 and "prune.sparsityy: unknown key" in done.stderr, done.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "hpcprune.config" in imported and "torch" not in imported
    assert not (tmp_path / "run.h5").exists()


@pytest.mark.parametrize("sparsity", ["1.0", "-0.1"])
def test_sparsity_outside_zero_one_is_refused(workspace, sparsity):
    line = refused(workspace, *prune_into(workspace, "--set", f"prune.sparsity={sparsity}"), fragment="prune.sparsity")
    assert sparsity in line


# --- the model and its checkpoint ------------------------------------------------------------


def test_model_without_prunable_tensors_is_refused(workspace):
    (workspace / "flat_model.py").write_text("from torch import nn\n\ndef build(**_):\n    return nn.Sequential(nn.Flatten(), nn.ReLU())\n")
    refused(workspace, *prune_into(workspace, "--set", "model.name=flat_model:build"), fragment="no prunable tensors",
            env={"PYTHONPATH": f"{ROOT}{os.pathsep}{workspace}"})


def test_checkpoint_of_another_architecture_is_refused(workspace):
    other = workspace / "lenet5.safetensors"
    save_checkpoint(build_model(ModelConfig(name="lenet5")), other)
    line = refused(workspace, *prune_into(workspace, "--set", f"model.checkpoint={other}"), fragment=f"checkpoint {other}:")
    assert "conv1.weight" in line or "fc1.weight" in line  # the tensors that do not match are named


class WritesMarker:
    """Unpickling this runs os.makedirs(marker): a checkpoint that carries code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (str(self.marker),)


def test_checkpoint_with_pickled_code_is_refused_without_running_it(workspace, tmp_path):
    marker, evil = tmp_path / "code-ran", workspace / "evil.pt"
    torch.save({"fc1.weight": torch.zeros(300, 784), "payload": WritesMarker(marker)}, evil)
    with open(evil, "rb"):  # the payload is live: an unrestricted load would run it
        torch.load(evil, weights_only=False)
    assert marker.is_dir()
    marker.rmdir()
    refused(workspace, *prune_into(workspace, "--set", f"model.checkpoint={evil}"), fragment=f"checkpoint {evil}: refused")
    assert not marker.exists()


# --- the data --------------------------------------------------------------------------------


@pytest.fixture
def fashion_mnist_copy(require_fashion_mnist, workspace) -> Path:
    folder = workspace / "fmnist"
    shutil.copytree(require_fashion_mnist, folder)
    return folder


def test_missing_dataset_file_is_named(workspace, fashion_mnist_copy):
    (fashion_mnist_copy / "train-labels-idx1-ubyte.gz").unlink()
    refused(workspace, *prune_into(workspace, "--set", "data.dataset=fashion-mnist", "--set", f"data.path={fashion_mnist_copy}"),
            fragment="train-labels-idx1-ubyte")


@pytest.mark.parametrize("compressed", [True, False])
def test_truncated_dataset_file_is_named(workspace, fashion_mnist_copy, compressed):
    images = fashion_mnist_copy / "train-images-idx3-ubyte.gz"
    if compressed:
        images.write_bytes(images.read_bytes()[: images.stat().st_size // 2])
    else:  # the raw IDX file, complete as a file but shorter than its header says
        raw = gzip.decompress(images.read_bytes())
        images.unlink()
        images = images.with_suffix("")
        images.write_bytes(raw[: len(raw) - 784 * 10])
    refused(workspace, *prune_into(workspace, "--set", "data.dataset=fashion-mnist", "--set", f"data.path={fashion_mnist_copy}"),
            fragment=str(images))


# --- the archive -----------------------------------------------------------------------------


def resume(folder: Path, *args: str) -> tuple[str, ...]:
    return ("prune", "--config", str(folder / "smoke.yaml"), "--out", str(folder / "run.h5"), "--resume", *args)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("command", ["resume", "inspect"])
def test_truncated_archive_is_refused(workspace, command):
    truncate(workspace / "run.h5")
    args = resume(workspace) if command == "resume" else ("inspect", str(workspace / "run.h5"))
    refused(workspace, *args, fragment=f"{workspace / 'run.h5'} is not a readable hpcprune archive")


def test_archive_with_a_damaged_superblock_is_refused_by_inspect(workspace):
    archive = workspace / "run.h5"
    data = bytearray(archive.read_bytes())
    data[0:8] = b"\x00" * 8  # the HDF5 signature
    archive.write_bytes(bytes(data))
    refused(workspace, "inspect", str(archive), fragment=f"{archive} is not a readable hpcprune archive")


def test_resume_from_a_mask_that_fails_its_checksum_is_refused_before_anything_is_written(workspace):
    flip_mask_byte(workspace / "run.h5", 3, "fc1.weight")
    refused(workspace, *resume(workspace), fragment="round 3, mask fc1.weight is corrupted")


def test_resume_without_the_state_files_it_needs_is_refused_before_anything_is_written(workspace):
    (workspace / "run.h5.states" / "round-0003.safetensors").unlink()
    refused(workspace, *resume(workspace), fragment="round-0003.safetensors")


@pytest.mark.parametrize("command", ["resume", "inspect"])
def test_archive_of_a_newer_format_is_refused(workspace, command):
    with h5py.File(workspace / "run.h5", "a") as file:
        file.attrs["format_version"] = FORMAT_VERSION + 1
    args = resume(workspace) if command == "resume" else ("inspect", str(workspace / "run.h5"))
    refused(workspace, *args, fragment=f"newer hpcprune (format {FORMAT_VERSION + 1}")


def test_output_that_is_a_folder_is_refused(workspace):
    refused(workspace, "prune", "--config", str(workspace / "smoke.yaml"), "--out", str(workspace / "run.h5.states"),
            fragment="is a directory")


# --- where the archive goes ------------------------------------------------------------------


def test_output_under_a_file_is_refused(workspace):
    out = workspace / "smoke.yaml" / "run.h5"
    refused(workspace, "prune", "--config", str(workspace / "smoke.yaml"), "--out", str(out), fragment=str(out))


def test_read_only_output_folder_is_refused(workspace, mounted):
    folder = mounted("size=1m,ro")
    out = folder / "run.h5"
    refused(workspace, "prune", "--config", str(workspace / "smoke.yaml"), "--out", str(out), fragment=str(out))
    assert list(folder.iterdir()) == []


def masks_only_args(weights: Path) -> list[str]:
    """A 2-round masks-only run: no training, no model states beside the archive."""
    return ["--config", str(CONFIGS / "oneshot_global.yaml"), "--set", "model.name=checkpoint", "--set",
            f"model.checkpoint={weights}", "--set", "schedule.kind=iterative", "--set", "schedule.rounds=2"]


def masks_only(out: Path, weights: Path, *args: str, kill: str | None = None) -> subprocess.CompletedProcess:
    """The masks-only run through the crash-point driver (SIGKILLed at `kill` if given)."""
    command = [sys.executable, "-m", "tests.crash_points", "prune", *masks_only_args(weights), "--out", str(out), "-q", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **({"HPCPRUNE_TEST_KILL": kill} if kill else {})}
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


@pytest.mark.parametrize("how", ["--resume", "--force"])
def test_disk_full_during_an_archive_write_keeps_the_previous_archive(workspace, mounted, how):
    """Round 1 is on disk, then the disk fills: writing round 2 (--resume) or a new archive (--force)
    is refused with the archive named, and round 1 is still there, readable, bit for bit."""
    folder = mounted("size=1m")
    out = folder / "masks.h5"
    killed = masks_only(out, workspace / "run.h5.states" / "dense.safetensors", kill="mark_checkpoint:1")
    assert killed.returncode == -9, killed.stderr
    before = archive_masks(out, 1)
    fill(folder, leave=out.stat().st_size // 2)
    refusal = masks_only(out, workspace / "run.h5.states" / "dense.safetensors", how)
    lines = refusal.stderr.strip().splitlines()
    assert refusal.returncode == 2 and len(lines) == 1, refusal.stderr
    assert lines[0].startswith("hpcprune: error: cannot write ") and "No space left on device" in lines[0]
    assert str(out) in lines[0] or f".{out.name}." in lines[0]
    after = archive_masks(out, 1)
    assert after.keys() == before.keys() and all((after[name] == before[name]).all() for name in after)
    with h5py.File(out, "r") as archive:
        assert archive["rounds/0001"].attrs["status"] == "complete" and "0002" not in archive["rounds"]
    # No temporary left behind, and no part of round 2: its masks folder holds round 1's part alone.
    assert sorted(path.name for path in folder.iterdir()) == ["filler", "masks.h5", "masks.h5.masks"]
    assert [path.name for path in (folder / "masks.h5.masks").iterdir()] == ["round-0001.part-0000.h5"]


# --- resuming on another world size ------------------------------------------------------------


def test_resume_of_a_training_run_on_another_world_size_is_refused(mpirun, workspace):
    """Training shards the batches by rank, so weights (and later masks) depend on the world size."""
    with h5py.File(workspace / "run.h5", "r") as file:
        assert file.attrs["world_size"] == 1
    before = snapshot(workspace)
    result = launch([mpirun, "-n", "2", sys.executable, "-m", "hpcprune", *resume(workspace)], timeout=300)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("hpcprune: error:")]
    assert len(errors) == 1 and "cannot resume on 2 rank(s) a run that trains on 1" in errors[0], result.stderr
    assert snapshot(workspace) == before


def test_resume_of_a_run_without_training_on_another_world_size_gives_the_same_masks(mpirun, workspace, tmp_path):
    """Masks do not depend on the world size: a masks-only run killed in round 2 at 1 rank resumes on 2."""
    weights = workspace / "run.h5.states" / "dense.safetensors"
    reference, out = tmp_path / "reference.h5", tmp_path / "resumed.h5"
    assert masks_only(reference, weights).returncode == 0
    assert masks_only(out, weights, kill="mark_checkpoint:1").returncode == -9
    resumed = launch([mpirun, "-n", "2", sys.executable, "-m", "hpcprune", "prune", *masks_only_args(weights),
                      "--out", str(out), "--resume", "-q"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_masks(out, reference, rounds=(1, 2))
    with h5py.File(out, "r") as file:
        assert file.attrs["world_size"] == 2
