"""Freed memory handed back to the operating system between the phases of long work.

    return_free_heap()     # after each block of a block-sequential run

glibc's malloc keeps what torch's CPU tensors free in its heap, and after a large block is freed it
raises its mmap threshold, so later tensors of that size come from the heap too. A run that frees
and allocates tensors of a few sizes block after block then holds the freed pages as well: its peak
resident memory grows with the blocks done, and more on a rank whose turn of work comes between
others' (2-rank SparseGPT on SmolLM2-135M: 0.87 and 1.07 GiB). `malloc_trim(0)` gives back every free
page, inside the heap too, in about 10 ms; once a block, the peak becomes about what one block
needs (0.80 and 0.81 GiB there; after each pass of a block as well, 0.73 and 0.71 GiB for three
times the calls). No maintained package wraps it: ctypes calls libc itself. Elsewhere than glibc
(musl, macOS) nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _glibc_trim():
    """glibc's malloc_trim, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    try:
        library = ctypes.CDLL(name)
        trim = library.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def return_free_heap() -> bool:
    """Give the heap's free pages back to the system; True when glibc released any."""
    trim = _glibc_trim()
    return bool(trim(0)) if trim is not None else False
