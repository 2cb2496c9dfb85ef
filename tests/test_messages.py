"""Byte messages between real ranks: cut into pieces no count overflows, a gather unpadded."""

from __future__ import annotations

import json

import pytest

from hpcprune.dist.pieces import MAX_MESSAGE_VARIABLE, max_piece_bytes, pieces
from tests.drivers import MESSAGE_SIZES, digest, message_bytes
from tests.helpers import driver, launch, torchrun


@pytest.mark.parametrize("nbytes, limit, expected", [
    (0, 7, []),
    (6, 7, [(0, 6)]),
    (7, 7, [(0, 7)]),
    (15, 7, [(0, 7), (7, 14), (14, 15)]),
])
def test_pieces_cover_the_message_each_within_the_limit(nbytes, limit, expected):
    assert [(piece.start, piece.stop) for piece in pieces(nbytes, limit)] == expected


def test_piece_limit_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(MAX_MESSAGE_VARIABLE, "5")
    assert max_piece_bytes() == 5 and len(list(pieces(11))) == 3
    monkeypatch.setenv(MAX_MESSAGE_VARIABLE, "0")
    with pytest.raises(ValueError, match=MAX_MESSAGE_VARIABLE):
        max_piece_bytes()
    monkeypatch.delenv(MAX_MESSAGE_VARIABLE)
    assert max_piece_bytes() == 1 << 30  # under MPI's 2**31 - 1 count


def expected_messages(ranks: int) -> dict:
    return {
        "sent": [[digest(message_bytes(rank, size)) for size in MESSAGE_SIZES] for rank in range(1, ranks)],
        "broadcast": [digest(message_bytes(root, 20 + root)) for root in range(ranks)],
        "gathered": [digest(message_bytes(rank, 3 * rank)) for rank in range(ranks)],
    }


@pytest.mark.parametrize("launcher", ["mpirun", "torchrun"])
def test_messages_longer_than_the_piece_limit_arrive_whole(request, tmp_path, launcher):
    """7-byte pieces: messages of 0 to 64 bytes sent, broadcast from every root and gathered."""
    out = tmp_path / "received.json"
    ranks = 3 if launcher == "mpirun" else 2
    if launcher == "mpirun":
        request.getfixturevalue("mpi4py")
        command = [request.getfixturevalue("mpirun"), "-n", str(ranks), *driver("messages", str(out))]
    else:
        command = torchrun(ranks, *driver("messages", str(out))[1:])
    finished = launch(command, timeout=180, env={MAX_MESSAGE_VARIABLE: "7"})
    assert finished.returncode == 0, finished.stderr
    assert json.loads(out.read_text()) == expected_messages(ranks)


@pytest.mark.parametrize("launcher", ["mpirun", "torchrun"])
def test_a_gather_costs_a_rank_only_its_own_message(request, tmp_path, launcher):
    """Rank 0 gathers 96 MiB of its own and nothing from rank 1: rank 1's memory must not grow by
    the longest message (a gather padded to the longest makes every rank hold it)."""
    nbytes = 96 << 20
    if launcher == "mpirun":
        request.getfixturevalue("mpi4py")
        command = [request.getfixturevalue("mpirun"), "-n", "2", *driver("gather_growth", str(tmp_path), str(nbytes))]
    else:
        command = torchrun(2, *driver("gather_growth", str(tmp_path), str(nbytes))[1:])
    finished = launch(command, timeout=180)
    assert finished.returncode == 0, finished.stderr
    grown_kib = json.loads((tmp_path / "rank1.json").read_text())["grown_kib"]
    assert grown_kib * 1024 < nbytes / 4, f"rank 1 grew by {grown_kib} KiB while gathering nothing of its own"
