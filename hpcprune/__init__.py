"""hpcprune: prune PyTorch models at cluster scale.

`hpcprune prune --config configs/quickstart.yaml` runs the whole pipeline; read the modules in
pipeline order: config, world, models, data, plan, scoring, select, masks, finetune, schedule,
archive, pipeline.
"""

__version__ = "0.1.0"
