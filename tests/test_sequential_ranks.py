"""The block-sequential pipeline under real launchers: masks, SparseGPT's updated weights,
reconstruction errors and perplexities bit-identical for 1 process, mpirun -n 2 and -n 3 and
torchrun, with window counts that do not divide evenly and fewer windows than ranks.

    python -m pytest -q tests/test_sequential_ranks.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import h5py
import pytest

from hpcprune import registry
from hpcprune.archive.blocks import round_tables
from tests.helpers import assert_same_masks, launch, torchrun, updated_weights

CASES = [
    "llama-wanda-row:llama:",  # 7 calibration windows: 4 + 3 on two ranks, 3 + 2 + 2 on three
    "llama-two-windows:llama:calibration.samples=2;eval.sequence_length=64",  # a rank of three without windows
    "llama-dense-spilled:gemma_tied:sequential.propagate=dense;sequential.activation_budget_mb=0.01",
    "opt-magnitude-layer:opt:prune.criterion=magnitude;prune.rule=layer",
    "bert-wanda-nm:bert:prune.rule=nm;prune.n=2;prune.m=4",
    "llama-sparsegpt-row:llama:prune.criterion=sparsegpt;sparsegpt.block_size=24",  # lazy blocks of 24 inputs
    # Windows in groups of 2 (4 groups of 7 windows): 0, 1, 4, 5 + 2, 3, 6 on two ranks; 0, 1, 6 + 2, 3 + 4, 5 on three.
    "llama-sparsegpt-grouped:llama:prune.criterion=sparsegpt;sparsegpt.block_size=24;sequential.window_group=2",
    "opt-sparsegpt-nm:opt:prune.criterion=sparsegpt;prune.rule=nm;prune.n=2;prune.m=4;sparsegpt.block_size=16",
    # Two layers left, three ranks: the gate projection's 288 rows are solved in two ranges on two ranks.
    "wide-sparsegpt-split:llama_wide:prune.criterion=sparsegpt;prune.exclude=['*.self_attn.*','*.down_proj.weight']",
    "gpt2-sparsegpt-row:gpt2:prune.criterion=sparsegpt;sparsegpt.block_size=16",  # Conv1D: weights stored in x out
]
UPDATES_WEIGHTS = ("llama-sparsegpt-row", "llama-sparsegpt-grouped", "opt-sparsegpt-nm", "wide-sparsegpt-split", "gpt2-sparsegpt-row")
FIGURES = ("kept", "achieved_sparsity", "eval_metric", "eval_dense", "eval_pruned", "blocks")


def driver(root: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "tests.sequential_driver", str(root), str(out), *CASES]


@pytest.fixture(scope="module")
def folders_root(tiny_folders) -> Path:
    return tiny_folders.llama.parent


@pytest.fixture(scope="module")
def one_process(folders_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("size1")
    finished = launch(driver(folders_root, out))
    assert finished.returncode == 0, finished.stderr
    return out


def figures(path: Path) -> dict:
    with h5py.File(path, "r") as archive:
        attrs = archive["rounds/0001"].attrs
        return {key: attrs[key].item() if hasattr(attrs[key], "item") else attrs[key] for key in FIGURES}


def assert_same_runs(mine: Path, reference: Path) -> None:
    for case in CASES:
        name = case.partition(":")[0]
        ours, theirs = mine / f"{name}.h5", reference / f"{name}.h5"
        assert_same_masks(ours, theirs)
        weights = updated_weights(ours)
        assert weights == updated_weights(theirs), name
        assert bool(weights) == (name in UPDATES_WEIGHTS), name
        assert figures(ours) == figures(theirs), name  # the exact sums: the same float64 bits
        errors = [[(row["name"], row["error"]) for row in round_tables(path, 1)["reconstruction"]] for path in (ours, theirs)]
        assert str(errors[0]) == str(errors[1]), name  # str: NaN equals NaN


def test_the_cases_cover_every_block_criterion_and_rule():
    """A criterion or rule added to the sequential pipeline cannot skip the world-size comparison."""
    settings = [dict(item.split("=", 1) for item in case.split(":", 2)[2].split(";") if item) for case in CASES]
    assert set(registry.BLOCK_CRITERIA) <= {case.get("prune.criterion", "wanda") for case in settings}
    assert set(registry.BLOCK_RULES) <= {case.get("prune.rule", "row") for case in settings}


def test_the_cases_measure_what_they_claim(one_process):
    assert figures(one_process / "llama-wanda-row.h5")["eval_metric"] == "perplexity"
    assert figures(one_process / "bert-wanda-nm.h5")["eval_metric"] == "cosine"
    assert figures(one_process / "llama-two-windows.h5")["achieved_sparsity"] == 0.5


@pytest.mark.parametrize("ranks", [2, 3])
def test_masks_and_figures_are_bit_identical_under_mpirun(mpirun, mpi4py, folders_root, one_process, tmp_path, ranks):
    finished = launch([mpirun, "-n", str(ranks), *driver(folders_root, tmp_path)])
    assert finished.returncode == 0, finished.stderr
    assert_same_runs(tmp_path, one_process)
    with h5py.File(tmp_path / "llama-wanda-row.h5", "r") as archive:
        assert archive.attrs["world_size"] == ranks and archive.attrs["backend"] == "mpi"


def test_masks_and_figures_are_bit_identical_under_torchrun(folders_root, one_process, tmp_path):
    finished = launch(torchrun(2, *driver(folders_root, tmp_path)[1:]))
    assert finished.returncode == 0, finished.stderr
    assert_same_runs(tmp_path, one_process)
    with h5py.File(tmp_path / "llama-wanda-row.h5", "r") as archive:
        assert archive.attrs["backend"] == "torch"
