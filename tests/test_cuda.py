"""On GPUs (`pytest -m cuda`): DDP with NCCL on one GPU per rank, the refusal of ranks that would
share a GPU, no NCCL for `device: cpu`, and each rank's own GPU generator across a resume.

Skipped where CUDA is missing: in CI too, whose machines have no GPU (every other component missing
in CI fails the suite instead, see tests/conftest.py).
"""

from __future__ import annotations

import json

import pytest
import torch

from hpcprune.models.builders import load_state_file
from tests.helpers import CONFIGS, driver, launch, torchrun

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(GPUS == 0, reason="needs CUDA (skipped also in CI: no GPU there)")]
two_gpus = pytest.mark.skipif(GPUS < 2, reason="needs two GPUs: one per rank")

TRAINING = (str(CONFIGS / "smoke.yaml"), "schedule.rounds=1")


def train_under_torchrun(tmp_path, ranks: int, *overrides: str):
    return launch(torchrun(ranks, "--no-python", *driver("train", str(tmp_path), *TRAINING, *overrides)), timeout=600)


@two_gpus
def test_ddp_with_nccl_on_one_gpu_per_rank_ends_with_identical_replicas(tmp_path):
    finished = train_under_torchrun(tmp_path, 2, "device=cuda")
    assert finished.returncode == 0, finished.stderr
    groups = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert groups == [{"default": "gloo", "nccl": 1}] * 2  # the World on gloo, gradients over nccl
    replicas = [load_state_file(tmp_path / f"rank{rank}.safetensors") for rank in (0, 1)]
    assert all(torch.equal(replicas[0][name], replicas[1][name]) for name in replicas[0])


def test_device_cpu_makes_no_nccl_group_even_where_cuda_exists(tmp_path):
    finished = train_under_torchrun(tmp_path, 2, "device=cpu")
    assert finished.returncode == 0, finished.stderr
    assert [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)] == [{"default": "gloo", "nccl": 0}] * 2


def test_more_local_ranks_than_gpus_are_refused_in_one_line(tmp_path):
    finished = launch(torchrun(GPUS + 1, "-m", "hpcprune", "prune", "--config", TRAINING[0], "--set", "device=cuda",
                               "--out", str(tmp_path / "run.h5"), "-q"), timeout=600)
    assert finished.returncode != 0
    errors = [line for line in finished.stderr.splitlines() if line.startswith("hpcprune: error:")]
    assert len(errors) == 1 and "would share GPU" in errors[0] and "NCCL needs one GPU per rank" in errors[0], finished.stderr
    assert not (tmp_path / "run.h5").exists()


@two_gpus
def test_each_rank_restores_its_own_gpu_generator(tmp_path):
    finished = launch(torchrun(2, "--no-python", *driver("rng", str(tmp_path))), timeout=300)
    assert finished.returncode == 0, finished.stderr
    drawn = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert drawn[0]["expected"]["cuda"] != drawn[1]["expected"]["cuda"]
    assert all(seen["restored"] == seen["expected"] for seen in drawn)
