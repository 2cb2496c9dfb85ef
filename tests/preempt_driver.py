"""Started under mpirun by tests/test_preempt.py: only rank 1 is signalled, yet every rank must stop.

    mpirun -n 2 python -m tests.preempt_driver OUT_DIR
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from hpcprune.dist import signals
from hpcprune.dist.detect import detect_world


def main(out_dir: str) -> None:
    world = detect_world()
    signals.listen()
    facts = {"before": signals.agreed_to_stop(world), "saved_on": []}
    if world.rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)  # the handler has run when os.kill returns
    facts["after"] = signals.agreed_to_stop(world)
    try:
        signals.stop_here(world, Path(out_dir) / "run.h5", "at the test's safe point",
                          save=lambda: facts["saved_on"].append(world.rank))
    except signals.Preempted as stop:
        facts["stopped"] = str(stop)
    Path(out_dir, f"rank{world.rank}.json").write_text(json.dumps(facts))
    world.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
