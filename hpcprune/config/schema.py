"""Step 1 — config: the whole run's settings as one validated, frozen tree.

    hpcprune prune --config configs/quickstart.yaml --set prune.sparsity=0.8

`RunConfig` gathers the sections (hpcprune.config.sections) and checks what spans them: a model
that cannot train, a schedule a granularity cannot follow, a fan-out that has no calibration data.
Reading YAML and applying overrides is hpcprune.config.loading.
"""

from __future__ import annotations

from typing import Literal

import yaml
from pydantic import Field, model_validator

from hpcprune import registry
from hpcprune.config.sections import (
    CalibrationConfig,
    DataConfig,
    DistillConfig,
    EvalConfig,
    FanoutConfig,
    ModelConfig,
    OptimizerConfig,
    OutputConfig,
    PruneConfig,
    ScheduleConfig,
    Section,
    TrainConfig,
)
from hpcprune.config.sequential import (
    SequentialConfig,
    SparseGPTConfig,
    check_sequential,
)

CHECKPOINT_MODEL = registry.CHECKPOINT_MODEL


SEED_LIMIT = 2**63
"""Seeds are below 2**63: torch takes 64-bit seeds, and runs add round and epoch numbers to them."""


class RunConfig(Section):
    seed: int = Field(0, ge=0, lt=SEED_LIMIT)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    progress: bool = True
    """Progress bars on rank 0 (only when stderr is a terminal)."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    pretrain: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=3))
    """Dense training, used only when model.checkpoint is not given."""
    prune: PruneConfig = Field(default_factory=PruneConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    finetune: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=1, optimizer=OptimizerConfig(lr=0.01)))
    output: OutputConfig = Field(default_factory=OutputConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    """Held-out text for perplexity (causal LMs) or embedding fidelity (encoders), dense and pruned."""
    fanout: FanoutConfig = Field(default_factory=FanoutConfig)
    """How selection is spread: this process's ranks, or staged tasks on a SLURM job array or dask."""
    sequential: SequentialConfig = Field(default_factory=SequentialConfig)
    """schedule.kind sequential: how the blocks of a large transformer are run one at a time."""
    sparsegpt: SparseGPTConfig = Field(default_factory=SparseGPTConfig)
    """prune.criterion sparsegpt: damping and block size of the solve."""

    @model_validator(mode="after")
    def _sequential_fits(self) -> RunConfig:
        check_sequential(self)
        return self

    @model_validator(mode="after")
    def _hf_models_are_pruned_not_trained(self) -> RunConfig:
        if self.model.name.startswith(registry.HF_PREFIX) and (self.pretrain.epochs or self.finetune.epochs):
            raise ValueError("a Hugging Face model (model.name hf:...) is pruned without training here: "
                             "set pretrain.epochs: 0 and finetune.epochs: 0")
        return self

    @model_validator(mode="after")
    def _rewind_needs_dense_training(self) -> RunConfig:
        epoch = self.schedule.rewind_epoch
        if epoch is not None and (self.model.checkpoint or epoch > self.pretrain.epochs):
            raise ValueError(f"schedule.rewind_epoch {epoch} needs that many epochs of dense training in this run "
                             f"(pretrain.epochs >= {epoch} and no model.checkpoint)")
        return self

    @model_validator(mode="after")
    def _checkpoint_model_is_masks_only(self) -> RunConfig:
        if self.model.name == CHECKPOINT_MODEL:
            if not self.model.checkpoint:
                raise ValueError(f"model.name '{CHECKPOINT_MODEL}' needs model.checkpoint (a .safetensors file)")
            if self.finetune.epochs:
                raise ValueError(f"model.name '{CHECKPOINT_MODEL}' has no module to train: set finetune.epochs: 0")
        return self

    @model_validator(mode="after")
    def _channels_fit(self) -> RunConfig:
        """Channels need a module to trace, a rule of hpcprune.prune.channels, and selection between rounds."""
        if self.prune.granularity != "channel":
            return self
        if self.model.name == CHECKPOINT_MODEL:
            raise ValueError(f"prune.granularity channel needs a module: model.name '{CHECKPOINT_MODEL}' has none")
        if self.prune.rule not in registry.CHANNEL_RULES:
            raise ValueError(f"prune.rule {self.prune.rule!r} does not apply to channels; use {', '.join(registry.CHANNEL_RULES)}")
        if self.schedule.kind not in registry.CHANNEL_SCHEDULES:
            raise ValueError(f"schedule.kind {self.schedule.kind!r} does not apply to channels; "
                             f"use {', '.join(registry.CHANNEL_SCHEDULES)}")
        return self

    @model_validator(mode="after")
    def _fanout_scores_weights_alone(self) -> RunConfig:
        """Fanned-out tasks score single weights from the weights alone: no channels, no calibration data."""
        if self.fanout.backend == registry.IN_WORLD:
            return self
        if self.prune.granularity != "weight":
            raise ValueError(f"fanout.backend {self.fanout.backend!r} selects single weights: "
                             f"prune.granularity {self.prune.granularity!r} needs fanout.backend {registry.IN_WORLD!r}")
        if registry.needs_calibration(self.prune.criterion):
            raise ValueError(f"fanout.backend {self.fanout.backend!r}: criterion {self.prune.criterion!r} needs "
                             f"calibration data, which the tasks do not have; use fanout.backend {registry.IN_WORLD!r}")
        if self.schedule.kind == "gradual":
            raise ValueError(f"fanout.backend {self.fanout.backend!r}: schedule.kind gradual selects again and again "
                             f"within the training ranks; use fanout.backend {registry.IN_WORLD!r}")
        return self

    def to_yaml(self) -> str:
        """The resolved config, as stored in the archive and accepted back by `load_config`."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
