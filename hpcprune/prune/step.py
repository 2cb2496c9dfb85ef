"""One mask update: calibrate (when the criterion needs data) -> score -> protect -> select.

    hpcprune prune --config configs/fmnist_lenet300_taylor.yaml

The pipeline calls `select_weights` once per round; the gradual schedule calls it at every mask
update during fine-tuning. Scores are lazy (hpcprune.prune.scoring.LazyScores): computed tensor by tensor
inside the selection, weights pruned before scoring -inf so they stay pruned.
"""

from __future__ import annotations

from hpcprune.errors import UsageError
from hpcprune.models.hf import encoder_inputs, is_hf_model, text_sequences
from hpcprune.progress import scoring_progress
from hpcprune.prune.calibrate import CalibrationBatches, Statistics, calibrate
from hpcprune.prune.patterns import rule_options
from hpcprune.prune.protect import protect_layers
from hpcprune.prune.rules import select
from hpcprune.prune.scoring import LazyScores, ScoreContext
from hpcprune.prune.selection import Selection
from hpcprune.registry import needs_calibration


def select_weights(job, target: float) -> Selection:
    """Masks of this rank's tensors at sparsity `target` under the job's criterion and rule."""
    config, world = job.config, job.world
    context = ScoreContext(seed=config.seed, statistics=calibration_statistics(job))
    scores = LazyScores(config.prune.criterion, job.plan.local(world.rank), job.weights, context, previous=job.masks)
    if config.prune.rule == "global":
        scores = protect_layers(scores, job.plan, config.prune.min_density, target)
    with scoring_progress(scores, f"score + select ({100 * target:.2f} %)", config.progress and world.is_root) as scores:
        return select(config.prune.rule, scores, job.plan, world, sparsity=target, threshold=config.prune.threshold,
                      **rule_options(config.prune))


def calibration_statistics(job) -> Statistics | None:
    """What the criterion needs from calibration data; None when it scores weights alone."""
    criterion = job.config.prune.criterion
    if not needs_calibration(criterion):
        return None
    if job.model is None:
        raise UsageError(f"criterion {criterion!r} needs calibration data through the model: "
                         f"model.name 'checkpoint' has no module to run")
    return calibrate(job.model, job.plan, calibration_batches(job), job.world, criterion, job.device)


def calibration_batches(job) -> CalibrationBatches:
    """Slices of the image split, or token sequences of `calibration.text` for a Hugging Face model."""
    cfg, name = job.config.calibration, job.config.model.name
    if is_hf_model(name):
        return CalibrationBatches.of_tensor(text_sequences(name, cfg), cfg, encoder_inputs)
    return CalibrationBatches.of_dataset(getattr(job.splits, cfg.split), cfg)
