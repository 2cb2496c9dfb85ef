"""Fixtures shared by the tests. In CI (CI=true) a missing component fails instead of skipping."""

import importlib
import importlib.util
import os
import shutil
from pathlib import Path

import pytest

from tests import llm_folders
from tests.finished_run import finished_run, workspace  # noqa: F401  (a finished run, copied for each test)
from tests.mounts import mounted  # noqa: F401  (tmpfs mounts with limits)
from tests.slurm_fixtures import local_slurm  # noqa: F401  (session fixture: the local SLURM)
from tests.tiny_llm import tiny_folders  # noqa: F401  (session fixture: tiny Hugging Face folders)

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


# --- Hugging Face model folders and texts (tests/llm_folders.py) -----------------------------------


@pytest.fixture(scope="session")
def llm_folder(tmp_path_factory):
    """llm_folder(kind, dtype="float32", sharded=False, layers=3) -> a tiny random folder of that
    architecture (llm_folders.KINDS), built once per session for each variant."""
    require_module("transformers", "transformers", "pip install 'hpcprune[hf]'")
    built: dict[tuple, Path] = {}

    def folder(kind: str, dtype: str = "float32", sharded: bool = False, layers: int = 3) -> Path:
        key = (kind, dtype, sharded, layers)
        if key not in built:
            name = f"{kind}-{dtype}-{'sharded' if sharded else 'single'}-{layers}"
            built[key] = llm_folders.build_folder(kind, tmp_path_factory.mktemp(name), dtype=dtype,
                                                  sharded=sharded, layers=layers)
        return built[key]
    return folder


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """400 lines of English-like sentences (llm_folders.corpus_text), the text the tiny tokenizers know."""
    return llm_folders.write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The SmolLM2-135M-Instruct folder (tests/build_smollm2.py), built here if tests/run.sh has not."""
    from tests import build_smollm2

    if not build_smollm2.is_complete(llm_folders.SMOLLM2):
        for module in ("transformers", "gguf", "accelerate"):
            require_module(module, "SmolLM2-135M", build_smollm2.INSTALL)
        if importlib.util.find_spec(build_smollm2.PACKAGE) is None:
            missing("SmolLM2-135M", build_smollm2.INSTALL)
        build_smollm2.build(llm_folders.SMOLLM2)
    return llm_folders.SMOLLM2


@pytest.fixture(scope="session")
def english_texts() -> tuple[Path, Path]:
    """(calibration.txt, eval.txt) from the Python documentation (tests/build_texts.py)."""
    from tests import build_texts

    if not build_texts.SOURCES.is_dir() and not (llm_folders.TEXTS / build_texts.MANIFEST).is_file():
        missing("the English texts", f"apt-get install {build_texts.PACKAGE}")
    build_texts.build(llm_folders.TEXTS)
    return llm_folders.TEXTS / "calibration.txt", llm_folders.TEXTS / "eval.txt"
