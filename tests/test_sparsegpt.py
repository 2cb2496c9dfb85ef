"""SparseGPT's solve against a plain Algorithm 1 written here, and against Wanda and magnitude.

    python -m pytest tests/test_sparsegpt.py -q

The plain version follows the paper column by column with explicit formulas and none of the
module's shortcuts: H⁻¹ by torch.linalg.inv, each column's OBS update from the explicitly reduced
inverse Hessian (H⁻¹ with the earlier columns eliminated one by one, not a Cholesky factor), every
later column updated at once (no lazy blocks), and masks chosen by a Python sort on (saliency,
position). Both run in float64, so masks must be equal and weights equal to rounding.
"""

from __future__ import annotations

import pytest
import torch

from hpcprune.prune.sparsegpt import (
    ROW_TILE,
    HessianNotPositiveDefinite,
    SparseGPTRule,
    invert_hessian,
    row_ranges,
    sparsegpt,
)

# --- the plain Algorithm 1 -------------------------------------------------------------------------


def reduced_inverses(hessian: torch.Tensor, percdamp: float) -> tuple[list[float], list[torch.Tensor], torch.Tensor]:
    """For each column j: [H_j⁻¹]_jj and row j of H_j⁻¹ (columns j..), where H_j⁻¹ is the damped
    inverse Hessian with columns 0..j-1 eliminated; and the dead inputs."""
    h = hessian.clone().double()
    dead = torch.diag(h) == 0
    for j in torch.nonzero(dead).flatten().tolist():
        h[j, j] = 1.0
    damp = percdamp * torch.diag(h).mean()
    h = h + damp * torch.eye(h.shape[0], dtype=torch.float64)
    inverse = torch.linalg.inv(h)
    pivots, rows = [], []
    for j in range(h.shape[0]):
        pivots.append(float(inverse[j, j]))
        rows.append(inverse[j, j:].clone())
        # Eliminating column j: the inverse of the Hessian restricted to the remaining columns.
        inverse = inverse - torch.outer(inverse[:, j], inverse[j, :]) / inverse[j, j]
    return pivots, rows, dead


def smallest_positions(values: list[float], count: int) -> list[int]:
    """Positions of the `count` smallest values, the earlier position first among equal values."""
    return sorted(range(len(values)), key=lambda position: (values[position], position))[:count]


