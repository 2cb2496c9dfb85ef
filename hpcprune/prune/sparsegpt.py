"""SparseGPT (Frantar & Alistarh, ICML 2023): prune one Linear layer and update its kept weights.

    hpcprune prune --config configs/llm_sparsegpt.yaml     # prune.criterion: sparsegpt, one layer at a time

Given the layer's Hessian H = 2 Σ XᵀX over its calibration inputs (any positive multiple gives the same
solution: the damping is relative and the updates are ratios of H⁻¹'s entries), Algorithm 1 of the paper walks
the input columns left to right. At each column the weights chosen for pruning are set to zero and
their error is spread over the columns not yet reached (the OBS update, with the rows of the upper
Cholesky factor U of H⁻¹ standing in for the successively reduced inverse Hessians). Steps, as in
the paper and its reference code (IST-DASLab/sparsegpt `fasterprune`):

- dead inputs (H_jj = 0: the input never fired) get H_jj = 1 and a zero weight column;
- damping λ = percdamp · mean(diag H) is added to the diagonal; U = Cholesky(H⁻¹)ᵀ (here from one
  Cholesky factor of H with its inputs in reverse order, inverted: the same U);
- columns in lazy blocks of `blocksize`: inside a block each column's update reaches the block's
  later columns at once, the columns after the block get the block's errors in one matmul;
- masks chosen adaptively from the saliency w²/U_jj² of the weights as updated so far:
  `row` prunes within each block the same share of every row (rows never interact, so a layer's rows
  can be solved on different ranks); `layer` pools the block's rows, as the reference code does, so
  rows prune different shares; `nm` keeps n of every m consecutive inputs, chosen when the group is
  reached (2:4, 4:8).

Where this differs from the reference code, on purpose: every block prunes an exact count (the
cumulative rounding of prune_count, so a row or the layer prunes exactly prune_count(sparsity, size));
the reference prunes all scores ≤ the one at index ⌊p·size⌋, one weight more than asked, ties
included. Ties are pruned earliest position first (a stable sort), not in topk's order.

Precision: H, its factor and the weights are float64 by default (`dtype`). The weights take up to
in_features rank-one updates each; in float64 the solved weights and the saliencies that choose the
masks carry the accuracy of the data, not of the rounding, and the masks equal those of the plain
algorithm. float32 halves the memory and the matmul time where float64 is slow (consumer GPUs).

Same bits for any split of the rows: the column loop is element-wise over the rows it holds (each
row's numbers go through the same operations whatever rows sit beside it, on one thread: see
hpcprune.dist.threads), and the one reduction,
the lazy update's matmul, runs on fixed tiles of ROW_TILE rows counted from row 0 of the layer, each
copied into its own allocation, so a tile's product is the same call on the same bits wherever the
tile is solved. A row range must therefore start on a tile boundary (`row_ranges` makes such splits).
Hand-written because no library solves SparseGPT on a range of rows with that guarantee.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.linalg.lapack import dtrtri

from hpcprune.dist.threads import one_thread
from hpcprune.prune.masks import zero_pruned_
from hpcprune.prune.patterns import keep_largest
from hpcprune.prune.selection import prune_count

DEFAULT_PERCDAMP = 0.01
DEFAULT_BLOCKSIZE = 128
ROW_TILE = 128
"""Rows per lazy-update matmul, counted from the layer's row 0: the unit in which rows may be split."""

SELECTIONS = ("row", "layer", "nm")


class HessianNotPositiveDefinite(ValueError):
    """The damped Hessian has no Cholesky factor: more damping or more calibration data would help."""


@dataclass(frozen=True)
class SparseGPTRule:
    """What to prune and how: `selection` is row, layer or nm (with n kept of every m inputs)."""

    sparsity: float = 0.5
    selection: str = "row"
    n: int = 2
    m: int = 4
    blocksize: int = DEFAULT_BLOCKSIZE
    percdamp: float = DEFAULT_PERCDAMP

    def __post_init__(self):
        if self.selection not in SELECTIONS:
            raise ValueError(f"sparsegpt selection {self.selection!r}: expected one of {', '.join(SELECTIONS)}")
        if self.blocksize < 1 or self.percdamp < 0:
            raise ValueError(f"sparsegpt needs blocksize >= 1 and percdamp >= 0, got {self.blocksize}, {self.percdamp}")
        if self.selection == "nm" and not 0 <= self.n <= self.m:
            raise ValueError(f"sparsegpt n:m needs 0 <= n <= m, got {self.n}:{self.m}")
        if self.selection == "nm" and self.blocksize % self.m:
            raise ValueError(f"sparsegpt n:m needs blocksize a multiple of m={self.m}, got {self.blocksize}")
        prune_count(self.sparsity, 0)  # raises on a sparsity outside [0, 1]


