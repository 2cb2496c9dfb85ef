"""Format 2 of the archive: masks in part files beside it, rounds recorded whole or in steps, one
writer at a time, leftovers of killed writers removed, and the archive checked against its own plan."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import h5py
import pytest
import torch

from hpcprune.archive.blocks import BlockRecords, recorded_blocks, round_tables
from hpcprune.archive.codec import pack_mask
from hpcprune.archive.reader import open_archive
from hpcprune.archive.writer import Archive
from hpcprune.errors import UsageError
from tests.helpers import ROOT, damage
from tests.test_archive import (
    BIG,
    PRUNABLE,
    SHAPES,
    config_yaml,
    create,
    random_masks,
    round_attrs,
    write_round,
)


def packed(masks: dict[str, torch.Tensor]):
    return {name: (pack_mask(mask), tuple(mask.shape), int(mask.sum())) for name, mask in masks.items()}


def layers_of(masks):
    return [dict(name=name, numel=mask.numel(), kept=int(mask.sum()), sparsity=0.5) for name, mask in masks.items()]


def test_masks_live_in_part_files_that_plain_h5py_and_h5dump_follow_from_anywhere(tmp_path):
    path = tmp_path / "run" / "run.h5"
    masks = random_masks(1)
    write_round(create(path), 1, masks)
    with h5py.File(path, "r") as file:
        link = file["rounds/0001/masks"].get("fc1.weight", getlink=True)
        assert isinstance(link, h5py.ExternalLink) and link.filename == "run.h5.masks/round-0001.part-0000.h5"
    moved = tmp_path / "elsewhere" / "moved"
    shutil.copytree(path.parent, moved)  # the whole run folder, read from another working directory
    code = ("import h5py, sys; f = h5py.File(sys.argv[1], 'r'); d = f['rounds/0001/masks/fc1.weight'];"
            "print(d.attrs['kept'], d.shape[0])")
    read = subprocess.run([sys.executable, "-c", code, str(moved / "run.h5")], capture_output=True, text=True,
                          cwd="/", check=True)
    assert read.stdout.split() == [str(int(masks["fc1.weight"].sum())), str((301 * 7 + 7) // 8)]
    if shutil.which("h5dump"):
        dumped = subprocess.run(["h5dump", "-a", "/rounds/0001/masks/fc1.weight/kept", str(moved / "run.h5")],
                                capture_output=True, text=True, cwd="/")
        assert dumped.returncode == 0 and f"(0): {int(masks['fc1.weight'].sum())}" in dumped.stdout, dumped.stdout
    assert torch.equal(open_archive(moved / "run.h5").read_masks(1)["fc1.weight"], masks["fc1.weight"])


def test_the_archive_does_not_grow_with_the_masks(tmp_path):
    """What an update copies is the archive, so its size must not depend on how big the masks are."""
    sizes = {}
    for label, shape in (("small", (10, 10)), ("large", (2000, 1000))):
        path = tmp_path / label / "run.h5"
        archive = create(path, shapes={"w": shape})
        for index in (1, 2, 3):
            write_round(archive, index, random_masks(index, {"w": shape}))
        sizes[label] = path.stat().st_size
        assert sum(part.stat().st_size for part in archive.side.masks.iterdir()) > (0 if label == "small" else 3 * 200_000)
    assert sizes["large"] < sizes["small"] + 4096, sizes


def test_masks_from_an_iterator_are_written_one_at_a_time(tmp_path):
    masks = random_masks(4)
    handed_out = []

    def one_by_one():
        for name, entry in packed(masks).items():
            handed_out.append(name)
            yield name, entry

    archive = create(tmp_path / "run.h5")
    archive.write_round(1, attrs=round_attrs(1, masks), masks=one_by_one(), layers=layers_of(masks), history=[])
    assert handed_out == list(masks)
    read = open_archive(tmp_path / "run.h5").read_masks(1)
    assert list(read) == list(masks) and all(torch.equal(read[name], masks[name]) for name in masks)


def test_a_round_recorded_in_steps_is_complete_only_when_every_planned_mask_is_there(tmp_path):
    path = tmp_path / "run.h5"
    masks = random_masks(5)
    first, second = list(PRUNABLE[:2]), list(PRUNABLE[2:])
    archive = create(path)
    archive.add_masks(1, {name: packed(masks)[name] for name in first})
    assert archive.masks_recorded(1) == first and archive.completed_rounds() == []
    with pytest.raises(ValueError, match="no mask recorded for block/odd.weight"):
        archive.finish_round(1, attrs=round_attrs(1, masks), layers=layers_of(masks), history=[])
    # A resumed pipeline (here: another writer of the same archive) goes on from what is recorded.
    resumed = Archive.open_resume(path, config_yaml=open_archive(path).config_yaml, world_size=1)
    assert resumed.masks_recorded(1) == first
    with pytest.raises(ValueError, match="conv.0.weight is recorded already"):
        resumed.add_masks(1, {"conv.0.weight": packed(masks)["conv.0.weight"]})
    resumed.add_masks(1, iter([(name, packed(masks)[name]) for name in second]))
    resumed.finish_round(1, attrs=round_attrs(1, masks), layers=layers_of(masks), history=[])
    assert resumed.completed_rounds() == [1]
    assert sorted(part.name for part in resumed.side.masks.iterdir()) == \
        ["round-0001.part-0000.h5", "round-0001.part-0001.h5"]
    read = open_archive(path).read_masks(1)
    assert list(read) == list(masks) and all(torch.equal(read[name], masks[name]) for name in masks)
    with pytest.raises(ValueError, match="already complete"):
        resumed.add_masks(1, packed(masks))


HOLDER = textwrap.dedent("""
    import sys, time
    from hpcprune.archive.writer import Archive
    Archive.at(sys.argv[1])
    print("holding", flush=True)
    time.sleep(300)
