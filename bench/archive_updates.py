"""Benchmark of archive updates: what one update costs in an archive of 1 round and of 50 rounds.

    python bench/archive_updates.py                           # 10M weights, 1 and 50 rounds: writes bench/results
    python bench/archive_updates.py --weights 1000000 --rounds 5 --no-write    # a quick look

Every update of an archive is made on a copy of it (crash safety, `hpcprune.archive.update`), so an
update costs what the archive weighs. Format 2 keeps the masks in part files beside the archive, each
written once: an update must then cost what it writes, the same after 50 rounds as after one.

The model: `--weights` prunable weights in 10 tensors of equal size; each round's masks keep a random
half of them (random bits: what compresses worst). Two archives are built through the real writer,
one of 1 round and one of `--rounds` rounds, and on each the same updates are timed (wall clock,
median of `--repeats`, each on a fresh copy of the archive so that every repeat sees the same file):

    event   record_event: the smallest update (one row appended), what a run does at start, finish,
            interruption
    round   write_round + mark_checkpoint of the next round: the update of a run's every round,
            masks included

Anchor, in the same run: format 1, the same archives with every mask inside (expanded from the
part files with h5py's copy), updated the way format 1 was (the unchanged copy-on-update path, the
new round's masks written into the archive). The figure that matters is the ratio of an update's
time at `--rounds` rounds to its time at 1 round: ~1 when an update costs what it writes, growing
with the rounds when it costs the archive.

Results go to bench/results/archive_updates.json and bench/results/archive_updates.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from hpcprune.archive.codec import encode_mask, packed_kept
from hpcprune.archive.mask_parts import _write_mask
from hpcprune.archive.update import open_h5
from hpcprune.archive.writer import Archive
from hpcprune.config import RunConfig

RESULTS = Path(__file__).resolve().parent / "results"
TENSORS = 10
UPDATES = ("event", "round")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=int, default=10_000_000, help="prunable weights of the model")
    parser.add_argument("--rounds", type=int, default=50, help="rounds of the larger archive")
    parser.add_argument("--repeats", type=int, default=9, help="timed updates of each kind (median reported)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/results alone")
    args = parser.parse_args()

    shapes = {f"layer{index}.weight": (args.weights // TENSORS // 1000, 1000) for index in range(TENSORS)}
    generator = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="hpcprune-bench-archive-", dir=os.environ.get("BENCH_DIR")) as folder:
        folder = Path(folder)
        measured = {}
        for rounds in (1, args.rounds):
            built = build(folder / f"{rounds}-rounds" / "run.h5", shapes, rounds, generator)
            legacy = as_format_1(built, folder / f"{rounds}-rounds-format1" / "run.h5")
            measured[rounds] = {"format 2": time_updates(built, shapes, rounds, args.repeats, generator, legacy=False),
                                "format 1": time_updates(legacy, shapes, rounds, args.repeats, generator, legacy=True)}
    results = {"environment": environment(args, shapes), "measured": measured, "ratios": ratios(measured, args.rounds)}
    markdown = render(results, args.rounds)
    print(markdown)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "archive_updates.json").write_text(json.dumps(results, indent=2) + "\n")
        (RESULTS / "archive_updates.md").write_text(markdown)


def random_masks(shapes: dict[str, tuple[int, int]], generator: np.random.Generator) -> dict:
    """Tensor -> (encoded chunks, shape, kept): a random half kept, packed as the writer stores it."""
    masks = {}
    for name, shape in shapes.items():
        packed = np.packbits(generator.random(int(np.prod(shape))) < 0.5)
        masks[name] = (encode_mask(packed), shape, packed_kept(packed))
    return masks


def round_record(index: int, masks: dict) -> dict:
    kept = sum(entry[2] for entry in masks.values())
    total = sum(int(np.prod(entry[1])) for entry in masks.values())
    return dict(attrs=dict(criterion="magnitude", rule="global", target_sparsity=0.5, achieved_sparsity=1 - kept / total,
                           kept=kept, total=total),
                layers=[dict(name=name, numel=int(np.prod(shape)), kept=kept_here, sparsity=1 - kept_here / np.prod(shape))
                        for name, (_, shape, kept_here) in masks.items()],
                history=[dict(epoch=1, train_loss=1.0, eval_loss=1.0, eval_accuracy=0.5)])


def build(path: Path, shapes: dict, rounds: int, generator: np.random.Generator) -> Path:
    """An archive of `rounds` complete rounds, written by the real writer, as a run writes them."""
    archive = Archive.create(path, config_yaml=RunConfig().to_yaml(), model_name="bench",
                             params=[(name, shape, True) for name, shape in shapes.items()], world_size=1,
                             backend="single")
    archive.record_event("start", "bench")
    for index in range(1, rounds + 1):
        masks = random_masks(shapes, generator)
        archive.write_round(index, masks=masks, **round_record(index, masks))
        archive.mark_checkpoint(index, None)
    archive.close()
    return path


def as_format_1(path: Path, legacy: Path) -> Path:
    """The same archive as format 1 held it: every mask inside."""
    legacy.parent.mkdir(parents=True)
    with h5py.File(path, "r") as source, h5py.File(legacy, "w") as target:
        for name in source:
            source.copy(name, target, expand_external=True)
        target.attrs.update({key: value for key, value in source.attrs.items()
                             if key not in ("states_folder", "masks_folder", "generation")})
        target.attrs["format_version"] = 1
    return legacy


def time_updates(path: Path, shapes: dict, rounds: int, repeats: int, generator: np.random.Generator, *,
                 legacy: bool) -> dict:
    """Median seconds of each update kind, and the bytes the archive (and its part files) weigh."""
    seconds: dict[str, list[float]] = {kind: [] for kind in UPDATES}
    for repeat in range(repeats):
        for kind in UPDATES:
            copy = path.parent.parent / f"{path.parent.name}-{kind}-{repeat}" / path.name
            shutil.copytree(path.parent, copy.parent)  # the same archive for every repeat
            masks = random_masks(shapes, generator) if kind == "round" else None
            archive = Archive.at(copy)
            started = time.perf_counter()
            if kind == "event":
                archive.record_event("resume", "bench")
            elif legacy:
                format_1_round(copy, rounds + 1, masks)
            else:
                archive.write_round(rounds + 1, masks=masks, **round_record(rounds + 1, masks))
                archive.mark_checkpoint(rounds + 1, None)
            seconds[kind].append(time.perf_counter() - started)
            archive.close()
            shutil.rmtree(copy.parent)
    parts = sum(part.stat().st_size for part in (path.parent / "run.h5.masks").glob("*.h5")) if not legacy else 0
    return {"seconds": {kind: statistics.median(values) for kind, values in seconds.items()},
            "archive_bytes": path.stat().st_size, "part_bytes": parts}


def format_1_round(path: Path, index: int, masks: dict) -> None:
    """A round recorded as format 1 did: the masks written into the archive in one update on a copy,
    then the checkpoint moved in a second one."""
    record = round_record(index, masks)
    with open_h5(path, "a") as file:
        group = file.require_group("rounds").create_group(f"{index:04d}")
        group.attrs.update(record["attrs"])
        masks_group = group.create_group("masks", track_order=True)
        for name, (encoded, shape, kept) in masks.items():
            _write_mask(masks_group, name, encoded, shape, kept)
        group.attrs["status"] = "complete"
    with open_h5(path, "a") as file:
        file.require_group("checkpoint").attrs["round"] = index


def ratios(measured: dict, rounds: int) -> dict:
    return {layout: {kind: measured[rounds][layout]["seconds"][kind] / measured[1][layout]["seconds"][kind]
                     for kind in UPDATES} for layout in ("format 2", "format 1")}


def environment(args, shapes: dict) -> dict:
    return {"weights": sum(int(np.prod(shape)) for shape in shapes.values()), "tensors": len(shapes),
            "rounds": [1, args.rounds], "repeats": args.repeats, "h5py": h5py.__version__,
            "hdf5": h5py.version.hdf5_version, "cores": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "load_average": list(os.getloadavg())}


def render(results: dict, rounds: int) -> str:
    env, measured, ratio = results["environment"], results["measured"], results["ratios"]
    lines = [
        "# Archive updates: the cost of one update against the rounds already recorded", "",
        f"{env['weights']:,} prunable weights in {env['tensors']} tensors, random masks keeping half; archives of 1 "
        f"and {rounds} rounds; median of {env['repeats']} updates of each kind, wall clock, each on a fresh copy of "
        f"the archive (h5py {env['h5py']}, HDF5 {env['hdf5']}, {env['cores']} cores, load average at the end "
        f"{', '.join(f'{load:.2f}' for load in env['load_average'])}).", "",
        "| layout | update | 1 round: ms | archive MB | " + f"{rounds} rounds: ms | archive MB | {rounds} / 1 |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for layout in ("format 2", "format 1"):
        for kind in UPDATES:
            cells = []
            for count in (1, rounds):
                figures = measured[count][layout]
                cells += [f"{1000 * figures['seconds'][kind]:.1f}", f"{figures['archive_bytes'] / 1e6:.2f}"]
            lines.append(f"| {layout} | {kind} | {' | '.join(cells)} | {ratio[layout][kind]:.2f}x |")
    parts = measured[rounds]["format 2"]["part_bytes"] / 1e6
    lines += ["", f"- format 2 ({rounds} rounds): the archive weighs "
              f"{measured[rounds]['format 2']['archive_bytes'] / 1e6:.2f} MB, its part files {parts:.1f} MB, which no "
              f"update copies. An event costs {ratio['format 2']['event']:.2f}x, a round {ratio['format 2']['round']:.2f}x "
              f"its cost at 1 round.",
              f"- format 1 (the anchor): every update copies every mask; at {rounds} rounds an event costs "
              f"{ratio['format 1']['event']:.1f}x and a round {ratio['format 1']['round']:.1f}x what they cost at 1 round.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
