"""Crash consistency: SIGKILL a multi-round run anywhere, resume it, and get exactly the uninterrupted run.

The kills come from `tests.crash_points` (a real SIGKILL when the run reaches the N-th scoring call,
allreduce, training batch, state write, half-written round, ...). After every kill the archive must
open and validate, every round marked complete must hold all its data, and once resumed to the end
the masks (bit for bit), metrics, curves and final weights must equal those of a run never killed.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
from safetensors.numpy import load_file

from hpcprune.archive.reader import open_archive
from tests.helpers import CONFIGS, archive_masks, complete_rounds, launch

# configs/smoke.yaml made smaller: every stage (dense training, scoring, selection, fine-tuning,
# archive writes) in 3 rounds, with as few batches as still make a training curve.
SMALL = ["--config", str(CONFIGS / "smoke.yaml"), "--set", "data.synthetic_size=384", "--set",
         "data.validation_size=64", "-q"]
KILLS = 20
VOLATILE = ("seconds", "seconds_select", "seconds_finetune", "seconds_record", "seconds_write",
            "state_file")  # where a state lives differs between runs; the weights themselves are compared


def crash_run(out: Path, *args: str, launcher: list[str] = (), kill: str | None = None, rank: int = 0,
              count: Path | None = None) -> subprocess.CompletedProcess:
    env = {}  # what this run adds to tests.helpers.MPI_ENV
    if kill:
        env.update(HPCPRUNE_TEST_KILL=kill, HPCPRUNE_TEST_KILL_RANK=str(rank), HPCPRUNE_TEST_KILLED=str(out) + ".killed")
    if count:
        env["HPCPRUNE_TEST_COUNT"] = str(count)
    command = [*launcher, sys.executable, "-m", "tests.crash_points", "prune", *SMALL, "--out", str(out), *args]
    return launch(command, timeout=300, env=env)


def assert_consistent(path: Path) -> None:
    """What any reader may rely on after a kill: the archive opens, and "complete" means complete."""
    if not path.exists():
        return  # killed before the new archive was renamed into place: there is nothing to read
    reader = open_archive(path)
    if reader.dense is not None:
        assert Path(reader.dense["state_file"]).is_file()
        load_file(reader.dense["state_file"])
    for attrs in reader.rounds():
        index = attrs["index"]
        masks = reader.read_masks(index)  # every checksum verified
        layers = reader.layers(index)
        assert [layer["name"] for layer in layers] == list(masks)
        assert sum(int(mask.sum()) for mask in masks.values()) == attrs["kept"] == sum(layer["kept"] for layer in layers)
        assert len(reader.history(index)) == 1
        load_file(attrs["state_file"])  # the weights this round ended with are readable


def run_facts(path: Path) -> dict:
    """Everything a run produced that must not depend on being killed: masks, figures, curves, weights."""
    reader = open_archive(path)
    rounds = reader.rounds()
    return {
        "dense": {key: value for key, value in reader.dense.items() if key not in VOLATILE},
        "rounds": [{key: value for key, value in attrs.items() if key not in VOLATILE} for attrs in rounds],
        "history": [reader.history(attrs["index"]) for attrs in rounds],
        "masks": [{name: packed.tobytes() for name, packed in archive_masks(path, attrs["index"]).items()} for attrs in rounds],
        "weights": {name: tensor.tobytes() for name, tensor in load_file(rounds[-1]["state_file"]).items()},
    }


def assert_same_run(mine: Path, reference: Path) -> None:
    ours, theirs = run_facts(mine), run_facts(reference)
    assert complete_rounds(mine) == complete_rounds(reference) == [1, 2, 3]
    assert ours["masks"] == theirs["masks"]  # bit for bit
    for key in ("dense", "rounds", "history"):
        assert json.dumps(ours[key], sort_keys=True, default=str).replace(str(mine.with_suffix("")), "RUN") == \
            json.dumps(theirs[key], sort_keys=True, default=str).replace(str(reference.with_suffix("")), "RUN"), key
    assert ours["weights"] == theirs["weights"]


def test_kill_between_a_complete_round_and_its_checkpoint_resumes_exactly(tmp_path):
    """Round 2 is complete on disk but /checkpoint still names round 1's state: resume must use round 2's."""
    reference = tmp_path / "reference.h5"
    assert crash_run(reference).returncode == 0
    out = tmp_path / "killed.h5"
    killed = crash_run(out, kill="mark_checkpoint:2")
    assert killed.returncode == -9, killed.stderr
    assert complete_rounds(out) == [1, 2]
    with h5py.File(out, "r") as archive:
        assert archive["checkpoint"].attrs["round"] == 1  # the window this test is about
    assert_consistent(out)
    assert crash_run(out, "--resume").returncode == 0
    assert_same_run(out, reference)


def kill_schedule(counts: list[dict[str, int]], seed: int) -> list[tuple[str, int, int]]:
    """KILLS (point, n-th time, rank) drawn evenly over the points each rank reaches in a whole run."""
    generator = random.Random(seed)
    moments = []
    for _ in range(KILLS * 2):  # more than needed: a kill past the end of a resumed run never fires
        rank = generator.randrange(len(counts))
        point = generator.choice(sorted(counts[rank]))
        moments.append((point, generator.randint(1, counts[rank][point]), rank))
    return moments


def kill_chains(out: Path, moments, kills: int, attempt, *, finished, killed) -> set[str]:
    """Resume `out` under each kill of `moments` in turn until `kills` of them happened; the points hit.

    `attempt(kill, rank)` runs the resume with HPCPRUNE_TEST_KILL=kill on `rank`. A resume that ends
    before reaching its kill is checked with `finished()` and the chain starts again from nothing; after
    each kill, `killed()` checks what a reader finds."""
    happened, points = 0, set()
    for point, nth, rank in moments:
        if happened == kills:
            break
        done = attempt(f"{point}:{nth}", rank)
        if done.returncode == 0:  # the resumed run ended before reaching that moment
            finished()
            side = open_archive(out).side
            out.unlink()
            shutil.rmtree(side.states, ignore_errors=True)
            shutil.rmtree(side.masks, ignore_errors=True)
            continue
        # The kill happened (the surviving rank may report its broken collective first), and nothing else failed.
        assert Path(f"{out}.killed").read_text() == f"{point}:{nth} on rank {rank}", done.stderr
        Path(f"{out}.killed").unlink()
        happened += 1
        points.add(point)
        killed()
    assert happened == kills, (happened, points)
    return points


def test_twenty_random_kills_under_mpirun_resume_to_the_uninterrupted_run(mpirun, tmp_path):
    launcher = [mpirun, "-n", "2"]
    reference, count = tmp_path / "reference.h5", tmp_path / "counts"
    done = crash_run(reference, launcher=launcher, count=count)
    assert done.returncode == 0, done.stderr
    counts = [json.loads(Path(f"{count}.{rank}").read_text()) for rank in (0, 1)]
    stages = {"score", "allreduce", "batch", "write_mask", "commit", "save_state"}
    assert stages <= counts[0].keys()  # the moments cover scoring, selection, fine-tuning and writing

    out = tmp_path / "run.h5"
    points = kill_chains(out, kill_schedule(counts, seed=8), KILLS,
                         lambda kill, rank: crash_run(out, "--resume", launcher=launcher, kill=kill, rank=rank),
                         finished=lambda: assert_same_run(out, reference), killed=lambda: assert_consistent(out))
    assert len(points) >= 6, points

    finished = crash_run(out, "--resume", launcher=launcher)
    assert finished.returncode == 0, finished.stderr
    assert_same_run(out, reference)
