"""Selection rules: exact global k smallest, per-layer and threshold rules, ties, ranks, chunking.

    python -m pytest tests/test_select.py -q
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Mapping

import numpy as np
import pytest
import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

from hpcprune.archive.codec import pack_mask, unpack_mask
from hpcprune.dist.failures import AgreedFailure
from hpcprune.dist.world import SingleWorld, World
from hpcprune.prune import radix, streaming
from hpcprune.prune.plan import Plan, TensorSpec, assign_owners
from hpcprune.prune.rules import RULES, select
from hpcprune.prune.selection import Selection, prune_count

SHAPES = ((40, 30), (8, 3, 3, 3), (10, 40), (7,))
# nm needs input counts that are multiples of m, which SHAPES lack: tests/test_criteria.py checks it on its own shapes
SHAPE_FREE_RULES = sorted(set(RULES) - {"nm"})


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


def unpacked(chosen: Selection) -> dict[str, torch.Tensor]:
    """The selection's packed masks as bool tensors, after checking they are exactly pack_mask's bytes."""
    assert chosen.masks.keys() == chosen.shapes.keys()
    masks = {}
    for name, packed in chosen.masks.items():
        numel = int(np.prod(chosen.shapes[name]))
        assert isinstance(packed, np.ndarray) and packed.dtype == np.uint8 and packed.shape == ((numel + 7) // 8,), name
        masks[name] = unpack_mask(packed, chosen.shapes[name])
        assert np.array_equal(pack_mask(masks[name]), packed), name  # padding bits of the last byte are 0
    return masks


def assert_same_bool_masks(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """In-memory bool masks, equal name for name (tests.helpers.assert_same_masks compares archives)."""
    assert got.keys() == expected.keys()
    for name, mask in expected.items():
        assert got[name].dtype == torch.bool and got[name].shape == mask.shape, name
        assert torch.equal(got[name], mask), name


class LazyScores(Mapping[str, torch.Tensor]):
    """Scores made afresh on every access and never cached; counts reads and watches the tensors' lifetimes.

    Each tensor is built on a fresh numpy buffer, which its storage keeps alive: a weak reference to
    the buffer therefore sees every view (reshape, detach, slices, .numpy()) that still holds the scores.
    """

    def __init__(self, values: dict[str, torch.Tensor]):
        self._values = values
        self.reads = dict.fromkeys(values, 0)
        self.order: list[str] = []  # every access, in turn
        self._handed_out: list[weakref.ref] = []
        self.most_alive = 0  # most score buffers alive at once, counted as each new one is handed out

    def __getitem__(self, name: str) -> torch.Tensor:
        buffer = self._values[name].numpy().copy()
        self.reads[name] += 1
        self.order.append(name)
        self._handed_out.append(weakref.ref(buffer))
        self.most_alive = max(self.most_alive, self.alive())
        return torch.from_numpy(buffer)

    def alive(self) -> int:
        return sum(ref() is not None for ref in self._handed_out)

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


@pytest.fixture
def two_threads():
    """Worker threads on (the default on the 2-core CI machine, made explicit so the threaded path runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


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
    merged = {name: mask for chosen in selections for name, mask in unpacked(chosen).items()}
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
    masks = unpacked(chosen)
    k = prune_count(sparsity, plan.total)
    assert chosen.total == plan.total
    assert chosen.kept == plan.total - k == sum(int(mask.sum()) for mask in masks.values())
    assert_same_bool_masks(masks, reference_masks(plan, scores, k))
    if k == 0:
        assert chosen.threshold is None
    else:
        pruned = torch.cat([scores[name][~mask] for name, mask in masks.items()])
        kept = torch.cat([scores[name][mask] for name, mask in masks.items()])
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
    masks = unpacked(chosen)
    for spec, module in zip(tensors, modules):
        assert torch.equal(masks[spec.name], module.weight_mask.bool()), spec.name


def test_global_all_equal_scores_prunes_earliest_positions():
    plan = make_plan()
    scores = {spec.name: torch.ones(spec.shape) for spec in plan.tensors}
    k = prune_count(0.6, plan.total)
    chosen = select("global", scores, plan, SingleWorld(), sparsity=0.6)
    masks = unpacked(chosen)
    flat = torch.cat([masks[spec.name].reshape(-1) for spec in plan.tensors])
    assert not flat[:k].any() and flat[k:].all()
    assert chosen.threshold == 1.0 and chosen.kept == plan.total - k


@pytest.mark.parametrize("sparsity", [0.1, 0.45, 0.5, 0.73, 0.99])
def test_global_ties_broken_by_tensor_then_flat_index(sparsity):
    plan = make_plan()
    scores = random_scores(plan, seed=3, values=[0.5, 1.0, 2.0])
    chosen = select("global", scores, plan, SingleWorld(), sparsity=sparsity)
    assert_same_bool_masks(unpacked(chosen), reference_masks(plan, scores, prune_count(sparsity, plan.total)))


def test_global_orders_negative_scores_and_signed_zeros():
    plan = make_plan()
    values = [-3.5, -1.0, -1e-30, -0.0, 0.0, 1e-45, 2.0, -1e-45, 3e38, -3e38, float("inf")]
    scores = random_scores(plan, seed=5, values=values)
    for sparsity in (0.05, 0.2, 0.35, 0.4, 0.5, 0.6, 0.95, 1.0):
        chosen = select("global", scores, plan, SingleWorld(), sparsity=sparsity)
        assert_same_bool_masks(unpacked(chosen), reference_masks(plan, scores, prune_count(sparsity, plan.total)))


def test_global_signed_zero_threshold_is_positive_zero_and_ties_by_position():
    plan = make_plan(((4,),))
    scores = {"layer0.weight": torch.tensor([0.0, -0.0, -1.0, 0.0])}
    chosen = select("global", scores, plan, SingleWorld(), sparsity=0.5)
    assert unpacked(chosen)["layer0.weight"].tolist() == [False, True, False, True]
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
    masks = unpacked(chosen)
    for spec in plan.tensors:
        assert not masks[spec.name][scores[spec.name] == float("-inf")].any()
    assert chosen.kept == plan.total - max(gone, prune_count(sparsity, plan.total))
    assert_same_bool_masks(masks, reference_masks(plan, scores, prune_count(sparsity, plan.total)))
    if sparsity == 0.0:
        assert chosen.threshold == float("-inf")


@pytest.mark.parametrize("rule", SHAPE_FREE_RULES)
def test_nan_scores_raise_value_error_naming_the_tensor(rule):
    plan = make_plan()
    scores = random_scores(plan)
    scores["layer2.weight"][3, 4] = float("nan")
    with pytest.raises(ValueError, match="layer2.weight"):
        select(rule, scores, plan, SingleWorld(), sparsity=0.5, threshold=0.0)


def test_global_single_element_fully_pruned():
    plan = make_plan(((1,),))
    chosen = select("global", {"layer0.weight": torch.tensor([2.5])}, plan, SingleWorld(), sparsity=1.0)
    assert unpacked(chosen)["layer0.weight"].tolist() == [False] and chosen.threshold == 2.5 and chosen.kept == 0


# --- many ranks --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [2, 3, 4, 5])  # 5 ranks, 4 tensors: one rank owns nothing
@pytest.mark.parametrize("values", [None, [0.25, 1.0, -1.0, 0.0, float("-inf")]])
def test_global_masks_do_not_depend_on_world_size_or_owners(size, values):
    plan = make_plan()
    scores = random_scores(plan, seed=7, values=values)
    alone = select("global", scores, plan, SingleWorld(), sparsity=0.6)

    merged, selections = select_on_ranks("global", SHAPES, scores, size, sparsity=0.6)

    assert_same_bool_masks(merged, unpacked(alone))
    for rank, chosen in enumerate(selections):
        assert set(chosen.masks) == set(chosen.shapes) == {spec.name for spec in make_plan(SHAPES, size).local(rank)}
        assert (chosen.kept, chosen.threshold, chosen.total) == (alone.kept, alone.threshold, alone.total)


@pytest.mark.parametrize("rule", ["layer", "threshold"])
def test_other_rules_do_not_depend_on_world_size(rule):
    plan = make_plan()
    scores = random_scores(plan, seed=11, values=[0.1, 0.2, 0.3, 0.4])
    alone = select(rule, scores, plan, SingleWorld(), sparsity=0.5, threshold=0.2)
    merged, selections = select_on_ranks(rule, SHAPES, scores, 3, sparsity=0.5, threshold=0.2)
    assert_same_bool_masks(merged, unpacked(alone))
    assert all(chosen.kept == alone.kept for chosen in selections)


def failures_on_two_ranks(rule: str, scores_of_rank) -> dict[int, AgreedFailure]:
    """Each rank's AgreedFailure when two ranks select with `scores_of_rank(rank, plan)`."""
    plan = make_plan(SHAPES, 2)
    raised = {}

    def job(world):
        try:
            select(rule, scores_of_rank(world.rank, plan), plan, world, sparsity=0.5, threshold=0.0)
        except AgreedFailure as failure:
            raised[world.rank] = failure

    run_ranks(2, job)
    assert sorted(raised) == [0, 1] and {failure.failed_rank for failure in raised.values()} == {1}
    assert raised[0].cause is None and not raised[0].reports  # rank 0 only learns that rank 1 failed
    assert raised[1].reports
    return raised


def own_scores(rank: int, plan, scores) -> dict:
    return {spec.name: scores[spec.name] for spec in plan.local(rank)}


@pytest.mark.parametrize("rule", SHAPE_FREE_RULES)
def test_nan_on_one_rank_raises_on_every_rank_and_the_failing_rank_reports_it(rule):
    scores = random_scores(make_plan(SHAPES, 2))
    bad = make_plan(SHAPES, 2).local(1)[0].name
    scores[bad].view(-1)[0] = float("nan")
    raised = failures_on_two_ranks(rule, lambda rank, plan: own_scores(rank, plan, scores))
    assert isinstance(raised[1].cause, ValueError) and bad in str(raised[1].cause)


class Exhausted(dict):
    """Scores whose computation runs out of memory."""

    def __getitem__(self, name):
        raise MemoryError(f"no memory to score {name}")


@pytest.mark.parametrize("rule", SHAPE_FREE_RULES)
def test_any_failure_reading_one_ranks_scores_is_raised_on_every_rank(rule):
    """Not only bad scores: whatever reading (scoring) a tensor raises must not leave the others waiting."""
    scores = random_scores(make_plan(SHAPES, 2))
    raised = failures_on_two_ranks(rule, lambda rank, plan: (Exhausted if rank else dict)(own_scores(rank, plan, scores)))
    assert isinstance(raised[1].cause, MemoryError)


# --- lazy scores and packed masks ----------------------------------------------------------------------

READS_PER_TENSOR = {"global": 2, "layer": 1, "threshold": 1, "row": 1}  # passes that read a tensor's scores


@pytest.mark.parametrize("rule", SHAPE_FREE_RULES)
@pytest.mark.parametrize("values", [None, [0.5, 1.0, 2.0, float("-inf")]])
def test_lazy_scores_are_read_once_per_pass_one_tensor_at_a_time(monkeypatch, two_threads, rule, values):
    monkeypatch.setattr(streaming, "CHUNK", 64)  # several chunks per tensor: the worker threads share them
    plan = make_plan()
    fixed = random_scores(plan, seed=23, values=values)
    lazy = LazyScores(fixed)
    chosen = select(rule, lazy, plan, SingleWorld(), sparsity=0.6, threshold=1.0)
    assert 1 <= min(lazy.reads.values()) and max(lazy.reads.values()) <= READS_PER_TENSOR[rule]
    assert lazy.most_alive == 1 and lazy.alive() == 0
    assert torch.get_num_threads() == 2  # single-threaded torch only while selecting
    eager = select(rule, fixed, plan, SingleWorld(), sparsity=0.6, threshold=1.0)
    assert_same_bool_masks(unpacked(chosen), unpacked(eager))
    assert (chosen.kept, chosen.threshold) == (eager.kept, eager.threshold)


@pytest.mark.parametrize("values, most_reads", [(None, 3), ([0.5, 1.0, 2.0], 4)])
def test_global_reads_again_only_past_the_retain_limit(monkeypatch, two_threads, values, most_reads):
    # With nothing retained, pass 3 rereads the tensors with elements in the boundary's bin, and pass 4
    # those keeping some of their many ties; the masks stay exact.
    monkeypatch.setattr(streaming, "CHUNK", 64)
    monkeypatch.setattr(radix, "RETAIN_LIMIT", 0)
    monkeypatch.setattr(radix, "SPILL_SHARE", 0)
    plan = make_plan()
    fixed = random_scores(plan, seed=29, values=values)
    lazy = LazyScores(fixed)
    chosen = select("global", lazy, plan, SingleWorld(), sparsity=0.45)
    assert max(lazy.reads.values()) == most_reads
    assert lazy.most_alive == 1 and lazy.alive() == 0
    assert_same_bool_masks(unpacked(chosen), reference_masks(plan, fixed, prune_count(0.45, plan.total)))


class CountedSpills(streaming.Spill):
    """A spill file that records itself, what was written to it, and whether it was closed."""

    made: list[CountedSpills] = []

    def __init__(self):
        super().__init__()
        self.closed = False
        CountedSpills.made.append(self)

    def close(self) -> None:
        self.closed = True
        super().close()


@pytest.fixture
def counted_spills(monkeypatch):
    CountedSpills.made = []
    monkeypatch.setattr(streaming, "Spill", CountedSpills)
    return CountedSpills.made


@pytest.mark.parametrize("values, retain_limit, most_reads", [
    (None, 0, 2),  # the bin spilled: T decides it without another read
    ([0.5, 1.0, 2.0], 10**6, 2),  # many ties, spilled, but their flat indices fit in memory
    ([0.5, 1.0, 2.0], 0, 3),  # too many ties to hold: pass 4 reads the tensors keeping some of them
])
def test_global_spills_the_bin_past_the_retain_limit_instead_of_reading_again(
        monkeypatch, two_threads, counted_spills, values, retain_limit, most_reads):
    monkeypatch.setattr(streaming, "CHUNK", 64)
    monkeypatch.setattr(radix, "RETAIN_LIMIT", retain_limit)
    monkeypatch.setattr(radix, "SPILL_SHARE", 1)
    monkeypatch.setattr(streaming.Budget, "keep", spill_everything(streaming.Budget.keep))
    plan = make_plan()
    fixed = random_scores(plan, seed=29, values=values)
    lazy = LazyScores(fixed)
    chosen = select("global", lazy, plan, SingleWorld(), sparsity=0.45)
    assert max(lazy.reads.values()) == most_reads
    assert len(counted_spills) == 1 and counted_spills[0].bytes > 0 and counted_spills[0].closed
    assert_same_bool_masks(unpacked(chosen), reference_masks(plan, fixed, prune_count(0.45, plan.total)))


def spill_everything(keep):
    """Budget.keep with no room in memory, whatever RETAIN_LIMIT (which then bounds only the ties held)."""
    def spilling(budget, offsets, digits):
        if budget.spill_left and budget.left is not None:
            budget.left = 0
        return keep(budget, offsets, digits)
    return spilling


def test_global_reads_again_when_the_bin_outgrows_the_spill_share(monkeypatch, counted_spills):
    monkeypatch.setattr(streaming, "CHUNK", 64)
    monkeypatch.setattr(radix, "RETAIN_LIMIT", 0)
    monkeypatch.setattr(radix, "SPILL_SHARE", 0.001)  # a few elements: less than the bin holds
    plan = make_plan()
    fixed = random_scores(plan, seed=29)
    lazy = LazyScores(fixed)
    chosen = select("global", lazy, plan, SingleWorld(), sparsity=0.45)
    assert max(lazy.reads.values()) == 3
    assert all(spill.closed for spill in counted_spills)  # given up, and deleted at once
    assert_same_bool_masks(unpacked(chosen), reference_masks(plan, fixed, prune_count(0.45, plan.total)))


def test_a_spill_that_cannot_be_written_falls_back_to_reading_again(monkeypatch, counted_spills):
    def disk_full(spill, offsets, digits):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(streaming, "CHUNK", 64)
    monkeypatch.setattr(radix, "RETAIN_LIMIT", 0)
    monkeypatch.setattr(radix, "SPILL_SHARE", 1)
    monkeypatch.setattr(CountedSpills, "append", disk_full)
    plan = make_plan()
    fixed = random_scores(plan, seed=29)
    lazy = LazyScores(fixed)
    chosen = select("global", lazy, plan, SingleWorld(), sparsity=0.45)
    assert max(lazy.reads.values()) == 3 and counted_spills and all(spill.closed for spill in counted_spills)
    assert_same_bool_masks(unpacked(chosen), reference_masks(plan, fixed, prune_count(0.45, plan.total)))


def test_each_pass_reads_the_tensors_in_the_reverse_order_of_the_pass_before(monkeypatch):
    # What a pass read last is what the page cache still holds of a checkpoint larger than memory.
    monkeypatch.setattr(radix, "RETAIN_LIMIT", 0)  # pass 3 runs
    monkeypatch.setattr(radix, "SPILL_SHARE", 0)
    plan = make_plan()
    fixed = random_scores(plan, seed=31)
    lazy = LazyScores(fixed)
    chosen = select("global", lazy, plan, SingleWorld(), sparsity=0.45)
    names = [spec.name for spec in plan.local(0)]
    assert lazy.order[: 2 * len(names)] == names + names[::-1]
    third = lazy.order[2 * len(names):]  # the tensors with elements in the boundary's bin, forward again
    assert third and third == sorted(set(third), key=names.index)
    assert_same_bool_masks(unpacked(chosen), reference_masks(plan, fixed, prune_count(0.45, plan.total)))


def test_lazy_scores_on_many_ranks_agree_with_one_process(monkeypatch):
    monkeypatch.setattr(streaming, "CHUNK", 16)
    plan = make_plan(SHAPES, 3)
    fixed = random_scores(plan, seed=31, values=[0.25, 1.0, -1.0, 0.0])
    alone = select("global", fixed, make_plan(), SingleWorld(), sparsity=0.55)

    def job(world):
        lazy = LazyScores({spec.name: fixed[spec.name] for spec in plan.local(world.rank)})
        return select("global", lazy, plan, world, sparsity=0.55), lazy

    results = run_ranks(3, job)
    merged = {name: mask for chosen, _ in results for name, mask in unpacked(chosen).items()}
    assert_same_bool_masks(merged, unpacked(alone))
    for chosen, lazy in results:
        assert max(lazy.reads.values(), default=0) <= 2 and lazy.most_alive <= 1 and lazy.alive() == 0
        assert (chosen.kept, chosen.threshold) == (alone.kept, alone.threshold)


@pytest.mark.parametrize("rule", SHAPE_FREE_RULES)
def test_masks_are_packed_bits_of_the_flat_mask(rule):
    shapes = ((3, 5), (7,), (2, 2, 2), (1,), (4, 9))  # 15, 7, 8, 1 and 36 elements: padded last bytes and none
    plan = make_plan(shapes)
    scores = random_scores(plan, seed=37)
    chosen = select(rule, scores, plan, SingleWorld(), sparsity=0.5, threshold=0.0)
    assert chosen.shapes == {spec.name: spec.shape for spec in plan.tensors}
    for spec in plan.tensors:
        packed = chosen.masks[spec.name]
        assert packed.dtype == np.uint8 and packed.shape == ((spec.numel + 7) // 8,)
        bits = np.unpackbits(packed, bitorder="big")
        assert not bits[spec.numel :].any()  # padding bits are 0, as np.packbits leaves them
        assert torch.equal(unpack_mask(packed, spec.shape), unpacked(chosen)[spec.name])
    if rule == "threshold":
        assert_same_bool_masks(unpacked(chosen), {name: score > 0.0 for name, score in scores.items()})


@pytest.mark.parametrize("sparsity", [0.0, 1.0])
def test_nothing_or_everything_pruned_gives_full_or_empty_packed_masks(sparsity):
    plan = make_plan(((3, 5), (7,), (8,)))
    chosen = select("global", random_scores(plan, seed=41), plan, SingleWorld(), sparsity=sparsity)
    for spec in plan.tensors:
        expected = torch.full(spec.shape, sparsity == 0.0)
        assert np.array_equal(chosen.masks[spec.name], pack_mask(expected)), spec.name


@pytest.mark.parametrize("rule", SHAPE_FREE_RULES)
def test_wrong_scores_on_one_rank_raise_on_every_rank(rule):
    scores = random_scores(make_plan(SHAPES, 2))
    bad = make_plan(SHAPES, 2).local(1)[0].name
    scores[bad] = scores[bad].double()
    raised = failures_on_two_ranks(rule, lambda rank, plan: own_scores(rank, plan, scores))
    assert bad in str(raised[1].cause) and "float32" in str(raised[1].cause)


# --- chunking ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 7, 64, 1200])
@pytest.mark.parametrize("retain_limit", [0, 5, 1 << 21])
@pytest.mark.parametrize("spill_share", [0, 0.01, 1])
def test_global_is_exact_for_any_chunk_size(monkeypatch, chunk, retain_limit, spill_share):
    monkeypatch.setattr(streaming, "CHUNK", chunk)
    monkeypatch.setattr(radix, "RETAIN_LIMIT", retain_limit)
    monkeypatch.setattr(radix, "SPILL_SHARE", spill_share)  # none, some of the bin, all of it
    plan = make_plan()
    for values in (None, [0.5, 1.0, 2.0, -0.0]):
        scores = random_scores(plan, seed=13, values=values)
        for sparsity in (0.3, 0.71):
            chosen = select("global", scores, plan, SingleWorld(), sparsity=sparsity)
            assert_same_bool_masks(unpacked(chosen), reference_masks(plan, scores, prune_count(sparsity, plan.total)))


def test_chunked_ranks_agree_with_single_process(monkeypatch):
    monkeypatch.setattr(streaming, "CHUNK", 13)
    plan = make_plan()
    scores = random_scores(plan, seed=17, values=[1.0, 2.0])
    alone = select("global", scores, plan, SingleWorld(), sparsity=0.4)
    merged, _ = select_on_ranks("global", SHAPES, scores, 3, sparsity=0.4)
    assert_same_bool_masks(merged, unpacked(alone))


# --- layer rule --------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, [0.5, 1.0, 2.0], [1.0]])
@pytest.mark.parametrize("sparsity", [0.0, 0.35, 0.5, 0.9])
def test_layer_prunes_the_same_fraction_of_every_tensor(monkeypatch, values, sparsity):
    monkeypatch.setattr(streaming, "CHUNK", 50)
    plan = make_plan()
    scores = random_scores(plan, seed=19, values=values)
    chosen = select("layer", scores, plan, SingleWorld(), sparsity=sparsity)
    masks, kept = unpacked(chosen), 0
    for spec in plan.tensors:
        alone = Plan((TensorSpec(0, spec.name, spec.shape),), (0,))
        expected = reference_masks(alone, {spec.name: scores[spec.name]}, prune_count(sparsity, spec.numel))
        assert torch.equal(masks[spec.name], expected[spec.name]), spec.name
        kept += spec.numel - prune_count(sparsity, spec.numel)
    assert chosen.kept == kept and chosen.threshold is None


def test_layer_keeps_negative_infinity_pruned():
    plan = make_plan(((10,), (10,)))
    scores = {"layer0.weight": torch.arange(10.0), "layer1.weight": torch.arange(10.0)}
    scores["layer1.weight"][5:] = float("-inf")
    masks = unpacked(chosen := select("layer", scores, plan, SingleWorld(), sparsity=0.2))
    assert masks["layer0.weight"].tolist() == [False] * 2 + [True] * 8
    assert masks["layer1.weight"].tolist() == [True] * 5 + [False] * 5
    assert chosen.kept == 13


# --- threshold rule ----------------------------------------------------------------------------------


def test_threshold_prunes_scores_at_or_below_it():
    plan = make_plan(((6,),))
    scores = {"layer0.weight": torch.tensor([0.1, 0.2, 0.3, -5.0, float("-inf"), 0.25])}
    chosen = select("threshold", scores, plan, SingleWorld(), sparsity=0.0, threshold=0.25)
    assert unpacked(chosen)["layer0.weight"].tolist() == [False, False, True, False, False, False]
    assert chosen.kept == 1 and chosen.threshold == 0.25 and chosen.total == 6


def test_threshold_rule_needs_a_threshold():
    plan = make_plan()
    with pytest.raises(ValueError, match="threshold"):
        select("threshold", random_scores(plan), plan, SingleWorld(), sparsity=0.5)


# --- contract checks ---------------------------------------------------------------------------------


def test_unknown_rule_is_refused():
    plan = make_plan()
    with pytest.raises(ValueError, match="unknown selection rule 'median'"):
        select("median", random_scores(plan), plan, SingleWorld(), sparsity=0.5)


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
    assert unpacked(chosen)["layer0.weight"].shape == (30, 40)
    assert_same_bool_masks(unpacked(chosen), reference_masks(plan, scores, prune_count(0.5, plan.total)))
