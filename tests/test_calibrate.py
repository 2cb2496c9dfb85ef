"""Calibration: batches shared among ranks by index, and statistics that do not depend on the world size.

    python -m pytest tests/test_calibrate.py -q
"""

from __future__ import annotations

import sys

import pytest
import torch

from hpcprune.config import CalibrationConfig
from hpcprune.models.builders import load_state_file
from hpcprune.prune.calibrate import CalibrationBatches
from tests.helpers import launch


class FakeWorld:
    def __init__(self, rank, size):
        self.rank, self.size = rank, size


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_every_batch_goes_to_exactly_one_rank_by_its_index(size):
    batches = CalibrationBatches(7, lambda index: (index, None))
    shares = [[index for index, _ in batches.mine(FakeWorld(rank, size))] for rank in range(size)]
    assert sorted(sum(shares, [])) == list(range(7))
    assert all(index % size == rank for rank, share in enumerate(shares) for index in share)


def test_dataset_batches_are_consecutive_slices_and_stop_at_the_data():
    data = torch.utils.data.TensorDataset(torch.arange(10.0).unsqueeze(1), torch.arange(10))
    batches = CalibrationBatches.of_dataset(data, CalibrationConfig(batches=8, batch_size=4))
    assert batches.count == 3  # 10 samples make 3 batches, however many were asked for
    got = [targets.tolist() for _, targets in batches.mine(FakeWorld(0, 1))]
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def saved_statistics(out, ranks: int) -> dict[str, torch.Tensor]:
    merged = {}
    for rank in range(ranks):
        for name, tensor in load_state_file(out / f"rank{rank}.safetensors").items():
            if name in merged:  # input norms and counts are on every rank: they must agree
                assert torch.equal(merged[name], tensor), name
            merged[name] = tensor
    return merged


@pytest.mark.parametrize("batches, sizes", [(7, (1, 2, 3)), (2, (1, 4))], ids=["7-batches", "fewer-batches-than-ranks"])
def test_statistics_are_bit_identical_for_any_world_size(mpirun, mpi4py, tmp_path, batches, sizes):
    """7 batches split 4+3 and 3+2+2; 2 batches on 4 ranks leave two ranks without any. Input norms,
    gradients and SNIP's float64 normaliser come out with the same bits."""
    results = {}
    for ranks in sizes:
        out = tmp_path / f"n{ranks}"
        out.mkdir()
        finished = launch([mpirun, "-n", str(ranks), sys.executable, "-m", "tests.calibration_driver", str(out),
                           str(batches)])
        assert finished.returncode == 0, finished.stderr
        results[ranks] = saved_statistics(out, ranks)
    one = results[1]
    assert any(name.startswith("gradients/") for name in one) and any(name.startswith("input_norms/") for name in one)
    assert int(one["samples/wanda"]) == batches * 48  # batches of 48 of the 512 synthetic training images
    for ranks in sizes[1:]:
        assert sorted(results[ranks]) == sorted(one)
        for name in one:
            assert torch.equal(results[ranks][name], one[name]), (ranks, name)
