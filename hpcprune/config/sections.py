"""The config's sections: one pydantic model per top-level key of the YAML file.

    hpcprune prune --config configs/quickstart.yaml --set prune.sparsity=0.8

Each section forbids unknown keys and is frozen. Names that live in code further up (criteria,
rules, schedules, fan-out backends) are checked against `hpcprune.registry`, never by importing
the code itself. Checks that span sections live on `RunConfig` (hpcprune.config.schema).
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from hpcprune import registry


class Section(BaseModel):
    """Base of every config section: no unknown keys, immutable."""

    # Lax typing on purpose: YAML reads 1e-3 as a string, and users mean a number. No setting means
    # anything as NaN or infinity (`.nan` would pass every range check and compare false later).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelConfig(Section):
    name: str = "lenet300"
    """Registry name (`lenet300`, `lenet5`, `resnet8`), `hf:<folder>` (Hugging Face style, config.json +
    model.safetensors), `package.module:callable`, or `checkpoint`:
    no module, score and mask the tensors of model.checkpoint (safetensors) without training."""
    checkpoint: str | None = None
    """State dict to start from (`.safetensors`, or a `torch.save` file read with weights_only=True).
    Without one, the model is trained dense first (see `pretrain`)."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the model builder."""
    blocks: str | None = None
    """schedule.kind sequential: dotted path of the model's repeated blocks (an nn.ModuleList, e.g.
    `model.layers`), when finding them alone is ambiguous."""


class DataConfig(Section):
    dataset: Literal["fashion-mnist", "synthetic"] = "fashion-mnist"
    path: str | None = None
    """Folder with the IDX(.gz) files; else $HPCPRUNE_DATA; else /usr/share/datasets/fashion-mnist."""
    validation_size: int = Field(5000, ge=0)
    """Fashion-MNIST: images held out of the training set for validation (the test set stays untouched);
    it must leave training images. Synthetic data draws its own validation set of synthetic_size / 8."""
    train_limit: int | None = Field(None, gt=0)
    """Use only the first N training images (quick experiments)."""
    synthetic_size: int = Field(2048, gt=0)
    """Number of training images of the synthetic dataset (test set is a quarter of it)."""
    batch_size: int = Field(128, gt=0)
    eval_batch_size: int = Field(1000, gt=0)


class OptimizerConfig(Section):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)


class LRScheduleConfig(Section):
    name: Literal["constant", "cosine", "step"] = "cosine"
    step_size: int = Field(1, gt=0)
    """Epochs between decays (`step` only)."""
    gamma: float = Field(0.1, gt=0, le=1)
    """Decay factor (`step` only)."""


class TrainConfig(Section):
    epochs: int = Field(1, ge=0)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    lr_schedule: LRScheduleConfig = Field(default_factory=LRScheduleConfig)
    step_batches: int | None = Field(None, gt=0)
    """Batches of data.batch_size per optimizer step over all ranks, their gradients summed exactly
    (hpcprune.train.exact_steps): the same training, bit for bit, at any world size, one thread per
    rank. None: each rank
    takes one batch per step and DDP averages the gradients (faster; the weights then depend on the
    world size in their last bits, and so may masks chosen after training)."""