""")


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_leaves_nothing_to_clean(tmp_path):
    path = tmp_path / "run.h5"
    create(path).close()
    before = path.read_bytes()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "holding"
        for attempt in (lambda: create(path, force=True),
                        lambda: Archive.open_resume(path, config_yaml=open_archive(path).config_yaml, world_size=1),
                        lambda: Archive.at(path)):
            with pytest.raises(UsageError, match=rf"{path} is in use by pid {holder.pid} on \S+ since "):
                attempt()
        assert path.read_bytes() == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / "run.h5.lock").exists()  # left by the kill, and harmless: the lock died with its holder
    archive = Archive.at(path)
    archive.record_event("start", "after the holder was killed")
    archive.close()
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["run.h5"]  # a clean release removes the lock file


def test_leftovers_of_killed_writers_go_and_nothing_else(tmp_path):
    path = tmp_path / "run.h5"
    archive = create(path)
    write_round(archive, 1, random_masks(1))
    archive.close()
    side = open_archive(path).side
    ours = [tmp_path / ".run.h5.k3j4_9x.tmp", side.states / ".dense.safetensors.abc123.tmp",
            side.masks / ".round-0002.part-0000.h5.q1w2e3.tmp", side.masks / "round-0002.part-0000.h5",
            tmp_path / "run.h5.states.2" / "dense.safetensors", tmp_path / "run.h5.masks.3" / "round-0001.part-0000.h5"]
    theirs = [tmp_path / ".run.h5.x.k3j4_9x.tmp", tmp_path / ".other.h5.k3j4_9x.tmp", tmp_path / "run.states" / "x",
              tmp_path / "run.h5.x.states" / "dense.safetensors", tmp_path / "notes.tmp"]
    for leftover in ours + theirs:
        leftover.parent.mkdir(parents=True, exist_ok=True)
        leftover.write_bytes(b"left by a killed writer")
    resumed = Archive.open_resume(path, config_yaml=open_archive(path).config_yaml, world_size=1)
    assert [leftover for leftover in ours if leftover.exists()] == []
    assert not (tmp_path / "run.h5.states.2").exists() and not (tmp_path / "run.h5.masks.3").exists()
    assert all(leftover.exists() for leftover in theirs)
    assert (side.masks / "round-0001.part-0000.h5").exists()  # linked: kept
    assert torch.equal(open_archive(path).read_masks(1)["fc1.weight"], random_masks(1)["fc1.weight"])
    resumed.close()


@pytest.mark.parametrize("how, round_index, finding", [
    ("round", 1, "round 1 is missing (round 2 is recorded as complete)"),
    ("mask", 2, "round 2 has no mask of fc1.weight"),
    ("part", 1, "round 1: the mask of fc1.weight is in"),
    ("checkpoint", 5, "/checkpoint continues after round 5, which is not complete"),
])
def test_an_archive_that_does_not_match_its_table_of_contents_is_refused_on_open(run, how, round_index, finding):
    path, _ = run
    damage(path, how, round_index)
    with pytest.raises(UsageError, match=f"{path} is damaged: {finding}".replace("(", r"\(").replace(")", r"\)")):
        open_archive(path)


@pytest.mark.parametrize("round_index", [1, 2])
def test_a_mask_whose_shape_was_edited_is_refused_on_open_in_any_complete_round(run, round_index):
    """Every reader opens the archive first: none gets past an edited mask of any complete round, not
    even one that reads no mask (`inspect`), nor one that reads another round."""
    path, _ = run
    damage(path, "shape", round_index)
    with pytest.raises(UsageError, match=f"round {round_index}: mask fc1.weight has shape 7x301, where "
                                         "/model/params plans 301x7"):
        open_archive(path)
    damage(path, "shape", round_index)  # transposed back
    assert open_archive(path).read_masks(round_index)


def test_a_format_1_archive_is_read_and_resumed(run, tmp_path):
    """Format 1 kept the masks inside the archive and the states in <stem>.states/."""
    path, masks = run
    old = tmp_path / "old" / "run.h5"
    old.parent.mkdir()
    with h5py.File(path, "r") as new, h5py.File(old, "w") as legacy:
        for name in new:
            new.copy(name, legacy, expand_external=True)  # the masks copied inline, as format 1 held them
        legacy.attrs.update({key: value for key, value in new.attrs.items()
                             if key not in ("states_folder", "masks_folder", "generation")})
        legacy.attrs["format_version"] = 1
    reader = open_archive(old)
    assert reader.attrs["format_version"] == 1 and reader.side.states_name == "run.states"
    assert all(torch.equal(reader.read_masks(2)[name], masks[2][name]) for name in masks[2])
    resumed = Archive.open_resume(old, config_yaml=reader.config_yaml, world_size=1)
    third = random_masks(3)
    write_round(resumed, 3, third)
    resumed.close()
    reader = open_archive(old)
    assert reader.attrs["format_version"] == 2 and reader.side.states_name == "run.states"  # its states stay put
    assert [r["index"] for r in reader.rounds()] == [1, 2, 3]
    assert torch.equal(reader.read_masks(3)["fc1.weight"], third["fc1.weight"])
    assert torch.equal(reader.read_masks(1)["fc1.weight"], masks[1]["fc1.weight"])


@pytest.fixture
def run(tmp_path):
    """An archive with two complete rounds, /checkpoint after round 2, and the shapes of test_archive."""
    path = tmp_path / "out" / "run.h5"
    archive = create(path)
    masks = {index: random_masks(index) for index in (1, 2)}
    for index, round_masks in masks.items():
        write_round(archive, index, round_masks)
        archive.mark_checkpoint(index, None)
    archive.close()
    return path, masks


def test_the_update_of_a_killed_run_leaves_the_archive_readable_and_its_lock_free(tmp_path):
    """A writer SIGKILLed while it holds the archive: the lock dies with it, the archive is the last whole one."""
    path = tmp_path / "run.h5"
    create(path, shapes=BIG).close()
    script = textwrap.dedent("""
        import os, signal, sys
        import hpcprune.archive.mask_parts as parts
        from hpcprune.archive.writer import Archive
        from tests.test_archive import BIG, random_masks, write_round
        original = parts._write_mask
        def write_then_die(*args, **kwargs):
            original(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
        parts._write_mask = write_then_die
        write_round(Archive.at(sys.argv[1]), 1, random_masks(1, BIG))
    """)
    killed = subprocess.run([sys.executable, "-c", script, str(path)], env={**os.environ, "PYTHONPATH": str(ROOT)},
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert open_archive(path).rounds() == []
    assert any(entry.name.endswith(".tmp") for entry in (tmp_path / "run.h5.masks").iterdir())
    archive = Archive.open_resume(path, config_yaml=open_archive(path).config_yaml, world_size=1)  # the lock died with it
    assert list((tmp_path / "run.h5.masks").iterdir()) == []  # the half-written part is gone
    write_round(archive, 1, random_masks(1, BIG))
    archive.close()
    assert torch.equal(open_archive(path).read_masks(1)["big.weight"], random_masks(1, BIG)["big.weight"])



# --- a block-sequential round: one step per block --------------------------------------------------------

BLOCKS = [["fc1.weight", "conv.0.weight"], ["block/odd.weight", "empty.weight"]]


def block_archive(path, *, force: bool = False) -> BlockRecords:
    params = [(name, shape, name in PRUNABLE) for name, shape in SHAPES.items()]
    archive = BlockRecords.create(path, config_yaml=config_yaml(), model_name="tiny", params=params, world_size=1,
                                  backend="single", force=force)
    archive.begin(1, dict(criterion="wanda", rule="row", target_sparsity=0.5, achieved_sparsity=math.nan, kept=0,
                          total=0, threshold=None))
    return archive


def record(archive: BlockRecords, block: int, masks) -> None:
    archive.record_block(1, block, seconds=0.1, weights_file="", errors={name: 0.25 for name in BLOCKS[block]},
                         masks={name: packed(masks)[name] for name in BLOCKS[block]})


def test_a_block_sequential_round_is_recorded_a_block_per_step_and_held_to_its_tables(tmp_path):
    path = tmp_path / "run.h5"
    masks = random_masks(6)
    archive = block_archive(path)
    record(archive, 0, masks)
    assert [row["block"] for row in recorded_blocks(path, 1)] == [0]
    assert [part.name for part in archive.side.masks.iterdir()] == ["round-0001.part-0000.h5"]
    with pytest.raises(ValueError, match="block 0 is already recorded"):
        record(archive, 0, masks)
    with pytest.raises(ValueError, match="no mask recorded for block/odd.weight"):
        archive.finish(1, dict(kept=1))
    archive.close()

    damaged = tmp_path / "damaged"
    shutil.copytree(tmp_path, damaged, ignore=shutil.ignore_patterns("damaged"))
    damage(damaged / "run.h5", "mask", 1, "conv.0.weight")  # a recorded block lost one of its masks
    with pytest.raises(UsageError, match="round 1 has no mask of conv.0.weight"):
        open_archive(damaged / "run.h5")

    resumed = BlockRecords.open_resume(path, config_yaml=open_archive(path).config_yaml, world_size=1)
    record(resumed, 1, masks)
    resumed.finish(1, dict(kept=sum(int(mask.sum()) for mask in masks.values()), blocks=2))
    resumed.close()
    reader = open_archive(path)
    assert reader.rounds()[0]["status"] == "complete" and reader.rounds()[0]["blocks"] == 2
    assert all(torch.equal(reader.read_masks(1)[name], masks[name]) for name in masks)
    assert [row["name"] for row in round_tables(path, 1)["reconstruction"]] == BLOCKS[0] + BLOCKS[1]


def test_a_forced_block_sequential_run_replaces_the_old_archive_at_its_first_block(tmp_path):
    path = tmp_path / "run.h5"
    old = block_archive(path)
    for block in (0, 1):
        record(old, block, random_masks(7))
    old.finish(1, dict(kept=1))
    old.close()
    before = path.read_bytes()
    new = block_archive(path, force=True)  # begun: still under its temporary name
    assert path.read_bytes() == before and new.side.generation == 2
    record(new, 0, random_masks(8))
    reader = open_archive(path)
    assert reader.side.generation == 2 and [row["block"] for row in reader.blocks(1)] == [0]
    assert not (tmp_path / "run.h5.masks").exists()  # the replaced run's parts went with it
    new.close()
