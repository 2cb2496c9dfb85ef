"""Weights read from a safetensors checkpoint tensor by tensor equal what safetensors itself loads."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from hpcprune.errors import UsageError
from hpcprune.models.weights import CheckpointWeights


def test_every_tensor_reads_back_exactly_and_only_float_weights_are_prunable(tmp_path):
    path = tmp_path / "model.safetensors"
    tensors = {
        "a.weight": torch.randn(5, 7),
        "a.bias": torch.randn(5),
        "b.weight": torch.randn(3, 2, 3, 3).to(torch.float16),
        "c.weight": torch.randn(4, 4).to(torch.bfloat16),
        "d.weight": torch.arange(12, dtype=torch.int64).reshape(3, 4),
        "e.weight": torch.randn(9, 2, dtype=torch.float64),
    }
    save_file(tensors, str(path), metadata={"note": "test"})
    weights = CheckpointWeights(path)
    assert [name for name, _ in weights.prunable()] == sorted(["a.weight", "b.weight", "c.weight", "e.weight"])
    expected = load_file(str(path))
    for name in expected:
        read = weights.get(name).clone()  # a view of the reused buffer: copy before the next get
        assert read.dtype == expected[name].dtype and torch.equal(read, expected[name]), name


@pytest.mark.parametrize("content, fragment", [(b"", "not a safetensors file"), (b"\x10\x00\x00\x00\x00\x00\x00\x00{bad", "not a safetensors file")])
def test_unreadable_checkpoints_are_named(tmp_path, content, fragment):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=fragment):
        CheckpointWeights(path)


def test_truncated_data_is_named_when_the_file_is_opened(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w.weight": torch.randn(64, 64), "v.weight": torch.randn(8, 8)}, str(path))
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UsageError, match=f"truncated: {size - 100} bytes, but its header places tensor w.weight up to byte {size}"):
        CheckpointWeights(path)


def test_data_truncated_after_opening_is_named(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w.weight": torch.randn(64, 64)}, str(path))
    weights = CheckpointWeights(path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UsageError, match="truncated: tensor w.weight"):
        weights.get("w.weight")


def test_only_safetensors_files(tmp_path):
    with pytest.raises(UsageError, match="safetensors"):
        CheckpointWeights(tmp_path / "model.pt")


def test_reads_ahead_back_and_forth_over_the_given_order_and_still_answers_any_other_request(tmp_path):
    """Passes over the announced order, each the reverse of the one before, then requests out of it:
    every tensor read back exactly, each valid until the next request (the read ahead fills the
    other buffer, never this one), and within the passes every read ahead is the next request."""
    path = tmp_path / "model.safetensors"
    tensors = {f"l{i}.weight": torch.randn(64 + i, 48) for i in range(5)}
    save_file(tensors, str(path))
    weights = CheckpointWeights(path)
    order = ["l3.weight", "l0.weight", "l4.weight", "l1.weight"]
    weights.read_ahead(order)
    passes = order + order[::-1] + order
    requests = passes + ["l2.weight", "l4.weight", "l4.weight", "l0.weight", "l3.weight"]
    for index, name in enumerate(requests):
        read = weights.get(name)
        assert torch.equal(read, tensors[name]), name
        following = weights._pending[0] if weights._pending else None
        if index + 1 < len(passes):
            assert following == passes[index + 1], (index, name)
        assert (following is None) == (name not in order)
        if weights._pending:
            weights._pending[1].result()  # the read ahead done: it went to the other buffer
        assert torch.equal(read, tensors[name]), f"{name} changed while {following} was read ahead"
