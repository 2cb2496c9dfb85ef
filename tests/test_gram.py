"""The Gram matrices of the block-sequential statistics: XᵀX made and summed as its upper triangle.

hpcprune.prune.sequential.gram computes one triangle (BLAS syrk on CPU), packs it for the exact sums
and mirrors it back: the triangle is XᵀX, the round trip loses no bit and gives a symmetric matrix,
and the bits do not depend on how many BLAS threads made them. The errors' float32 triangle
(`packed_gram`, panels of torch products) is the same triangle, in the same order, to float32's
precision, and its bits do not depend on torch's threads either.
"""

from __future__ import annotations

import pytest
import torch
from threadpoolctl import threadpool_limits

from hpcprune.prune.sequential import gram as gram_module
from hpcprune.prune.sequential.gram import add_gram, packed, packed_gram, packed_size, unpacked, upper_gram


@pytest.mark.parametrize("positions, features", [(1, 1), (7, 5), (256, 130), (300, 576)])
def test_the_upper_triangle_is_the_product_in_float64(positions, features):
    rows = torch.randn(positions, features, generator=torch.Generator().manual_seed(features))
    exact = rows.double().T @ rows.double()
    gram = upper_gram(rows)
    assert gram.dtype == torch.float64 and gram.shape == (features, features)
    upper = torch.ones(features, features, dtype=torch.bool).triu()
    scale = float(exact.abs().max())
    assert float((gram - exact)[upper].abs().max()) <= 1e-13 * scale


@pytest.mark.parametrize("features", [1, 2, 5, 64])
def test_packing_keeps_the_upper_triangle_and_mirrors_it_bit_for_bit(features):
    rows = torch.randn(9, features, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    gram = upper_gram(rows)
    triangle = packed(gram)
    assert triangle.shape == (packed_size(features),)
    square = unpacked(triangle, features)
    assert torch.equal(square, square.T)
    upper = torch.ones(features, features, dtype=torch.bool).triu()
    assert torch.equal(square[upper], gram[upper])
    assert torch.equal(packed(square), triangle)


def test_the_bits_do_not_depend_on_the_blas_threads():
    rows = torch.randn(512, 700, generator=torch.Generator().manual_seed(2))
    grams = []
    for threads in (1, 2, 3):
        with threadpool_limits(limits=threads, user_api="blas"):
            grams.append(packed(upper_gram(rows)))
    assert all(torch.equal(grams[0], gram) for gram in grams[1:])


def test_adding_into_a_sum_is_the_sum_of_the_windows_products():
    """add_gram works in the total's own memory (syrk's C ← XᵀX + C) and adds what upper_gram makes."""
    generator = torch.Generator().manual_seed(3)
    windows = [torch.randn(256, 96, generator=generator) * scale for scale in (1.0, 4.0, 0.5)]
    total = None
    for rows in windows:
        before = total
        total = add_gram(total, rows)
        assert before is None or total is before
    separate = sum(upper_gram(rows) for rows in windows)
    scale = float(separate.abs().max())
    assert float((packed(total) - packed(separate)).abs().max()) <= 1e-14 * scale


@pytest.mark.parametrize("panel", [128, 3])  # 3: panels that do not divide the features
@pytest.mark.parametrize("positions, features", [(1, 1), (7, 5), (256, 130), (300, 576)])
def test_the_float32_triangle_is_the_float64_one_to_float32_precision(positions, features, panel, monkeypatch):
    monkeypatch.setattr(gram_module, "PANEL", panel)
    rows = torch.randn(positions, features, generator=torch.Generator().manual_seed(features))
    exact = packed(upper_gram(rows))
    triangle = packed_gram(rows)
    assert triangle.dtype == torch.float32 and triangle.shape == exact.shape
    assert float((triangle.double() - exact).abs().max()) <= 1e-5 * float(exact.abs().max())


@pytest.mark.parametrize("features", [576, 1536])
def test_the_float32_bits_do_not_depend_on_torchs_threads(features):
    rows = torch.randn(256, features, generator=torch.Generator().manual_seed(4))
    before = torch.get_num_threads()
    triangles = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            triangles.append(packed_gram(rows))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(triangles[0], triangle) for triangle in triangles[1:])
