"""Step 1 — config: a YAML file plus `--set a.b=c` overrides become one validated, frozen tree.

    hpcprune prune --config configs/quickstart.yaml --set prune.sparsity=0.8

Validation is pydantic's: unknown keys, wrong types and out-of-range values are refused with a
one-line `UsageError` that names the file and the dotted key.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from hpcprune.errors import UsageError


CHECKPOINT_MODEL = "checkpoint"
"""model.name for masks only: no module, the weights are read from model.checkpoint tensor by tensor."""


class Section(BaseModel):
    """Base of every config section: no unknown keys, immutable."""

    # Lax typing on purpose: YAML reads 1e-3 as a string, and users mean a number.
    model_config = ConfigDict(extra="forbid", frozen=True)


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


class DataConfig(Section):
    dataset: Literal["fashion-mnist", "synthetic"] = "fashion-mnist"
    path: str | None = None
    """Folder with the IDX(.gz) files; else $HPCPRUNE_DATA; else /usr/share/datasets/fashion-mnist."""
    validation_size: int = Field(5000, ge=0)
    """Images held out of the training set for validation (the test set stays untouched)."""
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


class PruneConfig(Section):
    granularity: Literal["weight", "channel"] = "weight"
    """weight: single weights; channel: whole output channels/neurons with everything coupled to them
    (hpcprune.structured): criteria l1, l2, and sparsity counts channels."""
    criterion: str = Field("magnitude", validate_default=True)  # checked against the granularity's criteria
    """How weights are scored: magnitude, relative, random (see hpcprune.scoring.CRITERIA); for
    granularity channel, l1 or l2 (hpcprune.structured.CHANNEL_CRITERIA)."""
    rule: Literal["global", "layer", "threshold", "row", "nm"] = "global"
    """global: exact sparsity over all prunable tensors; layer: the same sparsity in every tensor;
    threshold: prune every weight whose score is <= `threshold`; row: the same sparsity in every output
    row (the default of criterion wanda); nm: keep `n` of every `m` consecutive input weights."""
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
        """Wanda compares within output rows unless a rule is given; nm fixes the sparsity at 1 - n/m."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "rule" not in data and data.get("criterion") == "wanda":
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
        from hpcprune.structured import criteria_of  # late: scoring imports torch

        granularity = info.data.get("granularity", "weight")
        known = criteria_of(granularity)
        if name not in known:
            raise ValueError(f"unknown {granularity} criterion {name!r}; known: {', '.join(sorted(known))}")
        return name


class ScheduleConfig(Section):
    kind: Literal["oneshot", "iterative", "gradual"] = "oneshot"
    rounds: int = Field(1, ge=1)
    """Number of prune → fine-tune rounds (iterative); density shrinks geometrically per round."""
    initial_sparsity: float = Field(0.0, ge=0, lt=1)
    """gradual: s_i, the sparsity when fine-tuning starts (Zhu & Gupta 2017)."""
    start_step: int = Field(0, ge=0)
    """gradual: t0, the fine-tuning step of the first mask update's origin."""
    interval: int = Field(50, gt=0)
    """gradual: Δt, optimizer steps between mask updates."""
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
    """Text file, one sentence per line (Hugging Face models): tokenized, joined and cut into sequences."""
    sequence_length: int = Field(32, gt=1)
    """Tokens per calibration sequence (text)."""


class DistillConfig(Section):
    """Knowledge distillation from the dense model while fine-tuning (Hinton et al. 2015)."""

    weight: float = Field(0.0, ge=0, le=1)
    """Share of the distillation term in the loss; 0: plain cross-entropy, no teacher."""
    temperature: float = Field(4.0, gt=0)


class OutputConfig(Section):
    path: str = "runs/hpcprune.h5"
    """Archive to write; model states go to `<path minus .h5>.states/` beside it."""


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
        from hpcprune.fanout import check_backend  # late: fanout imports torch

        check_backend(name)
        return name

    @model_validator(mode="after")
    def _slurm_workers_need_memory(self) -> FanoutConfig:
        if self.backend == "dask" and self.dask.cluster == "slurm" and self.slurm.mem_gb is None:
            raise ValueError("fanout.dask.cluster 'slurm' needs fanout.slurm.mem_gb (dask-jobqueue asks for it)")
        return self


