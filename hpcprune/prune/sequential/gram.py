"""XᵀX of a layer's input rows, computed and summed as its upper triangle.

    hpcprune prune --config configs/llm_sparsegpt.yaml     # SparseGPT's Hessian, one window at a time

A Gram matrix is symmetric, so one triangle says it all. BLAS's syrk makes only that triangle,
half the multiply-adds of the general product `torch.matmul` makes (torch has no syrk), and the
exact sums over ranks add only its n(n+1)/2 entries, packed, half the integers.
- On CPU, scipy's dsyrk (OpenBLAS) on the float64 rows. Its threads are limited like torch's
  (`limit_threads`, through threadpoolctl), though the bits do not depend on them: each entry's
  dot product is one thread's, in the same order.
- Elsewhere (CUDA), the general float64 product, of which the same triangle is kept.
Either way a window's triangle depends only on its own rows, so it has the same bits on whichever
rank holds the window.

The reconstruction errors (hpcprune.prune.sequential.reconstruction), a diagnostic, take the
triangle in float32 instead, at half float64's cost, from `add_lower_gram`: torch's float32 products
on panels of PANEL rows of the lower triangle, added up over a group of windows, whose bits,
unlike OpenBLAS's ssyrk's, do not depend on the threads; it agrees with the float64 product to
about 1e-6 of its largest entry.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from scipy.linalg.blas import dsyrk
from threadpoolctl import threadpool_limits


def upper_gram(rows: torch.Tensor) -> torch.Tensor:
    """XᵀX of rows (positions x features) in float64: entries on and above the diagonal are exact
    to the product; those below are 0 on CPU, the mirror image elsewhere (`packed` reads above)."""
    return add_gram(None, rows)


def add_gram(total: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """total + XᵀX (`upper_gram`'s triangle), in total's memory: on CPU syrk's own C ← XᵀX + C, which
    saves a pass over the matrix per window. `total` must come from `upper_gram` or `add_gram`."""
    rows = rows.to(torch.float64)
    if rows.device.type != "cpu":
        return rows.T @ rows if total is None else total.addmm_(rows.T, rows)
    # rows.T is column-major without a copy: syrk's A·Aᵀ with A = Xᵀ, features x positions.
    positions_last = rows.contiguous().numpy().T
    if total is None:
        return torch.from_numpy(dsyrk(1.0, positions_last, trans=0, lower=0))
    into = total.numpy()  # column-major, as syrk made it: updated where it lies
    summed = dsyrk(1.0, positions_last, beta=1.0, c=into, trans=0, lower=0, overwrite_c=1)
    if not np.shares_memory(summed, into):
        raise RuntimeError("syrk copied its C: the total is not syrk's column-major result")
    return total


PANEL = 128
"""Rows of the lower triangle per float32 product in `add_lower_gram`: a panel of rows r0..r1 costs
(r1 - r0) x r1 products per position, so narrower panels waste less above the diagonal and wider
ones make fuller matrix products; 128 was the fastest of 64 to 192 for 576 and 1536 features."""


def add_lower_gram(total: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """total + XᵀX in float32 on and below the diagonal, panel by panel in total's memory (a row-major
    square; above the triangle: unread). Windows added one by one this way cost what their rows
    concatenated would, without the copy, and a third less than a triangle packed per window."""
    rows = rows.to(torch.float32)
    features = rows.shape[1]
    if total is None:
        total = torch.zeros(features, features, dtype=torch.float32, device=rows.device)
    for start in range(0, features, PANEL):
        end = min(features, start + PANEL)
        total[start:end, :end].addmm_(rows[:, start:end].T, rows[:, :end])
    return total


def packed_lower(total: torch.Tensor) -> torch.Tensor:
    """`add_lower_gram`'s triangle as `packed` gives an upper one (its transpose's, from contiguous memory)."""
    return packed(total.mT)


def packed_gram(rows: torch.Tensor) -> torch.Tensor:
    """`packed(upper_gram(rows))` in float32."""
    return packed_lower(add_lower_gram(None, rows))


@functools.lru_cache(maxsize=16)
def _lower_offsets(features: int, device: torch.device) -> torch.Tensor:
    """Offsets, in a row-major square, of its lower triangle (diagonal included), row by row."""
    rows, columns = torch.tril_indices(features, features, device=device)
    return rows * features + columns


def packed_size(features: int) -> int:
    return features * (features + 1) // 2


def packed(gram: torch.Tensor) -> torch.Tensor:
    """The upper triangle (diagonal included) of a square matrix as one vector: the lower triangle of
    its transpose, row by row, which for syrk's column-major result is a gather from contiguous memory."""
    return torch.take(gram.mT, _lower_offsets(gram.shape[0], gram.device))


def unpacked(triangle: torch.Tensor, features: int) -> torch.Tensor:
    """The symmetric matrix whose upper triangle `packed` gave, each entry and its mirror the same bits."""
    lower = torch.zeros(features, features, dtype=triangle.dtype, device=triangle.device)
    lower.view(-1)[_lower_offsets(features, triangle.device)] = triangle
    return lower + lower.tril(-1).mT


def limit_threads(threads: int) -> None:
    """BLAS threads (scipy's OpenBLAS) per process, as `torch.set_num_threads` sets torch's."""
    threadpool_limits(limits=threads, user_api="blas")
