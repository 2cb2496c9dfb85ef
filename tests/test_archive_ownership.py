"""An archive's files are its own, through the real CLI: side folders named after its full name, no
command writing over its own inputs, one writer at a time, `--force` that keeps the old run until
the new one has recorded a step, refused exports that leave nothing, damaged archives refused, and
the leftovers of killed runs removed by the next run. Each refusal: exit 2, one line naming the
culprit, every file unchanged (tests.finished_run.refused)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcprune.archive.reader import open_archive
from tests.finished_run import refused, snapshot
from tests.helpers import (
    CONFIGS,
    ROOT,
    archive_masks,
    assert_same_masks,
    damage,
    mpi_env,
    run_cli,
)
from tests.mounts import remount
from tests.test_reliability_crash import assert_consistent, assert_same_run, crash_run

ONESHOT = str(CONFIGS / "oneshot_global.yaml")  # LeNet-5, one round, no training: a run of seconds


def resume(folder: Path, *args: str) -> tuple[str, ...]:
    return ("prune", "--config", str(folder / "smoke.yaml"), "--out", str(folder / "run.h5"), "--resume", *args)


# --- side files: named after the archive's full name ------------------------------------------------


def test_archives_whose_names_share_a_stem_keep_their_own_files(tmp_path):
    """run.h5 killed after round 1, then run.hdf5 beside it run whole: run.h5's files are untouched and
    it resumes to the run never killed (format 1 gave both `run.states/`)."""
    reference = tmp_path / "reference" / "run.h5"
    assert crash_run(reference).returncode == 0
    ours, theirs = tmp_path / "ws" / "run.h5", tmp_path / "ws" / "run.hdf5"
    assert crash_run(ours, kill="mark_checkpoint:1").returncode == -9
    before = snapshot(ours.parent)
    done = crash_run(theirs, "--set", "seed=8")
    assert done.returncode == 0, done.stderr
    after = snapshot(ours.parent)
    assert {name: digest for name, digest in after.items() if name in before} == before
    assert {name.split("/")[0] for name in after} - {name.split("/")[0] for name in before} == \
        {"run.hdf5", "run.hdf5.states", "run.hdf5.masks"}
    resumed = crash_run(ours, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(ours, reference)


# --- no command writes over one of its own inputs -------------------------------------------------------


@pytest.mark.parametrize("command", [
    lambda ws: ["export", str(ws / "run.h5"), "--format", "masked", "--out", str(ws / "run.h5"), "--force"],
    lambda ws: ["export", str(ws / "run.h5"), "--format", "masked", "--out", str(ws / "run.h5.states" / "x.safetensors")],
    lambda ws: ["export", str(ws / "run.h5"), "--format", "sparse", "--out",
                str(ws / "run.h5.states" / "round-0003.safetensors"), "--force"],
    lambda ws: ["inspect", "masks", str(ws / "run.h5"), "--out", str(ws / "run.h5"), "--force"],
    lambda ws: ["inspect", "masks", str(ws / "run.h5"), "--out", str(ws / "run.h5.masks" / "m.safetensors")],
    lambda ws: ["report", str(ws / "run.h5"), "--out", str(ws / "run.h5"), "--force"],
    lambda ws: ["report", str(ws / "run.h5"), "--out", str(ws / "link.h5"), "--force"],  # a symlink to the archive
    lambda ws: ["inspect", "plot", str(ws / "run.h5"), "--out", str(ws / "run.h5"), "--force"],
    lambda ws: ["inspect", "plot", str(ws / "run.h5"), "--out", str(ws / "run.h5.states")],
    lambda ws: ["prune", "--config", str(ws / "smoke.yaml"), "--out", str(ws / "smoke.yaml"), "--force"],
], ids=["export-archive", "export-states", "export-state-file", "masks-archive", "masks-folder", "report-archive",
        "report-link", "plot-archive", "plot-states", "prune-config"])
def test_no_command_writes_over_its_own_inputs(workspace, command):
    (workspace / "link.h5").symlink_to(workspace / "run.h5")
    args = command(workspace)
    out = Path(args[args.index("--out") + 1])
    line = refused(workspace, *args, fragment=f"{'output.path' if args[0] == 'prune' else '--out'} {out}:")
    assert "write the output elsewhere" in line


# --- one writer at a time ----------------------------------------------------------------------------------


def held_run(out: Path, release: Path, *settings: str, resume: bool = False) -> subprocess.Popen:
    """`hpcprune prune` of ONESHOT that, once it holds the archive, waits at its first event until `release` exists."""
    flags = ["--resume"] if resume else ["--force"]
    command = [sys.executable, "-m", "tests.crash_points", "prune", "--config", ONESHOT, "--out", str(out), "-q",
               *(arg for setting in settings for arg in ("--set", setting)), *flags]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=mpi_env(HPCPRUNE_TEST_HOLD="event:1", HPCPRUNE_TEST_HOLD_UNTIL=str(release)))


def wait_until_held(writer: subprocess.Popen, release: Path) -> None:
    """Until the writer is at its hold point: it holds the archive and has written what comes before."""
    while not Path(f"{release}.held").exists():
        assert writer.poll() is None, writer.communicate()
        time.sleep(0.05)


def first_to_end(processes: list[subprocess.Popen], timeout: float = 180) -> subprocess.Popen:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                return process
        time.sleep(0.05)
    raise AssertionError("neither writer ended: both hold the archive, or one hangs")


@pytest.fixture(scope="module")
def oneshot_references(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("references")
    references = {}
    for sparsity in ("0.5", "0.8"):
        references[sparsity] = folder / f"{sparsity}.h5"
        done = run_cli("prune", "--config", ONESHOT, "--out", str(references[sparsity]), "-q",
                       "--set", f"prune.sparsity={sparsity}")
        assert done.returncode == 0, done.stderr
    return references


@pytest.fixture(scope="module")
def unfinished_oneshot(tmp_path_factory, oneshot_references) -> Path:
    """ONESHOT at sparsity 0.5, killed before its round was complete: what two resumes race to continue."""
    out = tmp_path_factory.mktemp("unfinished") / "run.h5"
    command = [sys.executable, "-m", "tests.crash_points", "prune", "--config", ONESHOT, "--out", str(out), "-q",
               "--set", "prune.sparsity=0.5"]
    killed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=mpi_env(HPCPRUNE_TEST_KILL="commit:1"))
    assert killed.returncode == -9, killed.stderr
    assert open_archive(out).rounds() == []
    return out


# Ten races of two `--force` writers (the count); the `--resume` race takes the same lock
# through the same code, so three of those keep the suite within its time on two cores.
RACES = {"--force": 10, "--resume": 3}


@pytest.mark.parametrize("flag", RACES)
def test_two_writers_started_together_one_runs_and_the_other_is_refused_each_time(tmp_path, oneshot_references,
                                                                                unfinished_oneshot, flag):
    """Two `--force` runs of different configs, or two `--resume` of an unfinished run, started together."""
    winners = []
    for attempt in range(RACES[flag]):
        release = tmp_path / f"release-{attempt}"
        if flag == "--force":
            out = tmp_path / "run.h5"
            writers = {held_run(out, release, f"prune.sparsity={sparsity}"): sparsity for sparsity in ("0.5", "0.8")}
        else:
            out = copy_of(unfinished_oneshot, tmp_path / f"attempt-{attempt}")
            writers = {held_run(out, release, "prune.sparsity=0.5", resume=True): "0.5" for _ in range(2)}
        loser = first_to_end(list(writers))
        (winner,) = [process for process in writers if process is not loser]
        release.touch()
        _, errors = loser.communicate(timeout=60)
        winner.communicate(timeout=300)
        lines = errors.strip().splitlines()
        assert loser.returncode == 2 and len(lines) == 1, errors
        assert lines[0].startswith(f"hpcprune: error: {out} is in use by pid {winner.pid} on {socket.gethostname()} "
                                   f"since "), lines[0]
        assert winner.returncode == 0
        reader = open_archive(out)  # validates: format, structure against the plan, every mask's shape
        assert reader.attrs["format_version"] == 2
        sparsity = writers[winner]
        assert f"sparsity: {sparsity}" in reader.config_yaml
        assert_same_masks(out, oneshot_references[sparsity])  # its masks are those of its own config
        assert not Path(f"{out}.lock").exists()
        winners.append(sparsity)
    assert len(winners) == RACES[flag]


def test_a_resume_or_an_export_during_a_live_run_is_refused_and_readers_still_read(tmp_path):
    out = tmp_path / "run.h5"
    assert run_cli("prune", "--config", ONESHOT, "--out", str(out), "-q").returncode == 0
    release = tmp_path / "release"
    writer = held_run(out, release, resume=True)
    try:
        wait_until_held(writer, release)
        before = snapshot(tmp_path)
        for args in (("prune", "--config", ONESHOT, "--out", str(out), "--resume"),
                     ("prune", "--config", ONESHOT, "--out", str(out), "--force"),
                     ("export", str(out), "--format", "masked", "--out", str(tmp_path / "model.safetensors"))):
            done = run_cli(*args)
            lines = done.stderr.strip().splitlines()
            assert done.returncode == 2 and len(lines) == 1, done.stderr
            assert f"{out} is in use by pid {writer.pid} on {socket.gethostname()} since " in lines[0]
        assert run_cli("inspect", str(out)).returncode == 0  # readers need no lock
        assert snapshot(tmp_path) == before
    finally:
        release.touch()
        writer.communicate(timeout=300)
    assert writer.returncode == 0


# --- --force replaces the old run only once the new one has recorded a step ------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two finished runs of the crash tests' small config, seed 7 (the archive to replace) and seed 8."""
    folder = tmp_path_factory.mktemp("runs")
    finished = {}
    for seed in ("7", "8"):
        finished[seed] = folder / seed / "run.h5"
        done = crash_run(finished[seed], "--set", f"seed={seed}")
        assert done.returncode == 0, done.stderr
    return finished


