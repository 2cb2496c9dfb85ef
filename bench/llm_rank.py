"""One process of hpcprune's side of bench/llm.py: `hpcprune prune ARGS`, then its own peak RSS and CPU seconds.

    mpirun -n 2 python bench/llm_rank.py REPORT_STEM prune --config run.yaml -q    # writes REPORT_STEM.<rank>.json

The rank's report is written at exit (also when the CLI exits through SystemExit), so bench/llm.py
sees every rank's peak resident memory, not only the launcher's.
"""

from __future__ import annotations

import atexit
import json
import sys
import time


def main() -> None:
    stem, arguments = sys.argv[1], sys.argv[2:]
    started = time.perf_counter()

    def report() -> None:
        with open(f"{stem}.{launcher_rank()}.json", "w") as file:
            json.dump({"wall_seconds": time.perf_counter() - started, "cpu_seconds": cpu_seconds(),
                       "peak_rss_bytes": peak_rss_bytes()}, file)

    from llm_side import cpu_seconds, peak_rss_bytes  # bench/ is this script's folder

    from hpcprune.cli import main as cli_main
    from hpcprune.dist.detect import launcher_rank

    atexit.register(report)
    sys.argv = ["hpcprune", *arguments]
    cli_main()


if __name__ == "__main__":
    main()
