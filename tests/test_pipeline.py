"""End to end through the real CLI: prune -> fine-tune -> archive, resume after SIGKILL, refusals."""

import hashlib
import textwrap

import h5py
import pytest

from tests.helpers import CONFIGS, ROOT, archive_masks, complete_rounds, run_cli

SMOKE = str(CONFIGS / "smoke.yaml")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run.h5"
    finished = run_cli("prune", "--config", SMOKE, "--out", str(out))
    assert finished.returncode == 0, finished.stderr
    return out, finished


def test_run_records_every_round_with_exact_sparsity(smoke_run):
    out, finished = smoke_run
    assert complete_rounds(out) == [1, 2, 3]
    with h5py.File(out, "r") as archive:
        assert archive.attrs["format"] == "hpcprune"
        final = archive["rounds/0003"].attrs
        total = int(final["total"])
        assert int(final["kept"]) == total - round(0.75 * total)  # the requested count, to the element
        assert final["achieved_sparsity"] == pytest.approx(0.75, abs=0.5 / total)
        kept_in_masks = sum(int(archive["rounds/0003/masks"][name].attrs["kept"]) for name in archive["rounds/0003/masks"])
        assert kept_in_masks == int(final["kept"])
        assert 0.0 <= final["accuracy"] <= 1.0 and "accuracy" in archive["dense"].attrs
        assert len(archive["rounds/0003/history"]) == 1
        assert [row["kind"].decode() for row in archive["events"][()]][:2] == ["start", "finish"]
    assert "pruned test accuracy" in finished.stdout and "75.0000 % achieved" in finished.stdout


def test_rounds_are_nested(smoke_run):
    """A weight pruned in one round stays pruned in every later round."""
    import numpy as np

    out, _ = smoke_run
    masks = [archive_masks(out, r) for r in (1, 2, 3)]
    for earlier, later in zip(masks, masks[1:]):
        for name in earlier:
            assert not np.any(np.unpackbits(later[name]) & ~np.unpackbits(earlier[name]))


def test_existing_output_is_never_overwritten_without_force(smoke_run):
    out, _ = smoke_run
    before = hashlib.sha256(out.read_bytes()).hexdigest()
    refused = run_cli("prune", "--config", SMOKE, "--out", str(out))
    assert refused.returncode == 2
    assert "exists" in refused.stderr and "--force" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert hashlib.sha256(out.read_bytes()).hexdigest() == before


def test_resume_with_a_different_config_is_refused(smoke_run):
    out, _ = smoke_run
    before = hashlib.sha256(out.read_bytes()).hexdigest()
    refused = run_cli("prune", "--config", SMOKE, "--out", str(out), "--resume", "--set", "prune.sparsity=0.5")
    assert refused.returncode == 2 and "prune.sparsity" in refused.stderr
    assert hashlib.sha256(out.read_bytes()).hexdigest() == before


KILL_AFTER_FIRST_ROUND = textwrap.dedent(
    """
    import os, signal, sys
    import hpcprune.archive.writer as archive
    original = archive.Archive.mark_checkpoint
    def mark_then_die(self, round_index, *args, **kwargs):
        original(self, round_index, *args, **kwargs)
        if round_index == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # a real kill, right after round 1 is recorded
    archive.Archive.mark_checkpoint = mark_then_die
    from hpcprune.cli import main
    sys.argv = ["hpcprune"] + sys.argv[1:]
    main()
    """
)


def test_killed_run_resumes_to_the_same_masks(smoke_run, tmp_path):
    reference, _ = smoke_run
    out = tmp_path / "killed.h5"
    killer = tmp_path / "kill_after_round_one.py"
    killer.write_text(KILL_AFTER_FIRST_ROUND)
    import os
    import subprocess
    import sys

    killed = subprocess.run([sys.executable, str(killer), "prune", "--config", SMOKE, "--out", str(out)],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert killed.returncode == -9, killed.stderr
    assert complete_rounds(out) == [1]

    resumed = run_cli("prune", "--config", SMOKE, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert complete_rounds(out) == [1, 2, 3]
    for round_index in (1, 2, 3):
        mine, theirs = archive_masks(out, round_index), archive_masks(reference, round_index)
        assert mine.keys() == theirs.keys()
        assert all((mine[name] == theirs[name]).all() for name in mine)
    with h5py.File(out, "r") as a, h5py.File(reference, "r") as b:
        assert a["rounds/0003"].attrs["accuracy"] == b["rounds/0003"].attrs["accuracy"]
        events = [(row["kind"].decode(), row["detail"].decode()) for row in a["events"][()]]
    assert [kind for kind, _ in events] == ["start", "resume", "finish"]  # the kill left no "finish"
    assert events[1][1].startswith("after round 1")


def test_resume_of_a_finished_run_changes_nothing(smoke_run):
    out, _ = smoke_run
    again = run_cli("prune", "--config", SMOKE, "--out", str(out), "--resume")
    assert again.returncode == 0, again.stderr
    assert complete_rounds(out) == [1, 2, 3]


def test_force_overwrites(tmp_path):
    out = tmp_path / "run.h5"
    out.write_bytes(b"old")
    done = run_cli("prune", "--config", str(CONFIGS / "oneshot_global.yaml"), "--out", str(out), "--force", "-q")
    assert done.returncode == 0, done.stderr
    assert complete_rounds(out) == [1]


@pytest.mark.parametrize("args, fragment", [
    (["--set", "prune.sparsity=1.5"], "prune.sparsity"),
    (["--set", "prune.nonsense=1"], "prune.nonsense: unknown key"),
    (["--set", "data.dataset=fashion-mnist", "--set", "data.path=/nonexistent/fmnist"], "dataset-fashion-mnist"),
    (["--set", "model.name=nosuchmodel"], "nosuchmodel"),
    (["--set", "model.checkpoint=/nonexistent/model.safetensors"], "/nonexistent/model.safetensors"),
    (["--resume", "--force"], "--resume and --force"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, fragment):
    out = tmp_path / "run.h5"
    refused = run_cli("prune", "--config", str(CONFIGS / "oneshot_global.yaml"), "--out", str(out), *args)
    assert refused.returncode == 2, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpcprune: error:") and fragment in lines[0]
    assert not out.exists()


def test_help_and_module_entry_point():
    shown = run_cli("prune", "--help")
    assert shown.returncode == 0 and "--resume" in shown.stdout and "Examples" in shown.stdout
    assert run_cli("--version").stdout.strip().startswith("hpcprune")


def test_inspect_prints_rounds_and_layers(smoke_run):
    out, _ = smoke_run
    shown = run_cli("inspect", str(out))
    assert shown.returncode == 0, shown.stderr
    assert "fc1.weight" in shown.stdout and "75.00" in shown.stdout