class PruneConfig(Section):
    granularity: Literal["weight", "channel"] = "weight"
    """weight: single weights; channel: whole output channels/neurons with everything coupled to them
    (hpcprune.prune.channels): criteria l1, l2, and sparsity counts channels."""
    criterion: str = Field("magnitude", validate_default=True)  # checked against the granularity's criteria
    """How weights are scored: magnitude, relative, random (see hpcprune.prune.scoring.CRITERIA); for
    granularity channel, l1 or l2 (hpcprune.prune.channels.CHANNEL_CRITERIA)."""
    rule: Literal[registry.WEIGHT_RULES] = "global"
    """global: exact sparsity over all prunable tensors; layer: the same sparsity in every tensor;
    threshold: prune every weight whose score is <= `threshold`; row: the same sparsity in every output
    row (the default of criteria wanda and sparsegpt); nm: keep `n` of every `m` consecutive input weights."""
    sparsity: float = Field(0.9, ge=0, lt=1)
    """Final fraction of prunable weights set to zero (rules global and layer)."""
    threshold: float | None = None
    """Absolute score threshold (rule threshold)."""
    exclude: list[str] = Field(default_factory=list)
    """Glob patterns of parameter names kept dense, e.g. ["fc1.weight", "*.fc_out.*"]."""
    batchnorm_scale: bool = False
    """Granularity channel: multiply a producer's channel norm by |gamma| of the BatchNorm after it."""
    n: int = Field(2, gt=0)
    """Weights kept in each group of `m` (rule nm): 2:4 and 4:8 are the patterns sparse tensor cores run."""
    m: int = Field(4, gt=1)
    min_density: float = Field(0.0, ge=0, le=1)
    """Fraction of every tensor the global rule keeps at least (layer protection: no layer collapses)."""

    @model_validator(mode="before")
    @classmethod
    def _rule_follows_criterion(cls, data: Any) -> Any:
        """Wanda and SparseGPT compare within output rows unless a rule is given; nm fixes the sparsity at 1 - n/m."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "rule" not in data and data.get("criterion") in registry.BLOCK_ROW_DEFAULT:
            data["rule"] = "row"
        return data

    @model_validator(mode="after")
    def _nm_pattern(self) -> PruneConfig:
        if self.rule == "nm":
            if self.n >= self.m:
                raise ValueError(f"rule 'nm' needs prune.n < prune.m (got {self.n}:{self.m})")
            if "sparsity" in self.model_fields_set and not math.isclose(self.sparsity, 1 - self.n / self.m):
                raise ValueError(f"rule 'nm' {self.n}:{self.m} prunes {1 - self.n / self.m:g}: leave prune.sparsity out")
            object.__setattr__(self, "sparsity", 1 - self.n / self.m)
        return self

    @model_validator(mode="after")
    def _threshold_needs_value(self) -> PruneConfig:
        if self.rule == "threshold" and self.threshold is None:
            raise ValueError("rule 'threshold' needs prune.threshold")
        return self

    @field_validator("criterion")
    @classmethod
    def _known_criterion(cls, name: str, info: ValidationInfo) -> str:
        granularity = info.data.get("granularity", "weight")
        known = set(registry.CRITERIA[granularity]) | (set(registry.BLOCK_CRITERIA) if granularity == "weight" else set())
        if name not in known:
            raise ValueError(f"unknown {granularity} criterion {name!r}; known: {', '.join(sorted(known))}")
        return name


class ScheduleConfig(Section):
    kind: Literal[registry.SCHEDULES] = "oneshot"
    rounds: int = Field(1, ge=1)
    """Number of prune → fine-tune rounds (iterative); density shrinks geometrically per round."""
    initial_sparsity: float = Field(0.0, ge=0, lt=1)
    """gradual: s_i, the sparsity when fine-tuning starts (Zhu & Gupta 2017)."""
    start_step: int = Field(0, ge=0)
    """gradual: t0, the fine-tuning step of the first mask update's origin. A step is one batch of
    data.batch_size samples over all ranks: on n ranks an optimizer step is n steps."""
    interval: int = Field(50, gt=0)
    """gradual: Δt, steps between mask updates."""
    updates: int = Field(10, gt=0)
    """gradual: n, the number of mask updates; the last, at step t0 + nΔt, reaches prune.sparsity."""
    rewind_epoch: int | None = Field(None, ge=0)
    """Lottery-ticket rewinding: after each round's pruning, reset the surviving weights to their values
    after this many epochs of dense training (0: at initialisation), then fine-tune. None: no rewinding."""

    @model_validator(mode="after")
    def _oneshot_is_one_round(self) -> ScheduleConfig:
        if self.kind in ("oneshot", "gradual") and self.rounds != 1:
            raise ValueError(f"a {self.kind} schedule has exactly 1 round; use kind: iterative")
        return self


class CalibrationConfig(Section):
    """Data for the criteria that need statistics of the model (taylor, snip, wanda)."""

    batches: int = Field(8, gt=0)
    """Calibration batches; batch b goes to rank b mod world size."""
    batch_size: int = Field(128, gt=0)
    split: Literal["train", "validation"] = "train"
    """Split the batches are cut from, in its stored order: batch b is samples [b*batch_size, (b+1)*batch_size)."""
    text: str | None = None
    """Plain UTF-8 text file (Hugging Face models), tokenized with the model folder's own tokenizer
    (hpcprune.models.text_windows): causal LMs draw `samples` windows from the whole text, encoders
    take one line per window."""
    sequence_length: int = Field(32, gt=1)
    """Tokens per calibration window (text)."""
    samples: int = Field(128, gt=0)
    """Calibration windows drawn from `text` (block-sequential pipeline; 128 as in Wanda and SparseGPT)."""
    seed: int = Field(0, ge=0)
    """Seed of the windows' start offsets (encoders: of the lines chosen); the same windows on every rank."""


