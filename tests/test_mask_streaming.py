"""Masks that never gather: a rank's own masks kept on disk past a budget, rounds written tensor by
tensor as the owners' messages arrive, and rank 0's memory independent of the model's size."""

from __future__ import annotations

import json
import sys
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hpcprune.archive.codec import pack_mask
from hpcprune.archive.wire import MaskMessage
from hpcprune.archive.writer import Archive
from hpcprune.dist.world import SingleWorld
from hpcprune.models.builders import save_checkpoint
from hpcprune.prune import mask_store, radix, streaming
from hpcprune.prune.mask_store import MaskStore
from hpcprune.prune.plan import Plan, TensorSpec, assign_owners
from hpcprune.prune.rules import select
from hpcprune.run.mask_traffic import kept_per_tensor, masks_for_root
from tests.helpers import CONFIGS, launch

SHAPES = ((40, 32), (8, 4, 3, 3), (10, 40), (7, 8), (16, 4))


def make_plan(shapes=SHAPES) -> Plan:
    tensors = tuple(TensorSpec(index, f"layer{index}.weight", shape) for index, shape in enumerate(shapes))
    return Plan(tensors, assign_owners(tensors, 1))


def tied_scores(plan: Plan, seed: int) -> dict[str, torch.Tensor]:
    """Scores from a few values: many ties at any threshold, so every pass of the global rule runs."""
    generator = torch.Generator().manual_seed(seed)
    pool = torch.tensor([0.25, 0.5, 1.0, 2.0])
    return {spec.name: pool[torch.randint(4, spec.shape, generator=generator)] for spec in plan.tensors}


def selected(rule: str, plan: Plan, scores, **options) -> dict[str, np.ndarray]:
    chosen = select(rule, scores, plan, SingleWorld(), **options)
    return {name: np.array(chosen.masks[name]) for name in chosen.masks}


@pytest.mark.parametrize("rule, options, retain_limit, spill_share", [
    ("global", dict(sparsity=0.6), radix.RETAIN_LIMIT, radix.SPILL_SHARE),
    ("global", dict(sparsity=0.6), 0, 0),  # passes 3 and 4 come back to tensors already written
    ("global", dict(sparsity=0.6), 0, 1),  # the bin's elements spilled, then the masks set from them
    ("global", dict(sparsity=0.0), radix.RETAIN_LIMIT, radix.SPILL_SHARE),
    ("layer", dict(sparsity=0.5), radix.RETAIN_LIMIT, radix.SPILL_SHARE),
    ("threshold", dict(sparsity=0.0, threshold=0.75), radix.RETAIN_LIMIT, radix.SPILL_SHARE),
    ("row", dict(sparsity=0.5), radix.RETAIN_LIMIT, radix.SPILL_SHARE),
    ("nm", dict(sparsity=0.5, n=2, m=4), radix.RETAIN_LIMIT, radix.SPILL_SHARE),
])
def test_masks_kept_on_disk_are_the_masks_kept_in_memory(monkeypatch, rule, options, retain_limit, spill_share):
    monkeypatch.setattr(streaming, "CHUNK", 64)  # many chunks per tensor, several threads' worth
    monkeypatch.setattr(radix, "RETAIN_LIMIT", retain_limit)
    monkeypatch.setattr(radix, "SPILL_SHARE", spill_share)
    plan = make_plan()
    scores = tied_scores(plan, seed=5)
    in_memory = selected(rule, plan, scores, **options)
    monkeypatch.setenv(mask_store.MEMORY_VARIABLE, "0")
    chosen = select(rule, scores, plan, SingleWorld(), **options)
    assert chosen.masks.store.on_disk
    assert list(chosen.masks) == list(in_memory)
    for name, bits in in_memory.items():
        assert np.array_equal(chosen.masks[name], bits), name


def test_a_store_on_disk_holds_one_tensor_in_memory(monkeypatch):
    monkeypatch.setenv(mask_store.MEMORY_VARIABLE, "0")
    size, count = 1 << 16, 64  # 4 MiB of masks in all
    store = MaskStore([size] * count)
    tracemalloc.start()
    try:
        for position in range(count):
            store[position][:] = position
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * size, f"{peak} bytes traced while writing {count} masks of {size} bytes"
    assert all(int(store.packed(position)[-1]) == position for position in range(count))
    store[3][:2] = 255  # coming back to a written tensor keeps the rest of its bits
    assert list(store.packed(3)[:3]) == [255, 255, 3] and int(store.packed(4)[0]) == 4


def round_chunks(path: Path) -> list[tuple]:
    """Every mask dataset of round 1 as stored: name, attrs, filters, and the raw bytes of each chunk."""
    with h5py.File(path, "r") as archive:
        group = archive["rounds/0001"]
        rows = [("metrics", group["metrics"][()].tolist())]
        for name, dataset in group["masks"].items():
            chunks = [dataset.id.read_direct_chunk(dataset.id.get_chunk_info(index).chunk_offset)
                      for index in range(dataset.id.get_num_chunks())]
            rows.append((name, dataset.shape, dataset.chunks, dataset.compression, dataset.fletcher32,
                         {key: np.asarray(value).tolist() for key, value in dataset.attrs.items()}, chunks))
        return rows


