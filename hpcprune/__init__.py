"""hpcprune: prune PyTorch models at cluster scale.

`hpcprune prune --config configs/quickstart.yaml` runs the whole pipeline. The package is built in
floors, each importing only the floors below it (the import-linter contracts in pyproject.toml):

    cli                 the command line
    read | deploy       inspect, diff, plots, report | export, compact, sparse, int8
    run                 the pipelines: prune, fan-out, submit
    train               fine-tuning, distillation, rewinding, epoch checkpoints
    prune               plan, calibration, criteria, selection, masks, channels, schedules
    models              model registry, Hugging Face folders, weights, data
    dist                World, launchers, DDP, preemption signals
    archive             HDF5 archive, mask codec and wire format, atomic writes
    config              the validated config tree
    registry, progress  names the config accepts; progress bars
    errors              UsageError

Read `hpcprune.run.pipeline` top down and open the floors below only to go deeper.
"""

__version__ = "0.1.0"
