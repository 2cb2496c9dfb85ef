"""Kill points for the crash tests: the real CLI, SIGKILLed at the N-th time a run reaches a step.

    HPCPRUNE_TEST_KILL=write_mask:3 HPCPRUNE_TEST_KILL_RANK=1 mpirun -n 2 python -m tests.crash_points prune --config ...
    HPCPRUNE_TEST_COUNT=counts.json python -m tests.crash_points prune --config ...   # how often each point is reached

With HPCPRUNE_TEST_KILLED=FILE the killed rank first writes the point it died at into FILE.

    HPCPRUNE_TEST_RAISE=select:2:MemoryError HPCPRUNE_TEST_RAISE_RANK=1 mpirun -n 2 python -m tests.crash_points prune ...

raises that exception (a builtin's name) instead of killing: a failure inside the run, on one rank,
that the run's own error handling must carry to every rank. HPCPRUNE_TEST_HANG=allreduce:2:20 makes
the rank sleep 20 s there (a rank that hangs), HPCPRUNE_TEST_MISMATCH=broadcast:1 makes it run an
allreduce of its own first (ranks whose collectives differ).

    HPCPRUNE_TEST_HOLD=event:1 HPCPRUNE_TEST_HOLD_UNTIL=FILE python -m tests.crash_points prune ...

holds the run at that point (a run that is slow there) until FILE exists, and says that it is there by
writing FILE.held: what a second writer of the same archive meets while the first one is at work.

Nothing here is reachable from `hpcprune` itself: the points are installed by wrapping functions of
the real modules when this driver starts, and only when the environment asks for them. The kill is
a real SIGKILL of the process (no exception, no cleanup, no atexit), as an OOM killer or a
preempting scheduler would deliver it.
"""

from __future__ import annotations

import atexit
import builtins
import functools
import importlib
import json
import os
import signal
import sys
import time
from collections import Counter

import numpy as np

# name -> (module, attribute, when): the step is killed just "before" or just "after" the call.
POINTS = {
    "create": ("hpcprune.archive.layout", "write_header", "after"),  # new archive written, not yet renamed into place
    "event": ("hpcprune.archive.writer:Archive", "record_event", "before"),
    "save_state": ("hpcprune.models.builders", "save_file", "after"),  # state file written to its temporary name
    "score": ("hpcprune.prune.scoring", "score_tensor", "before"),
    "allreduce": ("world", "allreduce_sum", "before"),  # histograms of selection, metric sums
    "send": ("world", "send_bytes", "before"),  # one tensor's mask on its way to rank 0 or a peer
    "broadcast": ("world", "broadcast_bytes", "before"),
    "batch": ("hpcprune.train.finetune", "one_epoch", "batch"),  # one training batch (dense or fine-tuning)
    "write_mask": ("hpcprune.archive.mask_parts", "_write_mask", "after"),  # a round's part file half written
    "commit": ("hpcprune.archive.layout", "commit", "before"),  # data written, round not yet marked complete
    "mark_checkpoint": ("hpcprune.archive.writer:Archive", "mark_checkpoint", "before"),  # round complete, checkpoint not moved
    "block_forward": ("hpcprune.models.block_calls", "call_block", "before"),  # a window through a block (sequential)
    "record_block": ("hpcprune.archive.blocks:BlockRecords", "record_block", "after"),  # a block's masks just recorded
    "select": ("hpcprune.prune.streaming:Streamer", "run", "before"),  # a pass of selection over this rank's scores
    "solve": ("hpcprune.prune.sequential.methods:SparseGPT", "decide", "before"),  # one layer's OBS solve (sequential)
    # One rank's decisions (masks and updated weights) received, the next rank's not yet: mid-broadcast.
    "decisions": ("hpcprune.prune.sequential.decisions:BlockDecisions", "from_bytes", "after"),
}

counts: Counter[str] = Counter()
HOLD_LIMIT_S = 300  # a held run goes on by itself after this long (a test that died must not leave it waiting)


def rank() -> int:
    from hpcprune.dist.detect import launcher_rank

    return launcher_rank()


