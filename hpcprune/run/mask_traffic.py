"""Masks between ranks, tensor by tensor, as `hpcprune.archive.wire` messages over the World.

    mpirun -n 2 hpcprune prune --config configs/quickstart.yaml

Each rank selects the masks of its own tensors. Rank 0 records a round by taking the masks in the
plan's order, one tensor's message at a time, each compressed by the rank that owns the tensor
(`masks_for_root`); a module being fine-tuned needs every mask on every rank, and gets each from
its owner in one broadcast per tensor (`share_masks`). So no rank ever holds more than one message
beyond the masks it keeps, whatever the model's size; see `hpcprune.prune.mask_store` for how a
rank keeps its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from hpcprune.archive.codec import EncodedMask, encode_mask, packed_kept
from hpcprune.archive.wire import MaskMessage
from hpcprune.dist.world import World
from hpcprune.prune.mask_store import store_masks
from hpcprune.prune.plan import Plan, TensorSpec
from hpcprune.run.job import PackedMasks

# (tensor name, (its encoded chunks, shape, kept weights)): what the archive writer takes, one at a time
RecordedMask = tuple[str, tuple[EncodedMask, tuple[int, ...], int]]


def kept_per_tensor(masks: PackedMasks, plan: Plan, world: World) -> np.ndarray:
    """Every tensor's kept count, in plan order, on every rank (each rank counts its own: one allreduce)."""
    kept = np.zeros(len(plan.tensors), dtype=np.int64)
    for spec in plan.local(world.rank):
        kept[spec.index] = packed_kept(masks[spec.name])
    return world.allreduce_sum(kept)


def masks_for_root(masks: PackedMasks, plan: Plan, world: World) -> Iterator[RecordedMask] | None:
    """On rank 0: every tensor's mask in plan order, encoded, each taken from its owner only when the
    consumer asks for it (the archive writer, which writes it before it asks for the next); None on
    the other ranks, which send their own tensors' masks, compressed, in plan order, and return.
    Every rank must call it; rank 0 must consume the whole iterator."""
    if not world.is_root:
        for spec in plan.local(world.rank):
            world.send_bytes(MaskMessage.of_packed({spec.name: masks[spec.name]}).to_bytes(), 0)
        return None
    return _received_masks(masks, plan, world)


def _received_masks(masks: PackedMasks, plan: Plan, world: World) -> Iterator[RecordedMask]:
    for spec, owner in zip(plan.tensors, plan.owners):
        if owner == world.rank:
            bits = masks[spec.name]
            yield spec.name, (encode_mask(bits), spec.shape, packed_kept(bits))
        else:
            encoded, kept = MaskMessage.from_bytes(world.recv_bytes(owner)).masks[spec.name]
            yield spec.name, (encoded, spec.shape, kept)


def share_masks(masks: PackedMasks, plan: Plan, world: World, holder: Callable[[TensorSpec, int], int] | None = None) -> dict[str, np.ndarray]:
    """Every tensor's packed mask on every rank: one broadcast per tensor, from the rank holding it
    (`holder(spec, owner)`, by default its owner), compressed there and checked on arrival."""
    if world.size == 1:
        return {spec.name: masks[spec.name] for spec in plan.tensors}
    holder = holder or (lambda spec, owner: owner)
    shared = {}
    for spec, owner in zip(plan.tensors, plan.owners):
        root = holder(spec, owner)
        sent = MaskMessage.of_packed({spec.name: masks[spec.name]}).to_bytes() if world.rank == root else None
        shared[spec.name] = MaskMessage.from_bytes(world.broadcast_bytes(sent, root=root)).packed()[spec.name]
    return shared


def scatter_from_root(masks: Iterator[tuple[str, np.ndarray]] | None, plan: Plan, world: World,
                      everywhere: bool) -> PackedMasks:
    """Masks that rank 0 reads one at a time, in plan order (an archive's, on resume), handed out tensor
    by tensor: to every rank when `everywhere` (a module trains with all of them), else each to its
    owner only, which keeps them as its selection would (`hpcprune.prune.mask_store`). Other ranks
    pass None."""
    if world.size == 1:
        return dict(masks) if everywhere else store_masks(plan.tensors, masks)
    if everywhere:
        return dict(_broadcast_each(masks, plan, world))
    return store_masks(plan.local(world.rank), _scattered(masks, plan, world))


def _next_in_plan(masks: Iterator[tuple[str, np.ndarray]], spec: TensorSpec) -> np.ndarray:
    name, bits = next(masks, (None, None))
    if name != spec.name:
        raise ValueError(f"masks read in the order {name!r} where the plan has {spec.name!r}")
    return bits


def _broadcast_each(masks, plan: Plan, world: World) -> Iterator[tuple[str, np.ndarray]]:
    for spec in plan.tensors:
        sent = MaskMessage.of_packed({spec.name: _next_in_plan(masks, spec)}).to_bytes() if world.is_root else None
        yield spec.name, MaskMessage.from_bytes(world.broadcast_bytes(sent)).packed()[spec.name]


def _scattered(masks, plan: Plan, world: World) -> Iterator[tuple[str, np.ndarray]]:
    """On each rank, its own tensors' masks as they arrive from rank 0 (which yields its own as it reads them)."""
    for spec, owner in zip(plan.tensors, plan.owners):
        if world.is_root:
            bits = _next_in_plan(masks, spec)
            if owner == 0:
                yield spec.name, bits
            else:
                world.send_bytes(MaskMessage.of_packed({spec.name: bits}).to_bytes(), owner)
        elif owner == world.rank:
            yield spec.name, MaskMessage.from_bytes(world.recv_bytes(0)).packed()[spec.name]
