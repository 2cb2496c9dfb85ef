"""Messages cut into pieces no collective call can overflow.

    HPCPRUNE_MAX_MESSAGE_BYTES=1048576 mpirun -n 2 hpcprune prune ...   # 1 MiB pieces (tests use a few bytes)

MPI counts are C ints: one call moves at most 2**31 - 1 elements, so the packed masks of about
1.7e10 weights, or any byte string over 2 GiB, cannot travel in one call. Every byte message of a
World (`send_bytes`, `broadcast_bytes`, `gather_bytes`) therefore sends its length first, then its
bytes in pieces of at most `max_piece_bytes()`; the receiver allocates the whole buffer once and
receives each piece into its slice. Memory is the message itself, never a second copy of it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

MAX_MESSAGE_VARIABLE = "HPCPRUNE_MAX_MESSAGE_BYTES"
DEFAULT_MAX_PIECE_BYTES = 1 << 30  # half of MPI's int limit: far from it, and few calls for any message


def max_piece_bytes() -> int:
    """The largest piece one call moves: $HPCPRUNE_MAX_MESSAGE_BYTES, else 1 GiB."""
    value = os.environ.get(MAX_MESSAGE_VARIABLE)
    if value is None:
        return DEFAULT_MAX_PIECE_BYTES
    limit = int(value)
    if limit < 1:
        raise ValueError(f"{MAX_MESSAGE_VARIABLE}={value}: must be a positive number of bytes")
    return limit


def pieces(nbytes: int, limit: int | None = None) -> Iterator[slice]:
    """Consecutive slices covering [0, nbytes), each at most `limit` long (none for an empty message)."""
    limit = max_piece_bytes() if limit is None else limit
    for start in range(0, nbytes, limit):
        yield slice(start, min(start + limit, nbytes))
