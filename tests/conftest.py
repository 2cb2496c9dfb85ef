"""Fixtures shared by the tests. In CI (CI=true) a missing component fails instead of skipping."""

import os
from pathlib import Path

import pytest

from tests.slurm_fixtures import local_slurm  # noqa: F401  (session fixture: the local SLURM)

FASHION_MNIST = Path(os.environ.get("HPCPRUNE_DATA", "/usr/share/datasets/fashion-mnist"))


def missing(component: str, how: str) -> None:
    """Skip on a developer machine; fail in CI, where a skip would hide a broken set-up."""
    message = f"{component} is not available ({how})"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def require_fashion_mnist() -> Path:
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists() and not (FASHION_MNIST / "train-images-idx3-ubyte").exists():
        missing("Fashion-MNIST", "apt-get install dataset-fashion-mnist, or set HPCPRUNE_DATA")
    return FASHION_MNIST