class RunConfig(Section):
    seed: int = 0
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
    fanout: FanoutConfig = Field(default_factory=FanoutConfig)
    """How selection is spread: this process's ranks, or staged tasks on a SLURM job array or dask."""

    @model_validator(mode="after")
    def _hf_models_are_pruned_not_trained(self) -> RunConfig:
        if self.model.name.startswith("hf:") and (self.pretrain.epochs or self.finetune.epochs):
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
        """Channels need a module to trace, a rule of hpcprune.structured, and selection between rounds."""
        from hpcprune.structured import CHANNEL_RULES, CHANNEL_SCHEDULES

        if self.prune.granularity != "channel":
            return self
        if self.model.name == CHECKPOINT_MODEL:
            raise ValueError(f"prune.granularity channel needs a module: model.name '{CHECKPOINT_MODEL}' has none")
        if self.prune.rule not in CHANNEL_RULES:
            raise ValueError(f"prune.rule {self.prune.rule!r} does not apply to channels; use {', '.join(CHANNEL_RULES)}")
        if self.schedule.kind not in CHANNEL_SCHEDULES:
            raise ValueError(f"schedule.kind {self.schedule.kind!r} does not apply to channels; "
                             f"use {', '.join(CHANNEL_SCHEDULES)}")
        return self

    @model_validator(mode="after")
    def _fanout_scores_weights_alone(self) -> RunConfig:
        """Fanned-out tasks score single weights from the weights alone: no channels, no calibration data."""
        from hpcprune.calibrate import needs_calibration
        from hpcprune.fanout import IN_WORLD

        if self.fanout.backend == IN_WORLD:
            return self
        if self.prune.granularity != "weight":
            raise ValueError(f"fanout.backend {self.fanout.backend!r} selects single weights: "
                             f"prune.granularity {self.prune.granularity!r} needs fanout.backend {IN_WORLD!r}")
        if needs_calibration(self.prune.criterion):
            raise ValueError(f"fanout.backend {self.fanout.backend!r}: criterion {self.prune.criterion!r} needs "
                             f"calibration data, which the tasks do not have; use fanout.backend {IN_WORLD!r}")
        if self.schedule.kind == "gradual":
            raise ValueError(f"fanout.backend {self.fanout.backend!r}: schedule.kind gradual selects again and again "
                             f"within the training ranks; use fanout.backend {IN_WORLD!r}")
        return self

    def to_yaml(self) -> str:
        """The resolved config, as stored in the archive and accepted back by `load_config`."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read `path` (None: all defaults), apply `key.sub=value` overrides, validate."""
    source = str(path) if path is not None else "<defaults>"
    tree = _read_yaml(Path(path)) if path is not None else {}
    for override in overrides:
        _apply_override(tree, override)
    return validate_tree(tree, source)


def load_config_text(text: str, source: str) -> RunConfig:
    """Validate a config held as YAML text (e.g. the copy stored in an archive)."""
    return validate_tree(_parse_yaml(text, source), source)


def validate_tree(tree: dict[str, Any], source: str) -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as error:
        raise UsageError(f"{source}: {_first_problem(error)}") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as error:
        raise UsageError(f"cannot read config {path}: {error.strerror or error}") from None
    return _parse_yaml(text, str(path))


def _parse_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        reason = getattr(error, "problem", None) or str(error).splitlines()[0]  # e.g. a control character
        raise UsageError(f"{source}:{line} malformed YAML ({reason})") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise UsageError(f"{source}: the top level must be a mapping of sections, not {type(tree).__name__}")
    return tree


def _apply_override(tree: dict[str, Any], override: str) -> None:
    """`a.b.c=value` sets tree['a']['b']['c']; the value is parsed as YAML (1e-3, true, [a, b])."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"--set {override!r}: expected key.path=value")
    parts = key.strip().split(".")
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UsageError(f"--set {key}: {'.'.join(parts[: depth + 1])} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise UsageError(f"--set {key}: value {raw!r} is not valid YAML") from None


def _first_problem(error: ValidationError) -> str:
    problem = error.errors()[0]
    key = ".".join(str(part) for part in problem["loc"]) or "<top level>"
    message = problem["msg"].removeprefix("Value error, ")
    if problem["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    given = problem.get("input")
    shown = "" if isinstance(given, dict) or given is None else f" (got {given!r})"
    return f"{key}: {message}{shown}"
