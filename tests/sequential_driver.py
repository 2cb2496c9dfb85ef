"""Started by the block-sequential tests under mpirun and torchrun: several cases in one launch.

    mpirun -n 3 python -m tests.sequential_driver FOLDERS_ROOT OUT_DIR NAME:MODEL:KEY=VALUE;KEY=VALUE ...

MODEL is a field of tests.tiny_llm.Folders (llama, opt, bert...); each case writes OUT_DIR/NAME.h5.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hpcprune.config import load_config
from hpcprune.dist.detect import detect_world
from hpcprune.run.pipeline import run
from tests.tiny_llm import Folders, sequential_overrides


def main(root: str, out_dir: str, *cases: str) -> None:
    world = detect_world()
    folders = Folders.at(Path(root))
    for case in cases:
        name, model, overrides = case.split(":", 2)
        out = Path(out_dir) / f"{name}.h5"
        config = load_config(None, sequential_overrides(getattr(folders, model), folders, out,
                                                        *[override for override in overrides.split(";") if override]))
        run(config, world, force=True)
    world.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
