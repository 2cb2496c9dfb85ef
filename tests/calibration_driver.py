"""Run under mpirun by tests/test_calibrate.py: calibrate LeNet-5 on synthetic data, save what this rank holds.

    mpirun -n 2 python -m tests.calibration_driver OUT_DIR BATCHES
"""

from __future__ import annotations

import sys

import torch

from hpcprune.config import load_config
from hpcprune.dist.detect import detect_world
from hpcprune.models.builders import build_model, save_checkpoint
from hpcprune.models.data import load_data
from hpcprune.prune.calibrate import CalibrationBatches, calibrate
from hpcprune.prune.plan import make_plan
from tests.helpers import CONFIGS


def main(out_dir: str, batches: str) -> None:
    world = detect_world()
    config = load_config(CONFIGS / "oneshot_global.yaml", ["calibration.batch_size=48", f"calibration.batches={batches}"])
    splits = load_data(config.data, config.seed)
    torch.manual_seed(config.seed)
    model = build_model(config.model)
    plan = make_plan(model, config.prune, world.size)
    batches = CalibrationBatches.of_dataset(splits.train, config.calibration)
    saved = {}
    for criterion, kind in (("wanda", "input_norms"), ("taylor", "gradients")):
        statistics = calibrate(model, plan, batches, world, criterion, torch.device("cpu"))
        saved.update({f"{kind}/{name}": tensor for name, tensor in getattr(statistics, kind).items()})
        saved[f"samples/{criterion}"] = torch.tensor([statistics.samples])
        if kind == "gradients":  # SNIP's normaliser, float64
            saved["sensitivity"] = torch.tensor([statistics.sensitivity_total], dtype=torch.float64)
    save_checkpoint(saved, f"{out_dir}/rank{world.rank}.safetensors")
    world.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
