"""Selection rules: exact global k smallest, per-layer and threshold rules, ties, ranks, chunking.

    python -m pytest tests/test_select.py -q
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

from hpcprune import select as selection_module
from hpcprune.plan import Plan, TensorSpec, assign_owners
from hpcprune.select import RULES, prune_count, select
from hpcprune.world import SingleWorld, World

SHAPES = ((40, 30), (8, 3, 3, 3), (10, 40), (7,))


# --- helpers -----------------------------------------------------------------------------------------


def make_plan(shapes=SHAPES, world_size: int = 1) -> Plan:
    tensors = tuple(TensorSpec(index, f"layer{index}.weight", tuple(shape)) for index, shape in enumerate(shapes))
    return Plan(tensors, assign_owners(tensors, world_size))


def random_scores(plan: Plan, seed: int = 0, values=None) -> dict[str, torch.Tensor]:
    """Scores per tensor: standard normal, or drawn from `values` (a small set makes many ties)."""
    generator = torch.Generator().manual_seed(seed)
    scores = {}
    for spec in plan.tensors:
        if values is None:
            scores[spec.name] = torch.randn(spec.shape, generator=generator)
        else:
            pool = torch.tensor(values, dtype=torch.float32)
            scores[spec.name] = pool[torch.randint(len(values), spec.shape, generator=generator)]
    return scores


def reference_masks(plan: Plan, scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Prune the k smallest of all scores by a stable sort over their concatenation in global order."""
    flat = np.concatenate([scores[spec.name].reshape(-1).numpy() for spec in plan.tensors])
    k = max(k, int(np.count_nonzero(flat == -np.inf)))
    keep = np.ones(flat.size, dtype=bool)
    keep[np.argsort(flat, kind="stable")[:k]] = False  # -0.0 == +0.0 for the sort, as for select
    masks, start = {}, 0
    for spec in plan.tensors:
        masks[spec.name] = torch.from_numpy(keep[start : start + spec.numel].reshape(spec.shape))
        start += spec.numel
    return masks