def copy_of(path: Path, folder: Path) -> Path:
    from tests.inspect_runs import copy_run

    return copy_run(path, folder)


@pytest.mark.parametrize("kill", ["create:1", "save_state:1", "commit:1"])
def test_a_forced_run_killed_before_its_first_step_leaves_the_old_archive_whole(runs, tmp_path, kill):
    out = copy_of(runs["7"], tmp_path / "ws")
    before = snapshot(out.parent)
    killed = crash_run(out, "--set", "seed=8", "--force", kill=kill)
    assert killed.returncode == -9, killed.stderr
    after = snapshot(out.parent)
    assert {name: digest for name, digest in after.items() if name in before} == before
    resumed = crash_run(out, "--set", "seed=7", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(out, runs["7"])
    assert leftovers(out) == []  # what the killed run left was removed by the resume


def test_a_forced_run_killed_after_its_first_step_has_replaced_the_old_run(runs, tmp_path):
    out = copy_of(runs["7"], tmp_path / "ws")
    killed = crash_run(out, "--set", "seed=8", "--force", kill="mark_checkpoint:1")
    assert killed.returncode == -9, killed.stderr
    assert_consistent(out)
    assert "seed: 8" in open_archive(out).config_yaml and open_archive(out).side.states_name == "run.h5.states.2"
    assert not (out.parent / "run.h5.states").exists() and not (out.parent / "run.h5.masks").exists()
    resumed = crash_run(out, "--set", "seed=8", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(out, runs["8"])
    assert leftovers(out) == []


def leftovers(out: Path) -> list[str]:
    """Temporaries, and side folders of another generation than the archive's."""
    side = open_archive(out).side
    names = [entry.name for entry in out.parent.iterdir()]
    stale = [name for name in names if name.startswith(f"{out.name}.") and name.split(".")[2] in ("states", "masks")
             and name not in (side.states_name, side.masks_name)]
    return stale + [str(path) for path in out.parent.rglob("*.tmp")]


# --- a block-sequential run owns its archive the same way ------------------------------------------------


@pytest.fixture(scope="module")
def sequential_run(tiny_folders, tmp_path_factory) -> Path:
    """A finished block-sequential run of the tiny LLaMA (3 blocks, Wanda 50 %): the archive to replace."""
    from tests.test_sequential_crash import crash_run as sequential_crash_run

    out = tmp_path_factory.mktemp("sequential") / "llm.h5"
    done = sequential_crash_run(tiny_folders, out)
    assert done.returncode == 0, done.stderr
    return out


def test_a_second_writer_of_a_live_sequential_run_is_refused_naming_it(tiny_folders, tmp_path):
    """The run holds its archive from the start to the end, between blocks too."""
    from tests.test_sequential_crash import sequential_args

    out, release = tmp_path / "llm.h5", tmp_path / "release"
    command = [sys.executable, "-m", "tests.crash_points", "prune", *sequential_args(tiny_folders, out)]
    writer = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=mpi_env(HPCPRUNE_TEST_HOLD="record_block:1", HPCPRUNE_TEST_HOLD_UNTIL=str(release)))
    try:
        wait_until_held(writer, release)  # block 0 recorded, block 1 not begun
        before = snapshot(tmp_path)
        for flag in ("--resume", "--force"):
            done = run_cli("prune", *sequential_args(tiny_folders, out), flag)
            lines = done.stderr.strip().splitlines()
            assert done.returncode == 2 and len(lines) == 1, done.stderr
            assert lines[0].startswith(f"hpcprune: error: {out} is in use by pid {writer.pid} on "
                                       f"{socket.gethostname()} since "), lines[0]
        assert snapshot(tmp_path) == before
    finally:
        release.touch()
        writer.communicate(timeout=300)
    assert writer.returncode == 0
    assert open_archive(out).rounds()[0]["blocks"] == 3 and not Path(f"{out}.lock").exists()


# Where the archive is created the two pipelines share the code (test_a_forced_run_killed_before...
# kills there); these are the block-sequential pipeline's own points before its first block is recorded.
@pytest.mark.parametrize("kill", ["block_forward:1", "write_mask:1"])
def test_a_forced_sequential_run_killed_before_its_first_block_leaves_the_old_archive_whole(
        tiny_folders, sequential_run, tmp_path, kill):
    from tests.test_sequential_crash import crash_run as sequential_crash_run
    from tests.test_sequential_crash import run_facts

    out = copy_of(sequential_run, tmp_path / "ws")
    before = snapshot(out.parent)
    killed = sequential_crash_run(tiny_folders, out, "--force", "--set", "prune.sparsity=0.7", kill=kill)
    assert killed.returncode == -9, killed.stderr
    after = snapshot(out.parent)
    assert {name: digest for name, digest in after.items() if name in before} == before
    assert run_facts(out) == run_facts(sequential_run)
    resumed = sequential_crash_run(tiny_folders, out, "--resume")  # the old run, finished: nothing to do
    assert resumed.returncode == 0, resumed.stderr
    assert run_facts(out) == run_facts(sequential_run) and leftovers(out) == []


def test_a_forced_sequential_run_replaces_the_old_one_once_its_first_block_is_recorded(
        tiny_folders, sequential_run, tmp_path):
    from tests.test_sequential_crash import crash_run as sequential_crash_run
    from tests.test_sequential_crash import run_facts

    reference = tmp_path / "reference" / "llm.h5"
    assert sequential_crash_run(tiny_folders, reference, "--set", "prune.sparsity=0.7").returncode == 0
    out = copy_of(sequential_run, tmp_path / "ws")
    killed = sequential_crash_run(tiny_folders, out, "--force", "--set", "prune.sparsity=0.7", kill="record_block:1")
    assert killed.returncode == -9, killed.stderr
    reader = open_archive(out)
    assert "sparsity: 0.7" in reader.config_yaml and reader.side.masks_name == "llm.h5.masks.2"
    assert [row["block"] for row in reader.blocks(1)] == [0]
    assert not (out.parent / "llm.h5.masks").exists()  # the replaced run's files went with it
    resumed = sequential_crash_run(tiny_folders, out, "--resume", "--set", "prune.sparsity=0.7")
    assert resumed.returncode == 0, resumed.stderr
    assert run_facts(out) == run_facts(reference) and leftovers(out) == []


# --- a refused export leaves nothing behind -------------------------------------------------------------


def test_an_export_of_an_archive_in_a_read_only_folder_is_refused_before_it_writes(mounted, runs, tmp_path):
    folder = mounted("size=16m")
    archive = copy_of(runs["7"], folder)
    remount(folder, "ro")
    exports = tmp_path / "exports"
    exports.mkdir()
    before = snapshot(folder)
    done = run_cli("export", str(archive), "--format", "masked", "--out", str(exports / "model.safetensors"))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith(f"hpcprune: error: cannot lock {archive}: ") and "Read-only file system" in lines[0]
    assert list(exports.iterdir()) == [] and snapshot(folder) == before


def test_an_export_whose_record_fails_leaves_no_file(oneshot_references, tmp_path, monkeypatch):
    """Recording into the archive fails after the file is written (a full disk, say): the file goes too."""
    from hpcprune.archive.writer import Archive
    from hpcprune.deploy.export import export
    from hpcprune.errors import UsageError

    archive = tmp_path / "run.h5"
    archive.write_bytes(oneshot_references["0.8"].read_bytes())
    for folder in ("0.8.h5.states", "0.8.h5.masks"):
        shutil.copytree(oneshot_references["0.8"].parent / folder, tmp_path / folder)
    before = snapshot(tmp_path)

    def full_disk(self, attrs):
        raise UsageError(f"cannot write {self.path}: No space left on device")

    monkeypatch.setattr(Archive, "write_export", full_disk)
    out = tmp_path / "exports" / "model.safetensors"
    with pytest.raises(UsageError, match="No space left on device"):
        export(archive, fmt="masked", out=out)
    assert not out.exists() and list(out.parent.iterdir()) == [] and snapshot(tmp_path) == before
    assert Archive.held(archive) is None and not Path(f"{archive}.lock").exists()


# --- damaged archives are refused ---------------------------------------------------------------------------


READERS = {  # every command that reads an archive, on a workspace's run.h5
    "inspect": lambda ws: ["inspect", str(ws / "run.h5")],
    "layers": lambda ws: ["inspect", "layers", str(ws / "run.h5")],
    "masks": lambda ws: ["inspect", "masks", str(ws / "run.h5"), "--out", str(ws / "m.safetensors")],
    "diff": lambda ws: ["inspect", "diff", str(ws / "run.h5"), str(ws / "run.h5")],
    "plot": lambda ws: ["inspect", "plot", str(ws / "run.h5"), "--out", str(ws / "plots")],
    "report": lambda ws: ["report", str(ws / "run.h5"), "--out", str(ws / "run.html")],
    "export": lambda ws: ["export", str(ws / "run.h5"), "--format", "masked", "--out", str(ws / "m.safetensors")],
}
DAMAGES = {"round": (2, "round 2 is missing (round 3 is recorded as complete)"),
           "mask": (3, "round 3 has no mask of fc1.weight"),
           "shape": (3, "round 3: mask fc1.weight has shape 784x300, where /model/params plans 300x784")}


@pytest.mark.parametrize("how", DAMAGES)
def test_every_reader_refuses_a_damaged_archive_in_one_line(workspace, how, capsys, monkeypatch):
    """The CLI's entry point in this process (a reader starts in seconds, and there are many)."""
    from tests.inspect_runs import run_main

    index, finding = DAMAGES[how]
    damage(workspace / "run.h5", how, index)
    before = snapshot(workspace)
    for reader, command in READERS.items():
        status, _, errors = run_main(command(workspace), capsys, monkeypatch)
        lines = errors.strip().splitlines()
        assert status == 2 and len(lines) == 1, (reader, errors)
        assert lines[0] == f"hpcprune: error: {workspace / 'run.h5'} is damaged: {finding}", (reader, lines[0])
    assert snapshot(workspace) == before


@pytest.mark.parametrize("how", DAMAGES)
def test_a_resume_of_a_damaged_archive_is_refused_in_one_line(workspace, how):
    index, finding = DAMAGES[how]
    damage(workspace / "run.h5", how, index)
    refused(workspace, *resume(workspace), fragment=f"{workspace / 'run.h5'} is damaged: {finding}")


# --- leftovers of killed runs --------------------------------------------------------------------------------


def test_the_next_run_removes_what_killed_runs_left_of_its_archive_only(workspace):
    side_states, side_masks = workspace / "run.h5.states", workspace / "run.h5.masks"
    ours = [workspace / ".run.h5.a1b2c3d4.tmp", side_states / ".round-0004.safetensors.x9y8z7.tmp",
            side_masks / ".round-0004.part-0000.h5.q1w2e3.tmp", workspace / "run.h5.states.2" / "dense.safetensors"]
    theirs = [workspace / ".other.h5.a1b2c3d4.tmp", workspace / ".model.safetensors.a1b2c3d4.tmp"]
    for leftover in ours + theirs:
        leftover.parent.mkdir(exist_ok=True)
        leftover.write_bytes(b"left by a SIGKILL")
    done = run_cli(*resume(workspace))
    assert done.returncode == 0, done.stderr
    assert [path for path in ours if path.exists()] == [] and not (workspace / "run.h5.states.2").exists()
    assert all(path.exists() for path in theirs)
    assert archive_masks(workspace / "run.h5", 3)  # the run itself is whole


@pytest.mark.parametrize("kill", ["save_state:1", "write_mask:1"])
def test_a_new_run_over_an_archive_removes_the_temporaries_a_sigkill_left(runs, tmp_path, kill):
    """Killed mid-write (a state file, a part file under its temporary name), then `--force`: none is left."""
    out = tmp_path / "ws" / "run.h5"
    killed = crash_run(out, "--set", "seed=7", kill=kill)
    assert killed.returncode == -9, killed.stderr
    assert list(out.parent.rglob("*.tmp")), "the kill left no temporary: the test kills at the wrong moment"
    done = crash_run(out, "--set", "seed=8", "--force")
    assert done.returncode == 0, done.stderr
    assert_same_run(out, runs["8"])
    assert leftovers(out) == []


def test_the_lock_file_holds_the_writer_and_goes_with_it(workspace):
    release = workspace / "release"
    writer = subprocess.Popen([sys.executable, "-m", "tests.crash_points", *resume(workspace, "-q")], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "HPCPRUNE_TEST_HOLD": "event:1",
                                   "HPCPRUNE_TEST_HOLD_UNTIL": str(release)})
    lock = workspace / "run.h5.lock"
    try:
        wait_until_held(writer, release)
        assert lock.read_text().startswith(f"pid {writer.pid} on ") and "(hpcprune prune)" in lock.read_text()
    finally:
        release.touch()
        writer.communicate(timeout=300)
    assert writer.returncode == 0 and not lock.exists()
