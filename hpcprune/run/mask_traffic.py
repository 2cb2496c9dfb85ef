"""Masks between ranks, as `hpcprune.archive.wire` messages over the World's byte collectives.

    mpirun -n 2 hpcprune prune --config configs/quickstart.yaml

Each rank selects the masks of its own tensors. Rank 0 gathers them to record the round, and a
module being fine-tuned needs every mask on every rank: gathered on rank 0, then broadcast.
"""

from __future__ import annotations

from hpcprune.archive.wire import MaskMessage
from hpcprune.dist.world import World
from hpcprune.run.job import PackedMasks


def gather_message(local: MaskMessage, world: World) -> MaskMessage | None:
    """Every rank's masks, merged in rank order on rank 0; None elsewhere."""
    if world.size == 1:
        return local
    gathered = world.gather_bytes(local.to_bytes())
    return None if gathered is None else MaskMessage.merged(MaskMessage.from_bytes(data) for data in gathered)


def broadcast_message(message: MaskMessage | None, world: World) -> MaskMessage:
    """Rank 0's message on every rank (the others pass None)."""
    if world.size == 1:
        return message
    return MaskMessage.from_bytes(world.broadcast_bytes(message.to_bytes() if world.is_root else None))


def share_masks(local: PackedMasks, world: World) -> PackedMasks:
    """Every tensor's packed mask on every rank, from the masks each rank selected."""
    if world.size == 1:
        return local
    return broadcast_message(gather_message(MaskMessage.of_packed(local), world), world).packed()
