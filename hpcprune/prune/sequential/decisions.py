"""A block's decisions, made by the ranks that own its layers, on every rank: masks and new weights.

    mpirun -n 3 hpcprune prune --config configs/llm_wanda.yaml     # each rank decides its share of a block

Each rank in turn broadcasts the decisions of the layers (or row ranges of a layer) it owns: the masks as one
`hpcprune.archive.wire` message (compressed and checksummed once, by the rank that decided them,
and written to the archive by rank 0 as they arrive), then the new weights of a method that changes
them as safetensors bytes. Every rank ends with the same `BlockDecisions`, whatever rank decided what;
`joined` puts the row ranges of a layer split over ranks back together.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from hpcprune.archive.codec import EncodedMask, pack_mask, unpack_mask
from hpcprune.archive.wire import MaskMessage
from hpcprune.dist.world import World
from hpcprune.prune.sequential.methods import Decision
from hpcprune.prune.sequential.pieces import Piece

LENGTH = struct.Struct("<Q")  # bytes of the mask message that begins a rank's payload


@dataclass
class BlockDecisions:
    masks: MaskMessage  # every layer of the block: encoded mask and kept count
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # float32 new weights (methods that change them)

    def mask(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return unpack_mask(self.masks.packed([name])[name], shape)

    def encoded(self, name: str) -> tuple[EncodedMask, int]:
        return self.masks.masks[name]

    @classmethod
    def of(cls, decided: Mapping[str, Decision]) -> BlockDecisions:
        """Decisions made here, as they travel and are recorded."""
        masks = MaskMessage.of_packed({name: pack_mask(decision.mask) for name, decision in decided.items()})
        weights = {name: decision.weight.detach().to("cpu", torch.float32).contiguous()
                   for name, decision in decided.items() if decision.weight is not None}
        return cls(masks, weights)

    def to_bytes(self) -> bytes:
        masks = self.masks.to_bytes()
        return LENGTH.pack(len(masks)) + masks + (save_tensors(self.weights) if self.weights else b"")

    @classmethod
    def from_bytes(cls, data: bytes) -> BlockDecisions:
        (length,), start = LENGTH.unpack_from(data), LENGTH.size
        weights = data[start + length:]
        return cls(MaskMessage.from_bytes(data[start:start + length]), load_tensors(weights) if weights else {})


    def joined(self, pieces: Sequence[Piece]) -> BlockDecisions:
        """The decisions of row ranges (pieces.py) put together into their layers' decisions."""
        split: dict[str, list[Piece]] = {}
        for piece in pieces:
            if piece.rows is not None:
                split.setdefault(piece.layer.spec.name, []).append(piece)
        if not split:
            return self
        cut = {piece.key for parts in split.values() for piece in parts}
        masks = {name: entry for name, entry in self.masks.masks.items() if name not in cut}
        weights = {name: weight for name, weight in self.weights.items() if name not in cut}
        joined_masks = {}
        for name, parts in split.items():
            parts = sorted(parts, key=lambda piece: piece.rows)
            features = parts[0].layer.spec.shape[1:]
            joined_masks[name] = pack_mask(torch.cat([
                unpack_mask(self.masks.packed([piece.key])[piece.key], (piece.rows[1] - piece.rows[0], *features))
                for piece in parts]))
            if parts[0].key in self.weights:
                weights[name] = torch.cat([self.weights[piece.key] for piece in parts])
        masks.update(MaskMessage.of_packed(joined_masks).masks)
        return BlockDecisions(MaskMessage(masks, self.masks.facts), weights)


def share_decisions(mine: Mapping[str, Decision], world: World) -> BlockDecisions:
    """Every rank's decisions on every rank, merged in rank order (one broadcast per rank)."""
    local = BlockDecisions.of(mine)
    if world.size == 1:
        return local
    parts = [BlockDecisions.from_bytes(world.broadcast_bytes(local.to_bytes() if rank == world.rank else None, root=rank))
             for rank in range(world.size)]
    return BlockDecisions(MaskMessage.merged(part.masks for part in parts),
                          {name: weight for part in parts for name, weight in part.weights.items()})
