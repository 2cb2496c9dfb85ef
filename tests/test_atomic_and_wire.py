"""The one atomic-write helper and the one mask wire format (hpcprune.archive.atomic, .wire).

    python -m pytest tests/test_atomic_and_wire.py
"""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from hpcprune.archive.atomic import replace_atomically, write_atomically
from hpcprune.archive.codec import MASK_CHUNK_BYTES, packed_kept
from hpcprune.archive.wire import MaskMessage
from hpcprune.errors import UsageError


def temporaries(folder):
    return [path for path in folder.iterdir() if path.name.endswith(".tmp")]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_a_written_file_gets_the_mode_the_umask_gives(tmp_path, umask):
    previous = os.umask(umask)
    try:
        write_atomically(tmp_path / "out.bin", lambda file: file.write(b"data"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out.bin").stat().st_mode) == 0o666 & ~umask
    assert (tmp_path / "out.bin").read_bytes() == b"data" and not temporaries(tmp_path)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def half_then_fail(file):
        file.write(b"half")
        raise RuntimeError("the writer broke")

    with pytest.raises(RuntimeError):
        write_atomically(target, half_then_fail)
    assert target.read_bytes() == b"old" and not temporaries(tmp_path)


def test_a_library_writing_by_path_replaces_the_target_whole(tmp_path):
    target = tmp_path / "deep" / "folder" / "out.npy"
    with replace_atomically(target) as temporary:
        assert temporary.parent == target.parent and not target.exists()
        np.save(open(temporary, "wb"), np.arange(5))
    assert np.array_equal(np.load(target), np.arange(5)) and not temporaries(target.parent)


def test_an_unwritable_target_is_one_usage_error_naming_it(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    with pytest.raises(UsageError, match="cannot write .*a-file/out.bin"):
        write_atomically(blocker / "out.bin", lambda file: file.write(b"x"))


def random_packed(count: int, seed: int) -> np.ndarray:
    return np.packbits(np.random.default_rng(seed).random(count) < 0.3, bitorder="big")


@pytest.mark.parametrize("sizes", [[0], [1, 9, 8], [3 * 8 * MASK_CHUNK_BYTES + 13, 100]])
def test_a_message_carries_masks_kept_counts_and_facts_bit_for_bit(sizes):
    packed = {f"layer{index}.weight": random_packed(size, index) for index, size in enumerate(sizes)}
    message = MaskMessage.from_bytes(MaskMessage.of_packed(packed, kept=17, threshold=0.1 + 0.2).to_bytes())
    assert list(message.masks) == list(packed)
    assert {name: kept for name, (_, kept) in message.masks.items()} == {n: packed_kept(p) for n, p in packed.items()}
    assert message.facts == {"kept": 17, "threshold": 0.1 + 0.2}
    unpacked = message.packed()
    assert all(np.array_equal(unpacked[name], bits) for name, bits in packed.items())


def test_merged_messages_keep_rank_order_and_a_chosen_subset_unpacks_alone():
    first = MaskMessage.of_packed({"a": random_packed(40, 1)}, kept=1)
    second = MaskMessage.of_packed({"b": random_packed(30, 2), "c": random_packed(20, 3)}, kept=2)
    merged = MaskMessage.merged([first, second])
    assert list(merged.masks) == ["a", "b", "c"] and merged.facts == {"kept": 1}
    assert list(merged.packed(["c", "a"])) == ["c", "a"]


def test_a_damaged_message_is_refused():
    data = bytearray(MaskMessage.of_packed({"a": random_packed(5000, 4)}).to_bytes())
    with pytest.raises(ValueError, match="beyond the masks"):
        MaskMessage.from_bytes(bytes(data) + b"extra")
    data[-3] ^= 0xFF  # a flipped bit in the chunk's checksum or stream
    with pytest.raises(ValueError, match="checksum"):
        MaskMessage.from_bytes(bytes(data)).packed()


def test_a_file_of_messages_reads_back_one_message_at_a_time(tmp_path):
    from hpcprune.archive.wire import read_messages

    messages = [MaskMessage({}, {"kept": 3}), MaskMessage.of_packed({"a": random_packed(3000, 5)}),
                MaskMessage.of_packed({"b": random_packed(70, 6), "c": random_packed(0, 7)})]
    path = tmp_path / "masks"
    with open(path, "wb") as file:
        for message in messages:
            message.write_to(file)
    assert path.read_bytes() == b"".join(message.to_bytes() for message in messages)
    with open(path, "rb") as file:
        read = list(read_messages(file))
    assert [message.facts for message in read] == [{"kept": 3}, {}, {}]
    for ours, theirs in zip(read, messages):
        assert ours.packed().keys() == theirs.packed().keys()
        assert all(np.array_equal(ours.packed()[name], theirs.packed()[name]) for name in theirs.packed())
    path.write_bytes(path.read_bytes()[:-10])
    with open(path, "rb") as file, pytest.raises(ValueError, match="10 bytes missing"):
        list(read_messages(file))
