"""Freed heap memory handed back to the system (hpcprune.dist.heap), as the block loop relies on."""

from __future__ import annotations

import numpy as np
import psutil

from hpcprune.dist.heap import return_free_heap

MIB = 2 ** 20


def test_freed_heap_pages_go_back_to_the_system():
    process = psutil.Process()
    chunks = [np.ones(8192) for _ in range(4096)]  # 64 KiB each, from the heap; written, so resident
    pin = np.ones(8192)  # above them: the heap's top cannot shrink past it when they are freed
    chunks.clear()
    held = process.memory_info().rss
    assert return_free_heap()  # glibc (Linux): something was released
    released = held - process.memory_info().rss
    assert released > 128 * MIB, f"only {released / MIB:.0f} MiB of the 256 MiB freed came back"
    assert pin.sum() == 8192
