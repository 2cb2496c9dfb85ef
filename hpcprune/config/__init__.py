"""Floor 1, config: the run's settings, read from YAML and `--set` overrides, validated and frozen.

What lives here: the sections (`sections`), the cross-section checks of `RunConfig` (`schema`), the
block-sequential pipeline's sections and limits (`sequential`), and reading files and overrides
(`loading`). It may import only `hpcprune.errors` and
`hpcprune.registry`: names that code further up implements are validated against the registry,
so nothing here imports torch. Everything above reads its settings from these classes.
"""

from hpcprune.config.loading import load_config, load_config_text, validate_tree
from hpcprune.config.schema import CHECKPOINT_MODEL, RunConfig
from hpcprune.config.sections import (
                                      CalibrationConfig,
                                      DataConfig,
                                      DistillConfig,
                                      EvalConfig,
                                      FanoutConfig,
                                      FanoutDaskConfig,
                                      FanoutSlurmConfig,
                                      LRScheduleConfig,
                                      ModelConfig,
                                      OptimizerConfig,
                                      OutputConfig,
                                      PruneConfig,
                                      ScheduleConfig,
                                      Section,
                                      TrainConfig,
)
from hpcprune.config.sequential import SequentialConfig, SparseGPTConfig

__all__ = [
    "CHECKPOINT_MODEL", "CalibrationConfig", "DataConfig", "DistillConfig", "EvalConfig", "FanoutConfig", "FanoutDaskConfig",
    "FanoutSlurmConfig", "LRScheduleConfig", "ModelConfig", "OptimizerConfig", "OutputConfig", "PruneConfig",
    "RunConfig", "ScheduleConfig", "Section", "SequentialConfig", "SparseGPTConfig", "TrainConfig", "load_config", "load_config_text", "validate_tree",
]
