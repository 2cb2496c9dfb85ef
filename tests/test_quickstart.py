"""The README's main job on real Fashion-MNIST: exact 90 % sparsity, accuracy within 1 pp of dense."""

import h5py
import pytest

from tests.helpers import CONFIGS, complete_rounds, run_cli


@pytest.mark.slow
def test_quickstart_keeps_accuracy_at_exact_sparsity(tmp_path, require_fashion_mnist):
    out = tmp_path / "quickstart.h5"
    finished = run_cli("prune", "--config", str(CONFIGS / "quickstart.yaml"), "--out", str(out), timeout=900)
    assert finished.returncode == 0, finished.stderr
    assert complete_rounds(out) == [1, 2, 3]
    with h5py.File(out, "r") as archive:
        final = archive["rounds/0003"].attrs
        total, kept = int(final["total"]), int(final["kept"])
        dense_accuracy = float(archive["dense"].attrs["accuracy"])
        assert kept == total - round(0.9 * total)
        assert dense_accuracy > 0.85  # a real model on real data, not a degenerate run
        assert float(final["accuracy"]) >= dense_accuracy - 0.01
    assert "90.0000 % achieved" in finished.stdout
