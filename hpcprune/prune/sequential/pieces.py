"""Who decides what in a block: its layers, or ranges of a layer's rows, spread over the ranks by cost.

    mpirun -n 8 hpcprune prune --config configs/llm_sparsegpt.yaml     # 7 layers a block: rows split too

A block's layers are pieces of work for the ranks, assigned costliest first onto the least-loaded
rank (hpcprune.prune.plan.assign_owners, as the plan assigns tensors). With more ranks than layers,
a method whose rows are independent (`row_split` not None: SparseGPT under rules row and nm) has its
costliest layers cut into row ranges until every rank has a piece or nothing more can be cut; each
range is decided on its own rank and the ranges are joined back into the layer's decision
(hpcprune.prune.sequential.decisions). The cuts depend on the world size, the decisions do not: the
method guarantees the same bits for any of its row ranges.
"""

from __future__ import annotations

from dataclasses import dataclass

from hpcprune.prune.plan import TensorSpec, assign_owners
from hpcprune.prune.sequential.layers import BlockLayer


@dataclass(frozen=True)
class Piece:
    layer: BlockLayer
    rows: tuple[int, int] | None = None  # None: the whole layer

    @property
    def key(self) -> str:
        """The name its decision travels under: the layer's, or the layer's with its rows."""
        name = self.layer.spec.name
        return name if self.rows is None else f"{name}[{self.rows[0]}:{self.rows[1]}]"

    def spec(self, position: int) -> TensorSpec:
        """The piece as a tensor of its own, out x in (what its cost is computed on)."""
        shape = self.layer.linear_spec.shape
        rows = shape[0] if self.rows is None else self.rows[1] - self.rows[0]
        return TensorSpec(position, self.key, (rows, *shape[1:]))


def block_pieces(layers: list[BlockLayer], world_size: int, method, rule) -> list[tuple[Piece, int]]:
    """Each piece of the block's work and the rank that decides it, the same on every rank."""
    parts = {layer.spec.name: 1 for layer in layers}
    pieces = {layer.spec.name: [Piece(layer)] for layer in layers}
    while sum(len(cut) for cut in pieces.values()) < world_size:
        widest = _costliest_cuttable(layers, pieces, parts, method, rule)
        if widest is None:
            break
        name = widest.spec.name
        parts[name] += 1
        pieces[name] = [Piece(widest, rows) for rows in method.row_split(widest.spec, rule, parts[name])]
    ordered = [piece for layer in layers for piece in pieces[layer.spec.name]]
    specs = tuple(piece.spec(position) for position, piece in enumerate(ordered))
    return list(zip(ordered, assign_owners(specs, world_size, method.cost)))


def _costliest_cuttable(layers, pieces, parts, method, rule) -> BlockLayer | None:
    """The layer whose largest piece costs most among those that one more cut makes more pieces of."""
    best, best_cost = None, -1
    for layer in layers:
        name = layer.spec.name
        if layer.transposed:  # its rows are the stored tensor's columns: never cut
            continue
        more = method.row_split(layer.spec, rule, parts[name] + 1)
        if more is None or len(more) <= len(pieces[name]):
            continue
        cost = max(method.cost(piece.spec(0)) for piece in pieces[name])
        if cost > best_cost:  # strictly: the earlier layer wins a tie
            best, best_cost = layer, cost
    return best