@dataclass
class InverseHessian:
    """U, the upper Cholesky factor of the damped H⁻¹, and the dead inputs: one per layer, any rows."""

    factor: torch.Tensor  # in_features x in_features, upper triangular
    dead: torch.Tensor  # bool, in_features: inputs whose H_jj was 0


@dataclass
class Solved:
    """The result for the rows solved: keep mask (True = kept), new weight in the layer's dtype, and
    each row's estimated loss Σ (w - q)² / U_jj² / 2 (the reference code's `Losses`)."""

    keep: torch.Tensor
    weight: torch.Tensor
    losses: torch.Tensor


def invert_hessian(hessian: torch.Tensor, percdamp: float = DEFAULT_PERCDAMP) -> InverseHessian:
    """Dead inputs, damping and U = Cholesky(H⁻¹)ᵀ, in float64 on the Hessian's device.

    With J the reversal of the inputs' order and J·H·J = L·Lᵀ, H⁻¹ = (J·L⁻¹·J)ᵀ(J·L⁻¹·J), and J·L⁻¹·J
    is upper triangular with a positive diagonal: U itself. One Cholesky factor and one triangular
    inverse, half the work of forming H⁻¹ and factoring it again; the matrix is reversed (and damped)
    in its one copy, and L inverted in L's memory."""
    if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"a Hessian is square, got shape {tuple(hessian.shape)}")
    reversed_h = hessian.to(torch.float64).flip(0, 1)  # a new tensor: J·H·J
    if not bool(torch.isfinite(reversed_h).all()):
        raise ValueError("the Hessian has NaN or infinite entries (non-finite activations)")
    diagonal = torch.arange(reversed_h.shape[0], device=reversed_h.device)
    dead = reversed_h.diagonal() == 0
    reversed_h[diagonal[dead], diagonal[dead]] = 1.0
    reversed_h[diagonal, diagonal] += percdamp * reversed_h.diagonal().mean()
    lower = _cholesky(reversed_h)
    del reversed_h
    return InverseHessian(_triangular_inverse(lower).flip(0, 1), dead.flip(0))


def _cholesky(matrix: torch.Tensor) -> torch.Tensor:
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info):
        raise HessianNotPositiveDefinite(f"sparsegpt: the damped Hessian is not positive definite (leading minor "
                                         f"{int(info)}); raise sparsegpt.damping or use more calibration windows")
    return factor


def _triangular_inverse(lower: torch.Tensor) -> torch.Tensor:
    """L⁻¹ of a lower triangular float64 L: LAPACK's trtri on CPU (a third of a triangular solve's
    work on the identity, which torch offers instead and which the other devices use)."""
    if lower.device.type == "cpu":  # in place: torch's factor is column-major, as LAPACK's arrays
        inverse, info = dtrtri(lower.numpy(), lower=1, overwrite_c=1)
        if info:
            raise HessianNotPositiveDefinite(f"sparsegpt: the damped Hessian's factor is singular (entry {info})")
        return torch.from_numpy(inverse)
    identity = torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device)
    return torch.linalg.solve_triangular(lower, identity, upper=False)


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor | InverseHessian, rule: SparseGPTRule,
              rows: tuple[int, int] | None = None, dtype: torch.dtype = torch.float64) -> Solved:
    """Solve rows [start, end) of a Linear weight (out x in); all rows when `rows` is None.

    `hessian` is H = 2 Σ XᵀX (in x in) or its `invert_hessian`, which the caller may compute once
    for all the row ranges of one layer. Works on the Hessian's device; returns tensors there."""
    inverse = hessian if isinstance(hessian, InverseHessian) else invert_hessian(hessian, rule.percdamp)
    start, end = _check(weight, inverse, rule, rows)
    device = inverse.factor.device
    w = weight.detach()[start:end].to(device=device, dtype=dtype, copy=True)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("the weight has NaN or infinite entries")
    w[:, inverse.dead] = 0.0
    factor = inverse.factor.to(dtype)
    keep = torch.ones(w.shape, dtype=torch.bool, device=device)
    losses = torch.zeros(w.shape[0], dtype=torch.float64, device=device)
    for first in range(0, w.shape[1], rule.blocksize):
        last = min(first + rule.blocksize, w.shape[1])
        errors = _solve_block(w, keep, factor, first, last, rule)
        _lazy_update(w, losses, errors, factor[first:last, last:], last)
    return Solved(keep, w.to(weight.dtype), losses)


def _check(weight: torch.Tensor, inverse: InverseHessian, rule: SparseGPTRule,
           rows: tuple[int, int] | None) -> tuple[int, int]:
    if weight.ndim != 2 or weight.shape[1] != inverse.factor.shape[0]:
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not match a Hessian of "
                         f"{inverse.factor.shape[0]} inputs")
    start, end = (0, weight.shape[0]) if rows is None else rows
    if not 0 <= start <= end <= weight.shape[0] or start % ROW_TILE or (end % ROW_TILE and end != weight.shape[0]):
        raise ValueError(f"rows {start}:{end} of {weight.shape[0]}: a range starts and ends on a multiple of "
                         f"{ROW_TILE} rows (or at the last row)")
    if rule.selection == "layer" and (start, end) != (0, weight.shape[0]):
        raise ValueError("sparsegpt selection 'layer' compares all rows of a block: solve all rows at once")
    if rule.selection == "nm" and weight.shape[1] % rule.m:
        raise ValueError(f"sparsegpt n:m: {weight.shape[1]} inputs are not a multiple of m={rule.m}")
    return start, end