def assert_same_masks(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, mask in expected.items():
        assert got[name].dtype == torch.bool and got[name].shape == mask.shape, name
        assert torch.equal(got[name], mask), name


class ThreadWorld(World):
    """Ranks simulated by threads of one process; collectives meet at a barrier."""

    name = "threads"

    def __init__(self, rank: int, size: int, slots: list, meeting: threading.Barrier):
        self.rank, self.size, self._slots, self._meeting = rank, size, slots, meeting

    def _exchange(self, value):
        self._slots[self.rank] = value
        self._meeting.wait()
        everything = list(self._slots)
        self._meeting.wait()  # nobody overwrites a slot before all have read them
        return everything

    def allreduce_sum(self, array: np.ndarray) -> np.ndarray:
        return np.sum(self._exchange(np.array(array, copy=True)), axis=0)

    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        return self._exchange(data)[root]

    def gather_bytes(self, data: bytes, root: int = 0) -> list[bytes] | None:
        everything = self._exchange(data)
        return everything if self.rank == root else None

    def barrier(self) -> None:
        self._exchange(None)


def run_ranks(size: int, job):
    """job(world) on `size` simulated ranks; returns their results in rank order (or raises the first error)."""
    slots, meeting = [None] * size, threading.Barrier(size, timeout=60)
    results, errors = [None] * size, [None] * size

    def run(rank: int) -> None:
        try:
            results[rank] = job(ThreadWorld(rank, size, slots, meeting))
        except Exception as error:  # noqa: BLE001  (re-raised in the test's thread below)
            errors[rank] = error

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for error in errors:
        if error is not None:
            raise error
    return results


def select_on_ranks(rule: str, plan_shapes, scores, size: int, **options):
    """Each simulated rank selects on its own tensors; returns the merged masks and per-rank selections."""
    plan = make_plan(plan_shapes, size)

    def job(world: World):
        mine = {spec.name: scores[spec.name] for spec in plan.local(world.rank)}
        return select(rule, mine, plan, world, **options)

    selections = run_ranks(size, job)
    merged = {name: mask for chosen in selections for name, mask in chosen.masks.items()}
    return merged, selections


# --- prune_count -------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.25, 0.333, 0.5, 0.625, 0.875, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("total", [0, 1, 7, 8, 10, 1000, 2100])
def test_prune_count_rounds_as_torch_prune(sparsity, total):
    assert prune_count(sparsity, total) == torch_prune._compute_nparams_toprune(sparsity, total)


@pytest.mark.parametrize("sparsity", [-0.1, 1.5, float("nan")])
def test_prune_count_refuses_sparsity_outside_unit_interval(sparsity):
    with pytest.raises(ValueError, match="sparsity"):
        prune_count(sparsity, 10)


# --- global rule -------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.3333, 0.5, 0.77777, 0.9, 0.999, 1.0])
def test_global_prunes_exactly_k_smallest(sparsity):
    plan = make_plan()
    scores = random_scores(plan)
    chosen = select("global", scores, plan, SingleWorld(), sparsity=sparsity)
    k = prune_count(sparsity, plan.total)
    assert chosen.total == plan.total
    assert chosen.kept == plan.total - k == sum(int(mask.sum()) for mask in chosen.masks.values())
    assert_same_masks(chosen.masks, reference_masks(plan, scores, k))
    if k == 0:
        assert chosen.threshold is None
    else:
        pruned = torch.cat([scores[name][~mask] for name, mask in chosen.masks.items()])
        kept = torch.cat([scores[name][mask] for name, mask in chosen.masks.items()])
        assert chosen.threshold == float(pruned.max())
        assert kept.numel() == 0 or float(kept.min()) >= chosen.threshold


@pytest.mark.parametrize("sparsity", [0.2, 0.5, 0.8, 0.95])
def test_global_equals_torch_global_unstructured(sparsity):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Conv1d(4, 6, 3), nn.Linear(40, 12))
    weights = [model[0].weight, model[2].weight, model[3].weight]
    total = sum(w.numel() for w in weights)
    # Distinct magnitudes (no ties), random signs: both tools must then agree element for element.
    magnitudes = (1.0 + torch.randperm(total).float()) / total
    signs = torch.where(torch.rand(total) < 0.5, -1.0, 1.0)
    values = (magnitudes * signs).split([w.numel() for w in weights])
    with torch.no_grad():
        for weight, value in zip(weights, values):
            weight.copy_(value.view_as(weight))
    tensors = tuple(TensorSpec(i, f"w{i}", tuple(w.shape)) for i, w in enumerate(weights))
    plan = Plan(tensors, (0,) * len(tensors))
    scores = {spec.name: weight.detach().abs() for spec, weight in zip(tensors, weights)}

    chosen = select("global", scores, plan, SingleWorld(), sparsity=sparsity)

    modules = [model[0], model[2], model[3]]
    torch_prune.global_unstructured([(m, "weight") for m in modules], torch_prune.L1Unstructured, amount=sparsity)
    for spec, module in zip(tensors, modules):
        assert torch.equal(chosen.masks[spec.name], module.weight_mask.bool()), spec.name


def test_global_all_equal_scores_prunes_earliest_positions():
    plan = make_plan()
    scores = {spec.name: torch.ones(spec.shape) for spec in plan.tensors}
    k = prune_count(0.6, plan.total)
    chosen = select("global", scores, plan, SingleWorld(), sparsity=0.6)
    flat = torch.cat([chosen.masks[spec.name].reshape(-1) for spec in plan.tensors])
    assert not flat[:k].any() and flat[k:].all()
    assert chosen.threshold == 1.0 and chosen.kept == plan.total - k


@pytest.mark.parametrize("sparsity", [0.1, 0.45, 0.5, 0.73, 0.99])
def test_global_ties_broken_by_tensor_then_flat_index(sparsity):
    plan = make_plan()
    scores = random_scores(plan, seed=3, values=[0.5, 1.0, 2.0])
    chosen = select("global", scores, plan, SingleWorld(), sparsity=sparsity)
    assert_same_masks(chosen.masks, reference_masks(plan, scores, prune_count(sparsity, plan.total)))


def test_global_orders_negative_scores_and_signed_zeros():
    plan = make_plan()
    values = [-3.5, -1.0, -1e-30, -0.0, 0.0, 1e-45, 2.0, -1e-45, 3e38, -3e38, float("inf")]
    scores = random_scores(plan, seed=5, values=values)
    for sparsity in (0.05, 0.2, 0.35, 0.4, 0.5, 0.6, 0.95, 1.0):
        chosen = select("global", scores, plan, SingleWorld(), sparsity=sparsity)
        assert_same_masks(chosen.masks, reference_masks(plan, scores, prune_count(sparsity, plan.total)))


