"""Where a run starts or continues: the archive created or reopened, and what resume reads back.

    hpcprune prune --config configs/quickstart.yaml --resume

Rank 0 creates the archive (or checks that the recorded run may continue: same config, states on
disk, readable masks, an archive whose structure matches its table of contents), reads the
`ResumePoint` and broadcasts it, so every rank continues from the same place, with the same side
folders. From then until the run ends rank 0 holds the archive's lock (`holding_archive`): a
second run, resume or export of it is refused. `resume_masks` brings back the last complete round's
masks and weights, tensor by tensor.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hpcprune.archive.atomic import check_output_path
from hpcprune.archive.reader import open_archive
from hpcprune.archive.side_files import SideFiles
from hpcprune.archive.writer import Archive, state_path
from hpcprune.dist.failures import agreed
from hpcprune.dist.signals import Preempted
from hpcprune.dist.world import World
from hpcprune.errors import UsageError
from hpcprune.models.builders import load_checkpoint
from hpcprune.run.job import Job, PackedMasks
from hpcprune.run.mask_traffic import scatter_from_root
from hpcprune.train.checkpoint import SavedTraining

log = logging.getLogger("hpcprune")


@dataclass
class ResumePoint:
    """Where a run continues: rank 0 reads it from the archive and broadcasts it."""

    dense_state: str | None = None  # state file of the dense model, once recorded
    dense_accuracy: float | None = None
    last_round: int = 0  # last complete round (0: none)
    round_state: str | None = None  # model state after that round
    training: dict | None = None  # a training stage stopped mid-way (fields of SavedTraining)
    side: dict = field(default_factory=dict)  # the run's SideFiles (folder as text)


def open_run_archive(job: Job, *, resume: bool, force: bool) -> ResumePoint:
    """Create the archive, or reopen it to resume; every rank learns the resume point (with the
    archive's side files), or the refusal."""
    point = agreed(job.world, lambda: _open_on_root(job, resume=resume, force=force) if job.world.is_root else None)
    shared = job.world.broadcast_bytes(json.dumps(asdict(point)).encode() if job.world.is_root else None)
    point = ResumePoint(**json.loads(shared))
    job.side = SideFiles(**{**point.side, "folder": Path(point.side["folder"])})
    return point


@contextlib.contextmanager
def holding_archive(world: World, path: Path) -> Iterator[None]:
    """Rank 0 holds the archive at `path` until the run ends, then lets it go (a --force run that
    never got to replace the old archive leaves no trace). A run stopped to be requeued keeps it: the
    signal handler (`hpcprune.dist.signals.exits_when_preempted`) records the stop first, then lets
    it go. Both pipelines run inside it (this one, and `hpcprune.run.sequential`)."""
    try:
        yield
    except Preempted:
        raise
    except BaseException:
        _let_go(world, path)
        raise
    _let_go(world, path)


def _let_go(world: World, path: Path) -> None:
    archive = Archive.held(path) if world.is_root else None
    if archive is not None:
        archive.close()


def _open_on_root(job: Job, *, resume: bool, force: bool) -> ResumePoint:
    check_output_path(job.path, state_path(job.path, "dense"))
    config_yaml = job.config.to_yaml()
    if resume and job.path.exists():
        _check_states_exist(job.path)  # before open_resume writes: a refused resume changes nothing
        archive = Archive.open_resume(job.path, config_yaml=config_yaml, world_size=job.world.size)
        point = _read_resume_point(job.path, archive)
        log.info("resuming %s after round %d", job.path, point.last_round)
        training = point.training and f", training stage {point.training['stage']} after epoch {point.training['epoch']}"
        archive.record_event("resume", f"after round {point.last_round}{training or ''} on {_where(job.world)}")
    else:
        point = ResumePoint()
        archive = Archive.create(job.path, config_yaml=config_yaml, model_name=job.config.model.name,
                                 params=_param_table(job), world_size=job.world.size, backend=job.world.name,
                                 force=force)
        archive.record_event("start", _where(job.world))
    point.side = {**asdict(archive.side), "folder": str(archive.side.folder)}
    return point


def _where(world: World) -> str:
    return f"{world.size} rank(s), {world.name} world"


def _param_table(job: Job) -> list[tuple[str, tuple[int, ...], bool]]:
    prunable = {spec.name for spec in job.plan.tensors}
    if job.model is None:
        return [(name, shape, name in prunable) for name, shape in job.weights.shapes.items()]
    return [(name, tuple(p.shape), name in prunable) for name, p in job.model.named_parameters()]


def _check_states_exist(path: Path) -> None:
    """The model states a resume continues from (dense, last complete round) must be on disk."""
    reader = open_archive(path)
    rounds = reader.rounds()
    for state in filter(None, [(reader.dense or {}).get("state_file"), rounds[-1]["state_file"] if rounds else None]):
        if not Path(state).is_file():
            raise UsageError(f"{path}: cannot resume, the model state {state} it continues from is missing")


def _read_resume_point(path: Path, archive: Archive) -> ResumePoint:
    reader = open_archive(path)
    rounds = archive.completed_rounds()
    dense = reader.dense if archive.dense_done() else {}
    return ResumePoint(
        dense_state=dense.get("state_file"),
        dense_accuracy=dense.get("accuracy"),
        last_round=max(rounds, default=0),
        # The round's own state, not /checkpoint: a kill between marking the round complete and
        # moving the checkpoint would otherwise pair this round's masks with the previous weights.
        round_state=reader.rounds()[-1]["state_file"] if rounds else None,
        training=_saved_training(reader.checkpoint, dense_done=bool(dense), last_round=max(rounds, default=0)),
    )


def _saved_training(checkpoint: dict | None, *, dense_done: bool, last_round: int) -> dict | None:
    """The interrupted training stage resume continues, if it is the next stage to run."""
    saved = SavedTraining.from_checkpoint(checkpoint)
    next_stage = last_round + 1 if dense_done else 0
    return asdict(saved) if saved is not None and saved.stage == next_stage else None


def resume_masks(job: Job, point: ResumePoint) -> PackedMasks:
    """Nothing pruned for a fresh run; the last complete round's masks (and weights) on resume.

    Rank 0 reads the masks one at a time and hands each out as it goes: a module trains with every
    mask, a masks-only rank keeps those of its own tensors."""
    if not point.last_round:
        return {}
    if job.model is not None:
        load_checkpoint(job.model, point.round_state)
    stored = None
    if job.world.is_root:
        stored = ((name, packed) for name, packed, _ in open_archive(job.path).iter_packed_masks(point.last_round))
    return scatter_from_root(stored, job.plan, job.world, everywhere=job.model is not None)
