"""Log lines that say which rank speaks: rank 0 talks, the others only when something goes wrong.

    mpirun -n 2 hpcprune prune ...    # "[rank 0] 12:00:01 round 1/3: pruning to 53.58 %"
"""

from __future__ import annotations

import logging
import sys


def setup_logging(rank: int, quiet: bool) -> None:
    level = logging.WARNING if quiet or rank != 0 else logging.INFO
    logging.basicConfig(level=level, format=f"[rank {rank}] %(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