def test_global_signed_zero_threshold_is_positive_zero_and_ties_by_position():
    plan = make_plan(((4,),))
    scores = {"layer0.weight": torch.tensor([0.0, -0.0, -1.0, 0.0])}
    chosen = select("global", scores, plan, SingleWorld(), sparsity=0.5)
    assert chosen.masks["layer0.weight"].tolist() == [False, True, False, True]
    assert chosen.threshold == 0.0


@pytest.mark.parametrize("sparsity", [0.0, 0.01, 0.5])
def test_global_negative_infinity_is_always_pruned(sparsity):
    plan = make_plan()
    scores = random_scores(plan, seed=1)
    gone = 0
    for spec in plan.tensors:
        flat = scores[spec.name].view(-1)
        flat[::9] = float("-inf")  # pruned in an earlier round
        gone += flat[::9].numel()
    chosen = select("global", scores, plan, SingleWorld(), sparsity=sparsity)
    for spec in plan.tensors:
        assert not chosen.masks[spec.name][scores[spec.name] == float("-inf")].any()
    assert chosen.kept == plan.total - max(gone, prune_count(sparsity, plan.total))
    assert_same_masks(chosen.masks, reference_masks(plan, scores, prune_count(sparsity, plan.total)))
    if sparsity == 0.0:
        assert chosen.threshold == float("-inf")


@pytest.mark.parametrize("rule", sorted(RULES))
def test_nan_scores_raise_value_error_naming_the_tensor(rule):
    plan = make_plan()
    scores = random_scores(plan)
    scores["layer2.weight"][3, 4] = float("nan")
    with pytest.raises(ValueError, match="layer2.weight"):
        select(rule, scores, plan, SingleWorld(), sparsity=0.5, threshold=0.0)


def test_global_single_element_fully_pruned():
    plan = make_plan(((1,),))
    chosen = select("global", {"layer0.weight": torch.tensor([2.5])}, plan, SingleWorld(), sparsity=1.0)
    assert chosen.masks["layer0.weight"].tolist() == [False] and chosen.threshold == 2.5 and chosen.kept == 0


# --- many ranks --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [2, 3, 4, 5])  # 5 ranks, 4 tensors: one rank owns nothing
@pytest.mark.parametrize("values", [None, [0.25, 1.0, -1.0, 0.0, float("-inf")]])
def test_global_masks_do_not_depend_on_world_size_or_owners(size, values):
    plan = make_plan()
    scores = random_scores(plan, seed=7, values=values)
    alone = select("global", scores, plan, SingleWorld(), sparsity=0.6)

    merged, selections = select_on_ranks("global", SHAPES, scores, size, sparsity=0.6)

    assert_same_masks(merged, alone.masks)
    for rank, chosen in enumerate(selections):
        assert set(chosen.masks) == {spec.name for spec in make_plan(SHAPES, size).local(rank)}
        assert (chosen.kept, chosen.threshold, chosen.total) == (alone.kept, alone.threshold, alone.total)


@pytest.mark.parametrize("rule", ["layer", "threshold"])
def test_other_rules_do_not_depend_on_world_size(rule):
    plan = make_plan()
    scores = random_scores(plan, seed=11, values=[0.1, 0.2, 0.3, 0.4])
    alone = select(rule, scores, plan, SingleWorld(), sparsity=0.5, threshold=0.2)
    merged, selections = select_on_ranks(rule, SHAPES, scores, 3, sparsity=0.5, threshold=0.2)
    assert_same_masks(merged, alone.masks)
    assert all(chosen.kept == alone.kept for chosen in selections)


def test_nan_on_one_rank_raises_on_every_rank():
    plan = make_plan(SHAPES, 2)
    scores = random_scores(plan)
    bad = plan.local(1)[0].name
    scores[bad].view(-1)[0] = float("nan")
    raised = []

    def job(world):
        mine = {spec.name: scores[spec.name] for spec in plan.local(world.rank)}
        try:
            select("global", mine, plan, world, sparsity=0.5)
        except ValueError as error:
            raised.append((world.rank, str(error)))

    run_ranks(2, job)
    assert sorted(rank for rank, _ in raised) == [0, 1]
    assert any(bad in message for _, message in raised)


