"""`hpcprune submit` without SLURM: submitit's local cluster runs the tasks as ranks on this machine,
and what the user got wrong is refused before anything is submitted."""

from __future__ import annotations

import pytest

from tests.helpers import CONFIGS, assert_same_masks, run_cli

ONESHOT = str(CONFIGS / "oneshot_global.yaml")


pytestmark = pytest.mark.usefixtures("submitit")  # tests/conftest.py: skips (in CI fails) without submitit


def test_local_cluster_with_two_tasks_gives_the_single_process_masks(tmp_path):
    single = run_cli("prune", "--config", ONESHOT, "--out", str(tmp_path / "single.h5"), "-q")
    assert single.returncode == 0, single.stderr
    done = run_cli("submit", "--config", ONESHOT, "--out", str(tmp_path / "local.h5"), "--cluster", "local",
                   "--tasks-per-node", "2", "--wait", env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"archive {tmp_path / 'local.h5'}" in done.stdout and "80.0000 % achieved" in done.stdout
    assert_same_masks(tmp_path / "local.h5", tmp_path / "single.h5", rounds=(1,))


@pytest.mark.parametrize("flags, message", [
    ((), "exists; pass --resume to continue it or --force to overwrite"),
    (("--resume", "--force"), "--resume and --force contradict each other"),
    (("--set", "prune.sparsity=2"), "prune.sparsity"),
])
def test_mistakes_are_refused_before_submitting(tmp_path, flags, message):
    archive = tmp_path / "run.h5"
    archive.write_bytes(b"an earlier run")
    done = run_cli("submit", "--config", ONESHOT, "--out", str(archive), "--cluster", "local", *flags)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert archive.read_bytes() == b"an earlier run"
    assert not (tmp_path / "run.h5.logs").exists(), "nothing was submitted"