def _solve_block(w: torch.Tensor, keep: torch.Tensor, factor: torch.Tensor, first: int, last: int,
                 rule: SparseGPTRule) -> torch.Tensor:
    """Prune and update columns [first, last) of `w` in place; returns their errors (w - q) / U_jj.

    The block is held transposed (a column of `w` is a contiguous row), so each column's update
    sweeps contiguous memory; the operations per element are the same. A column's error is its
    weights divided by U_jj where pruned and by +inf where kept (0, with no update to spread), one
    operation; its update reaches only the later columns, which are all that read it, and the pruned
    weights are set to exactly 0 once, after the loop (not w - (w/d)·d)."""
    block = w[:, first:last].T.contiguous()
    local = factor[first:last, first:last]
    pivots = local.diagonal()
    block_keep = keep[:, first:last]
    divisors = torch.empty_like(block)
    if rule.selection != "nm":
        block_keep.copy_(_choose_block(block.T, pivots, first, last, rule))
        _set_divisors(divisors, block_keep.T, pivots)
    errors = torch.empty_like(block)
    columns, column_divisors, column_errors = block.unbind(0), divisors.unbind(0), errors.unbind(0)
    with one_thread():  # the rows a rank solves must not change the update's bits
        for column in range(last - first):
            if rule.selection == "nm" and column % rule.m == 0:
                group = slice(column, column + rule.m)
                block_keep[:, group] = _keep_largest(_saliency(block[group].T, pivots[group]), rule.m - rule.n)
                _set_divisors(divisors[group], block_keep[:, group].T, pivots[group])
            torch.div(columns[column], column_divisors[column], out=column_errors[column])
            # In place, with no temporary the size of the block's remaining columns: one sweep of memory.
            block[column + 1:].addr_(local[column, column + 1:], column_errors[column], alpha=-1.0)
    zero_pruned_(block, block_keep.T)
    w[:, first:last] = block.T
    return errors.T


def _set_divisors(divisors: torch.Tensor, kept: torch.Tensor, pivots: torch.Tensor) -> None:
    """U_jj where a weight is pruned, +inf where kept (columns x rows, as the block is held)."""
    divisors.copy_(pivots.unsqueeze(1).expand_as(divisors)).masked_fill_(kept, torch.inf)


def _choose_block(block: torch.Tensor, pivots: torch.Tensor, first: int, last: int, rule: SparseGPTRule) -> torch.Tensor:
    """Keep mask of one block: its share of a row's (row) or of the layer's (layer) prune count."""
    saliency = _saliency(block, pivots)
    if rule.selection == "row":
        return _keep_largest(saliency, prune_count(rule.sparsity, last) - prune_count(rule.sparsity, first))
    rows = block.shape[0]
    pruned = prune_count(rule.sparsity, rows * last) - prune_count(rule.sparsity, rows * first)
    return _keep_largest(saliency.reshape(1, -1), pruned).reshape(block.shape)


def _saliency(weights: torch.Tensor, pivots: torch.Tensor) -> torch.Tensor:
    """w² / U_jj²: the loss of zeroing w_j with the later columns free to compensate (OBS)."""
    return weights.square() / pivots.square()


def _keep_largest(saliency: torch.Tensor, pruned: int) -> torch.Tensor:
    return keep_largest(saliency, pruned).to(saliency.device)


def _lazy_update(w: torch.Tensor, losses: torch.Tensor, errors: torch.Tensor, coupling: torch.Tensor, last: int) -> None:
    """Columns after the block take the block's errors, tile by tile of ROW_TILE rows (see the module doc)."""
    for top in range(0, w.shape[0], ROW_TILE):
        tile = errors[top:top + ROW_TILE].clone(memory_format=torch.contiguous_format)  # own allocation: same alignment wherever the tile is solved
        losses[top:top + ROW_TILE] += tile.square().sum(dim=1, dtype=torch.float64) / 2
        if last < w.shape[1]:
            w[top:top + ROW_TILE, last:] -= tile @ coupling


def row_ranges(rows: int, parts: int) -> list[tuple[int, int]]:
    """`parts` consecutive row ranges on ROW_TILE boundaries, as even as tiles allow (some may be empty)."""
    tiles = -(-rows // ROW_TILE)
    cuts = [min(rows, (tiles * part // parts) * ROW_TILE) for part in range(parts + 1)]
    return list(zip(cuts[:-1], cuts[1:]))