def test_a_round_streamed_tensor_by_tensor_is_stored_as_one_written_from_every_mask_at_once(tmp_path):
    plan = make_plan(((600, 700), (3, 5), (1, 1), (2048, 1100)))  # masks of one and of several chunks
    generator = torch.Generator().manual_seed(2)
    packed = {spec.name: pack_mask(torch.rand(spec.shape, generator=generator) < 0.3) for spec in plan.tensors}
    attrs = dict(criterion="magnitude", rule="global", target_sparsity=0.7, achieved_sparsity=0.7, kept=1, total=2)
    kept = kept_per_tensor(packed, plan, SingleWorld())
    layers = [dict(name=spec.name, numel=spec.numel, kept=int(kept[spec.index]), sparsity=0.0) for spec in plan.tensors]
    paths = []
    for way in ("all at once", "streamed"):
        path = tmp_path / f"{way}.h5"
        archive = Archive.create(path, config_yaml="{}", model_name="m", world_size=1, backend="single",
                                 params=[(spec.name, spec.shape, True) for spec in plan.tensors])
        if way == "all at once":  # how rounds were recorded before: one merged message of every mask
            message = MaskMessage.of_packed(packed)
            masks = {spec.name: (message.masks[spec.name][0], spec.shape, message.masks[spec.name][1]) for spec in plan.tensors}
        else:
            masks = masks_for_root(packed, plan, SingleWorld())
        archive.write_round(1, attrs=attrs, masks=masks, layers=layers, history=[])
        paths.append(path)
    assert round_chunks(paths[1]) == round_chunks(paths[0])


def write_model(path: Path, count: int, side: int = 512) -> int:
    generator = torch.Generator().manual_seed(count)
    save_checkpoint({f"layers.{index}.weight": torch.randn(side, side, generator=generator) for index in range(count)}, path)
    return count * side * side


def traced_run(mpirun: str, folder: Path, checkpoint: Path) -> list[int]:
    command = [mpirun, "-n", "2", sys.executable, "-m", "tests.drivers", "traced", str(folder), "prune",
               "--config", str(CONFIGS / "oneshot_global.yaml"), "--out", str(folder / "run.h5"),
               "--set", "model.name=checkpoint", "--set", f"model.checkpoint={checkpoint}", "-q"]
    # Masks in memory are what the budget allows by design: with none, any growth with the model shows.
    finished = launch(command, timeout=300, env={mask_store.MEMORY_VARIABLE: "0"})
    assert finished.returncode == 0, finished.stderr
    return [json.loads((folder / f"traced{rank}.json").read_text())["peak_bytes"] for rank in (0, 1)]


def test_rank_memory_does_not_grow_with_the_number_of_tensors(mpirun, mpi4py, tmp_path):
    """4 and then 128 tensors of 512 x 512 under mpirun -n 2: the 128-tensor model's masks are 4 MiB
    (a gather of them held about three times that on rank 0); no rank's traced peak may grow by a
    quarter of them."""
    peaks = {}
    for count in (4, 128):
        folder = tmp_path / f"{count}"
        folder.mkdir()
        weights = write_model(folder / "model.safetensors", count)
        peaks[count] = traced_run(mpirun, folder, folder / "model.safetensors")
    masks_bytes = weights // 8
    for rank in (0, 1):
        assert peaks[128][rank] - peaks[4][rank] < masks_bytes / 4, (rank, peaks)


def test_masks_streamed_from_two_ranks_and_kept_on_disk_are_stored_as_one_process_stores_them(mpirun, mpi4py, tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    write_model(checkpoint, 6, side=300)
    archives = {}
    for ranks in (1, 2):
        archives[ranks] = tmp_path / f"n{ranks}.h5"
        cli = [sys.executable, "-m", "hpcprune", "prune", "--config", str(CONFIGS / "oneshot_global.yaml"),
               "--out", str(archives[ranks]), "--set", "model.name=checkpoint", "--set", f"model.checkpoint={checkpoint}",
               "--set", "schedule.kind=iterative", "--set", "schedule.rounds=2"]  # round 2 reads round 1's masks back
        finished = launch([mpirun, "-n", str(ranks), *cli], env={mask_store.MEMORY_VARIABLE: "0"})
        assert finished.returncode == 0, finished.stderr
    assert round_chunks(archives[2]) == round_chunks(archives[1])
    with h5py.File(archives[1], "r") as one, h5py.File(archives[2], "r") as two:
        assert all(np.array_equal(one[f"rounds/0002/masks/{name}"][()], two[f"rounds/0002/masks/{name}"][()])
                   for name in one["rounds/0002/masks"])