# --- chunking ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 7, 64, 1200])
@pytest.mark.parametrize("retain_limit", [0, 5, 1 << 21])
def test_global_is_exact_for_any_chunk_size(monkeypatch, chunk, retain_limit):
    monkeypatch.setattr(selection_module, "CHUNK", chunk)
    monkeypatch.setattr(selection_module, "RETAIN_LIMIT", retain_limit)
    plan = make_plan()
    for values in (None, [0.5, 1.0, 2.0, -0.0]):
        scores = random_scores(plan, seed=13, values=values)
        for sparsity in (0.3, 0.71):
            chosen = select("global", scores, plan, SingleWorld(), sparsity=sparsity)
            assert_same_masks(chosen.masks, reference_masks(plan, scores, prune_count(sparsity, plan.total)))


def test_chunked_ranks_agree_with_single_process(monkeypatch):
    monkeypatch.setattr(selection_module, "CHUNK", 13)
    plan = make_plan()
    scores = random_scores(plan, seed=17, values=[1.0, 2.0])
    alone = select("global", scores, plan, SingleWorld(), sparsity=0.4)
    merged, _ = select_on_ranks("global", SHAPES, scores, 3, sparsity=0.4)
    assert_same_masks(merged, alone.masks)


# --- layer rule --------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, [0.5, 1.0, 2.0], [1.0]])
@pytest.mark.parametrize("sparsity", [0.0, 0.35, 0.5, 0.9])
def test_layer_prunes_the_same_fraction_of_every_tensor(monkeypatch, values, sparsity):
    monkeypatch.setattr(selection_module, "CHUNK", 50)
    plan = make_plan()
    scores = random_scores(plan, seed=19, values=values)
    chosen = select("layer", scores, plan, SingleWorld(), sparsity=sparsity)
    kept = 0
    for spec in plan.tensors:
        alone = Plan((TensorSpec(0, spec.name, spec.shape),), (0,))
        expected = reference_masks(alone, {spec.name: scores[spec.name]}, prune_count(sparsity, spec.numel))
        assert torch.equal(chosen.masks[spec.name], expected[spec.name]), spec.name
        kept += spec.numel - prune_count(sparsity, spec.numel)
    assert chosen.kept == kept and chosen.threshold is None


def test_layer_keeps_negative_infinity_pruned():
    plan = make_plan(((10,), (10,)))
    scores = {"layer0.weight": torch.arange(10.0), "layer1.weight": torch.arange(10.0)}
    scores["layer1.weight"][5:] = float("-inf")
    chosen = select("layer", scores, plan, SingleWorld(), sparsity=0.2)
    assert chosen.masks["layer0.weight"].tolist() == [False] * 2 + [True] * 8
    assert chosen.masks["layer1.weight"].tolist() == [True] * 5 + [False] * 5
    assert chosen.kept == 13


# --- threshold rule ----------------------------------------------------------------------------------


def test_threshold_prunes_scores_at_or_below_it():
    plan = make_plan(((6,),))
    scores = {"layer0.weight": torch.tensor([0.1, 0.2, 0.3, -5.0, float("-inf"), 0.25])}
    chosen = select("threshold", scores, plan, SingleWorld(), sparsity=0.0, threshold=0.25)
    assert chosen.masks["layer0.weight"].tolist() == [False, False, True, False, False, False]
    assert chosen.kept == 1 and chosen.threshold == 0.25 and chosen.total == 6


def test_threshold_rule_needs_a_threshold():
    plan = make_plan()
    with pytest.raises(ValueError, match="threshold"):
        select("threshold", random_scores(plan), plan, SingleWorld(), sparsity=0.5)


# --- contract checks ---------------------------------------------------------------------------------


def test_unknown_rule_is_refused():
    plan = make_plan()
    with pytest.raises(ValueError, match="unknown selection rule 'nm'"):
        select("nm", random_scores(plan), plan, SingleWorld(), sparsity=0.5)


def test_scores_must_match_the_plan():
    plan = make_plan()
    scores = random_scores(plan)
    del scores["layer1.weight"]
    with pytest.raises(ValueError, match="layer1.weight"):
        select("global", scores, plan, SingleWorld(), sparsity=0.5)
    scores = random_scores(plan)
    scores["layer0.weight"] = scores["layer0.weight"].double()
    with pytest.raises(ValueError, match="float32"):
        select("global", scores, plan, SingleWorld(), sparsity=0.5)


def test_non_contiguous_scores_keep_their_shape():
    plan = make_plan(((30, 40),))
    scores = {"layer0.weight": torch.randn(40, 30).t()}
    chosen = select("global", scores, plan, SingleWorld(), sparsity=0.5)
    assert chosen.masks["layer0.weight"].shape == (30, 40)
    assert_same_masks(chosen.masks, reference_masks(plan, scores, prune_count(0.5, plan.total)))