class EvalConfig(Section):
    """Held-out text the model is evaluated on, dense and pruned (Hugging Face models)."""

    text: str | None = None
    """Plain UTF-8 text file: perplexity over its consecutive windows (causal LMs); None: no evaluation."""
    sequence_length: int | None = Field(None, gt=1)
    """Tokens per evaluation window; None: calibration.sequence_length."""


class DistillConfig(Section):
    """Knowledge distillation from the dense model while fine-tuning (Hinton et al. 2015)."""

    weight: float = Field(0.0, ge=0, le=1)
    """Share of the distillation term in the loss; 0: plain cross-entropy, no teacher."""
    temperature: float = Field(4.0, gt=0)


class OutputConfig(Section):
    path: str = "runs/hpcprune.h5"
    """Archive to write; model states go to `<path>.states/` beside it (run.h5 -> run.h5.states/)."""

    @field_validator("path")
    @classmethod
    def _names_a_file(cls, path: str) -> str:
        if not path.strip() or path.endswith(("/", "\\")):
            raise ValueError("must name the archive file to write")
        return path


class FanoutSlurmConfig(Section):
    partition: str | None = None
    """Partition of the scoring array jobs (None: the cluster's default)."""
    time_min: int = Field(10, gt=0)
    """Time limit of each array task, in minutes."""
    cpus_per_task: int = Field(1, gt=0)
    mem_gb: float | None = Field(None, gt=0)
    """Memory per task (None: the partition's default)."""
    array_parallelism: int | None = Field(None, gt=0)
    """Most array tasks running at once (None: all of them)."""


class FanoutDaskConfig(Section):
    address: str | None = None
    """Scheduler of a running dask cluster (tcp://host:8786); None: start `cluster` for the run."""
    cluster: Literal["local", "slurm"] = "local"
    """local: a LocalCluster of worker processes; slurm: dask-jobqueue's SLURMCluster, one job per
    worker, with the `fanout.slurm` partition, time, CPUs and memory."""
    workers: int = Field(2, gt=0)


class FanoutConfig(Section):
    backend: str = "world"
    """world: score in this process's ranks (one process, mpirun, srun, torchrun); slurm-array: each
    stage of selection as a submitit job array of `shards` tasks; dask: as `shards` tasks on dask
    workers; inline: the staged tasks one after another in this process (debugging)."""
    shards: int = Field(2, gt=0)
    """Tasks the tensors are split into (balanced by element count, like ranks)."""
    retries: int = Field(2, ge=0)
    """Times a task that failed (killed, node lost) is started again, alone."""
    linger_s: float = Field(30.0, ge=0)
    """How long a task waits for the other tasks' sums before it stops, to be started again for the
    next stage (it waits without using a CPU, but holds its slot)."""

    slurm: FanoutSlurmConfig = Field(default_factory=FanoutSlurmConfig)
    dask: FanoutDaskConfig = Field(default_factory=FanoutDaskConfig)

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, name: str) -> str:
        if name == registry.IN_WORLD:
            return name
        if name not in registry.FANOUT_BACKENDS:
            raise ValueError(f"unknown backend {name!r}; known: {', '.join([registry.IN_WORLD, *sorted(registry.FANOUT_BACKENDS)])}")
        package = registry.FANOUT_BACKENDS[name][1]
        if package is not None and importlib.util.find_spec(package) is None:
            raise ValueError(f"backend {name!r} needs {package}: pip install 'hpcprune[{registry.EXTRAS[package]}]'")
        return name

    @model_validator(mode="after")
    def _slurm_workers_need_memory(self) -> FanoutConfig:
        if self.backend == "dask" and self.dask.cluster == "slurm" and self.slurm.mem_gb is None:
            raise ValueError("fanout.dask.cluster 'slurm' needs fanout.slurm.mem_gb (dask-jobqueue asks for it)")
        return self