def _target(variable: str) -> tuple[str, int, str] | None:
    """(point, nth, exception name) that $variable asks for on this rank ($variable_RANK, default 0)."""
    spec = os.environ.get(variable)
    if not spec or int(os.environ.get(f"{variable}_RANK", "0")) != rank():
        return None
    point, _, rest = spec.partition(":")
    nth, _, exception = rest.partition(":")
    return point, int(nth or 1), exception


def _hold(point: str) -> None:
    spec, until = os.environ.get("HPCPRUNE_TEST_HOLD"), os.environ.get("HPCPRUNE_TEST_HOLD_UNTIL")
    if spec and until and f"{point}:{counts[point]}" == spec:
        with open(f"{until}.held", "w") as held:
            held.write(f"{point} in pid {os.getpid()}")
        deadline = time.monotonic() + HOLD_LIMIT_S
        while not os.path.exists(until) and time.monotonic() < deadline:
            time.sleep(0.05)


def reached(point: str, world=None) -> None:
    counts[point] += 1
    _hold(point)
    hang = _target("HPCPRUNE_TEST_HANG")
    if hang is not None and hang[:2] == (point, counts[point]):
        time.sleep(float(hang[2] or 30))
    mismatch = _target("HPCPRUNE_TEST_MISMATCH")
    if world is not None and mismatch is not None and mismatch[:2] == (point, counts[point]):
        type(world).allreduce_sum(world, np.zeros(7, dtype=np.int64))  # the class's: not counted again
    failure = _target("HPCPRUNE_TEST_RAISE")
    if failure is not None and failure[:2] == (point, counts[point]):
        exception = getattr(builtins, failure[2] or "RuntimeError")
        raise exception(f"injected at {point}:{counts[point]} on rank {rank()}")
    kill = _target("HPCPRUNE_TEST_KILL")
    if kill is not None and kill[:2] == (point, counts[point]):
        if os.environ.get("HPCPRUNE_TEST_KILLED"):  # tells the test this kill happened (the others may fail first)
            with open(os.environ["HPCPRUNE_TEST_KILLED"], "w") as record:
                record.write(f"{point}:{counts[point]} on rank {rank()}")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _wrap(point: str, function, when: str, world=None):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        if when == "before":
            reached(point, world)
        result = function(*args, **kwargs)
        if when == "after":
            reached(point)
        return result

    return wrapper


def _counting_batches(batches):
    for batch in batches:
        reached("batch")
        yield batch


def _wrap_epoch(function):
    @functools.wraps(function)
    def wrapper(model, batches, *args, **kwargs):
        return function(model, _counting_batches(batches), *args, **kwargs)

    return wrapper


def _wrap_world(detect):
    """Collectives are methods of the World instance the run gets: wrap them on that instance."""

    @functools.wraps(detect)
    def wrapper():
        world = detect()
        for point, (module, attribute, when) in POINTS.items():
            if module == "world":
                setattr(world, attribute, _wrap(point, getattr(world, attribute), when, world))
        return world

    return wrapper


def install() -> None:
    for point, (module, attribute, when) in POINTS.items():
        if module == "world":
            continue
        module_name, _, class_name = module.partition(":")
        owner = importlib.import_module(module_name)
        owner = getattr(owner, class_name) if class_name else owner
        original = getattr(owner, attribute)
        setattr(owner, attribute, _wrap_epoch(original) if when == "batch" else _wrap(point, original, when))
    import hpcprune.dist.detect

    hpcprune.dist.detect.detect_world = _wrap_world(hpcprune.dist.detect.detect_world)


def _write_counts() -> None:
    with open(f"{os.environ['HPCPRUNE_TEST_COUNT']}.{rank()}", "w") as file:
        json.dump(dict(counts), file)


def main() -> None:
    install()
    if os.environ.get("HPCPRUNE_TEST_COUNT"):
        atexit.register(_write_counts)
    from hpcprune.cli import main as cli_main

    sys.argv = ["hpcprune", *sys.argv[1:]]
    cli_main()


if __name__ == "__main__":
    main()
