"""A folder with a finished run, copied fresh for each test, and the check that a refused command changed nothing.

The fixtures are registered for every test module by tests/conftest.py.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from tests.helpers import CONFIGS, run_cli

SMOKE = CONFIGS / "smoke.yaml"


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    """A folder with a finished 3-round run: run.h5, run.h5.states/, run.h5.masks/, and a copy of its config."""
    folder = tmp_path_factory.mktemp("finished")
    shutil.copy(SMOKE, folder / "smoke.yaml")
    done = run_cli("prune", "--config", str(folder / "smoke.yaml"), "--out", str(folder / "run.h5"), "-q")
    assert done.returncode == 0, done.stderr
    return folder


@pytest.fixture
def workspace(finished_run, tmp_path) -> Path:
    folder = tmp_path / "work"
    shutil.copytree(finished_run, folder)
    return folder


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with the SHA-256 of its bytes."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def refused(folder: Path, *args: str, fragment: str, env: dict | None = None) -> str:
    """Run `hpcprune ARGS` in `folder`: exit 2, one `hpcprune: error:` line naming `fragment`, no file changed."""
    before = snapshot(folder)
    result = run_cli(*args, env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("hpcprune: error:"), result.stderr
    assert fragment in lines[0], lines[0]
    assert snapshot(folder) == before
    return lines[0]
