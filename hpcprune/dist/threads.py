"""torch's CPU kernels on one thread, for work whose bits must not depend on how it was split.

    with one_thread(): ...     # exact training steps; SparseGPT's column loop

torch splits a large kernel over its threads at points that depend on the tensor's size: a
reduction then adds its partial sums in another order, and an element-wise kernel runs the
elements either side of a cut on its scalar path, whose multiply-add may be fused where the vector
path's is not. Either way the last bits would depend on how much a rank holds. On one thread they
depend only on the data: the ranks are the parallelism there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    """torch's threads set to one within, and back to what they were after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
