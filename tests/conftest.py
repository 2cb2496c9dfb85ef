"""Fixtures shared by the tests. In CI (CI=true) a missing component fails instead of skipping."""

import importlib
import os
import shutil
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


def require_module(module: str, component: str, how: str) -> None:
    """Import `module`, or call missing(component, how)."""
    try:
        importlib.import_module(module)
    except ImportError:
        missing(component, how)


@pytest.fixture
def require_fashion_mnist() -> Path:
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists() and not (FASHION_MNIST / "train-images-idx3-ubyte").exists():
        missing("Fashion-MNIST", "apt-get install dataset-fashion-mnist, or set HPCPRUNE_DATA")
    return FASHION_MNIST


@pytest.fixture(scope="session")
def mpirun() -> str:
    """The path of Open MPI's launcher (session-wide, so that fixtures of any scope can use it)."""
    launcher = shutil.which("mpirun")
    if launcher is None:
        missing("mpirun", "apt-get install openmpi-bin libopenmpi-dev")
    return launcher


@pytest.fixture(scope="session")
def mpi4py() -> None:
    """mpi4py, through which hpcprune's ranks talk under mpirun."""
    require_module("mpi4py", "mpi4py", "pip install mpi4py")


@pytest.fixture(scope="session")
def submitit() -> None:
    """submitit, through which hpcprune submits to SLURM (or to its local cluster)."""
    require_module("submitit", "submitit", "pip install -e '.[slurm]'")