def plain_sparsegpt(weight, hessian, *, sparsity=0.5, selection="row", n=2, m=4, blocksize=128, percdamp=0.01):
    pivots, inverse_rows, dead = reduced_inverses(hessian, percdamp)
    w = weight.clone().double()
    w[:, dead] = 0.0
    rows, columns = w.shape
    keep = torch.ones(w.shape, dtype=torch.bool)
    for j in range(columns):
        if selection in ("row", "layer") and j % blocksize == 0:
            block = range(j, min(j + blocksize, columns))
            # Saliency of every weight of the block, with the weights as updated up to column j.
            saliency = (w[:, block.start:block.stop] ** 2 / torch.tensor(pivots[block.start:block.stop])).tolist()
            if selection == "row":
                count = round(sparsity * block.stop) - round(sparsity * block.start)
                for r in range(rows):
                    for position in smallest_positions(saliency[r], count):
                        keep[r, block[position]] = False
            else:
                count = round(sparsity * rows * block.stop) - round(sparsity * rows * block.start)
                flat = [value for row in saliency for value in row]
                for position in smallest_positions(flat, count):
                    keep[position // len(block), block[position % len(block)]] = False
        if selection == "nm" and j % m == 0:
            for r in range(rows):
                group = (w[r, j:j + m] ** 2 / torch.tensor(pivots[j:j + m])).tolist()
                for position in smallest_positions(group, m - n):
                    keep[r, j + position] = False
        pruned = ~keep[:, j]
        # OBS: remove w_rj and move the rest of each pruned row by -w_rj / [H⁻¹]_jj · H⁻¹_{j, j:}.
        w[pruned, j:] -= torch.outer(w[pruned, j] / pivots[j], inverse_rows[j])
        w[pruned, j] = 0.0
    return keep, w


# --- layers ------------------------------------------------------------------------------------------


def layer(rows: int, columns: int, seed: int, *, samples: int | None = None, dead: tuple[int, ...] = (),
          outliers: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight, inputs X: samples x columns, H = 2 XᵀX) of a random Linear layer; correlated inputs,
    a few outlier features scaled up (as LLM activations have), and `dead` inputs always 0."""
    generator = torch.Generator().manual_seed(seed)
    samples = samples or 4 * columns
    mixing = torch.eye(columns, dtype=torch.float64) + 0.3 * torch.randn(columns, columns, generator=generator,
                                                                          dtype=torch.float64) / columns ** 0.5
    x = torch.randn(samples, columns, generator=generator, dtype=torch.float64) @ mixing
    if outliers:
        chosen = torch.randperm(columns, generator=generator)[:outliers]
        x[:, chosen] *= 20.0
    x[:, list(dead)] = 0.0
    weight = torch.randn(rows, columns, generator=generator, dtype=torch.float64).float()
    return weight, x, 2.0 * x.T @ x


SHAPES = [
    (24, 64, ()),  # one block smaller than blocksize
    (40, 300, (5, 137, 299)),  # in-features not a multiple of the block size, dead inputs
    (150, 256, (0,)),  # rows over one tile
]


@pytest.mark.parametrize("rows, columns, dead", SHAPES)
@pytest.mark.parametrize("selection, blocksize", [("row", 128), ("layer", 128), ("nm", 128), ("row", 32)])
def test_equals_plain_algorithm(rows, columns, dead, selection, blocksize):
    weight, _, hessian = layer(rows, columns, seed=rows + columns, dead=dead)
    rule = SparseGPTRule(sparsity=0.5, selection=selection, blocksize=blocksize)
    solved = sparsegpt(weight, hessian, rule)
    keep, expected = plain_sparsegpt(weight, hessian, selection=selection, blocksize=blocksize)
    assert torch.equal(solved.keep, keep)
    assert solved.weight.dtype == weight.dtype
    assert torch.allclose(solved.weight.double(), expected.float().double(), rtol=1e-5, atol=1e-6)
    assert torch.all(solved.weight[~solved.keep] == 0.0)
    assert torch.all(solved.weight[:, list(dead)] == 0.0)


def test_float32_solve_follows_the_plain_algorithm():
    weight, _, hessian = layer(40, 300, seed=3, dead=(7,))
    solved = sparsegpt(weight, hessian, SparseGPTRule(), dtype=torch.float32)
    keep, expected = plain_sparsegpt(weight, hessian)
    assert torch.equal(solved.keep, keep)
    assert torch.allclose(solved.weight.double(), expected, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("sparsity", [0.5, 0.3, 0.7])
def test_exact_prune_counts(sparsity):
    weight, _, hessian = layer(50, 300, seed=11)
    by_row = sparsegpt(weight, hessian, SparseGPTRule(sparsity=sparsity, selection="row")).keep
    assert torch.all((~by_row).sum(dim=1) == round(sparsity * 300))
    by_layer = sparsegpt(weight, hessian, SparseGPTRule(sparsity=sparsity, selection="layer")).keep
    assert int((~by_layer).sum()) == round(sparsity * 50 * 300)
    assert len(set((~by_layer).sum(dim=1).tolist())) > 1  # pooled rows: shares differ between rows


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8)])
def test_nm_pattern(n, m):
    weight, _, hessian = layer(30, 64, seed=n)
    keep = sparsegpt(weight, hessian, SparseGPTRule(selection="nm", n=n, m=m)).keep
    assert torch.all(keep.reshape(30, -1, m).sum(dim=2) == n)


def test_rows_split_over_ranks_give_the_same_bits():
    weight, _, hessian = layer(3 * ROW_TILE + 44, 200, seed=5, dead=(3,))
    rule = SparseGPTRule(sparsity=0.5)
    whole = sparsegpt(weight, hessian, rule)
    again = sparsegpt(weight, hessian, rule)
    assert torch.equal(whole.weight, again.weight) and torch.equal(whole.keep, again.keep)
    inverse = invert_hessian(hessian, rule.percdamp)
    for parts in (2, 3, 4, 7):
        ranges = row_ranges(weight.shape[0], parts)
        assert ranges[0][0] == 0 and ranges[-1][1] == weight.shape[0]
        pieces = [sparsegpt(weight, inverse, rule, rows=span) for span in ranges]
        assert torch.equal(torch.cat([piece.weight for piece in pieces]), whole.weight)
        assert torch.equal(torch.cat([piece.keep for piece in pieces]), whole.keep)
        assert torch.equal(torch.cat([piece.losses for piece in pieces]), whole.losses)


@pytest.mark.parametrize("selection", ["row", "nm"])
def test_rows_split_give_the_same_bits_on_several_threads(selection):
    """torch cuts a large element-wise update between its threads where the update's size says: the
    rows a rank solves must not change the bits, whatever `sequential.threads` is."""
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        for rows, columns, seed in ((3 * ROW_TILE + 44, 200, 0), (5 * ROW_TILE + 20, 300, 1), (600, 256, 2)):
            weight, _, hessian = layer(rows, columns, seed=seed, dead=(3,))
            rule = SparseGPTRule(sparsity=0.5, selection=selection)
            inverse = invert_hessian(hessian, rule.percdamp)
            whole = sparsegpt(weight, inverse, rule)
            for parts in (2, 3, 4):
                pieces = [sparsegpt(weight, inverse, rule, rows=span) for span in row_ranges(rows, parts)]
                assert torch.equal(torch.cat([piece.weight for piece in pieces]), whole.weight), (rows, parts)
                assert torch.equal(torch.cat([piece.losses for piece in pieces]), whole.losses), (rows, parts)
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads


def test_row_ranges_on_tile_boundaries():
    assert row_ranges(300, 2) == [(0, 128), (128, 300)]
    assert row_ranges(100, 3) == [(0, 0), (0, 0), (0, 100)]
    assert all(start % ROW_TILE == 0 for start, _ in row_ranges(1000, 5))


def test_refuses_what_it_cannot_solve():
    weight, _, hessian = layer(200, 64, seed=1)
    with pytest.raises(ValueError, match="multiple of 128"):
        sparsegpt(weight, hessian, SparseGPTRule(), rows=(10, 200))
    with pytest.raises(ValueError, match="all rows at once"):
        sparsegpt(weight, hessian, SparseGPTRule(selection="layer"), rows=(0, 128))
    with pytest.raises(ValueError, match="not a multiple of m=8"):
        sparsegpt(weight[:, :60], hessian[:60, :60], SparseGPTRule(selection="nm", n=4, m=8))
    with pytest.raises(ValueError, match="blocksize a multiple"):
        SparseGPTRule(selection="nm", blocksize=30)
    indefinite = -torch.eye(64, dtype=torch.float64)
    with pytest.raises(HessianNotPositiveDefinite, match="sparsegpt.damping"):
        sparsegpt(weight, indefinite, SparseGPTRule(percdamp=0.0))


# --- against Wanda and magnitude ---------------------------------------------------------------------


def output_error(weight: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    """‖WX − ŴX‖² / ‖WX‖² over the calibration inputs."""
    dense = x @ weight.double().T
    return float((dense - x @ pruned.double().T).square().sum() / dense.square().sum())


def keep_per_group(scores: torch.Tensor, group: int, pruned: int) -> torch.Tensor:
    """Prune the `pruned` smallest scores of each group of `group` consecutive inputs of each row."""
    grouped = scores.reshape(-1, group)
    keep = torch.ones(grouped.shape, dtype=torch.bool)
    keep.scatter_(1, torch.sort(grouped, dim=1, stable=True).indices[:, :pruned], False)
    return keep.reshape(scores.shape)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_beats_wanda_beats_magnitude(seed, pattern):
    weight, x, hessian = layer(64, 256, seed=100 + seed, samples=1024, outliers=8)
    columns = weight.shape[1]
    group, pruned = (columns, columns // 2) if pattern == "unstructured" else (4, 2)
    rule = SparseGPTRule(selection="row") if pattern == "unstructured" else SparseGPTRule(selection="nm", n=2, m=4)
    solved = sparsegpt(weight, hessian, rule).weight
    wanda = weight * keep_per_group(weight.abs() * x.norm(dim=0).float(), group, pruned)
    magnitude = weight * keep_per_group(weight.abs(), group, pruned)
    errors = [output_error(weight, candidate, x) for candidate in (solved, wanda, magnitude)]
    assert errors[0] < errors[1] < errors[2], errors


def test_layers_sharing_a_hessian_share_its_factorisation(monkeypatch):
    """q, k and v read one input, so the dense pass gives them one Hessian tensor: the block method
    factors it once, and each layer's solve equals the solve with a factorisation of its own."""
    from hpcprune.prune.plan import TensorSpec
    from hpcprune.prune.sequential import methods
    from hpcprune.prune.sequential.methods import LayerRule, SparseGPT

    generator = torch.Generator().manual_seed(7)
    inputs = torch.randn(200, 24, generator=generator, dtype=torch.float64)
    statistics = {"hessian": 2 * inputs.T @ inputs / 200}
    weights = {name: torch.randn(rows, 24, generator=generator) for name, rows in (("q", 24), ("k", 8), ("v", 8))}
    rule = LayerRule("row", 0.5)
    factorisations = []
    monkeypatch.setattr(methods, "invert_hessian", lambda *args: factorisations.append(args) or invert_hessian(*args))
    shared = SparseGPT(block_size=8)
    decided = {name: shared.decide(TensorSpec(0, name, tuple(weight.shape)), weight, statistics, rule)
               for name, weight in weights.items()}
    assert len(factorisations) == 1
    for name, weight in weights.items():
        alone = SparseGPT(block_size=8).decide(TensorSpec(0, name, tuple(weight.shape)), weight,
                                               {"hessian": statistics["hessian"].clone()}, rule)
        assert torch.equal(decided[name].mask, alone.mask) and torch.equal(decided[name].weight, alone.weight), name
    assert len(factorisations) == 4
