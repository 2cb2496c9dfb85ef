"""`hpcprune submit`: the run as a submitit job on SLURM (or as local processes), requeued on preemption.

    hpcprune submit --config configs/quickstart.yaml --nodes 2 --tasks-per-node 4 --time 120 [--wait]

The config is read and checked here, before anything is submitted, and the job receives the
resolved config itself, not the file: editing the file later changes nothing for the job or its
requeued attempts. The archive path is made absolute; submitit's scripts and logs go beside it in
`<archive>.logs/<job id>/` (run.h5.logs/). Each submitit task is one rank: with several tasks they form a
torch.distributed world from submitit's job environment (SLURM_PROCID, SLURM_NTASKS... under SLURM).

Preemption: submitit asks SLURM for SIGUSR2 `signal_delay_s` (90 s) before the time limit. That
signal, like SIGUSR1 and SIGTERM, stops the run at its next safe point (`hpcprune.dist.signals`); then
rank 0 hands over to submitit's own handler, which calls `PruneTask.checkpoint` — the same run,
now resuming — and requeues the job. An attempt that SLURM restarted by itself
(SLURM_RESTART_COUNT > 0) resumes as well and never overwrites the archive.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass, replace
from pathlib import Path

from hpcprune.archive.atomic import check_output_path
from hpcprune.archive.side_files import logs_folder
from hpcprune.archive.writer import state_path
from hpcprune.config import RunConfig
from hpcprune.dist.logs import setup_logging
from hpcprune.dist.world import SingleWorld, World
from hpcprune.errors import UsageError

log = logging.getLogger("hpcprune")

try:
    import submitit
except ImportError:  # the command says what to install; the rest of hpcprune does not need it
    submitit = None

CLUSTERS = ("slurm", "local")
Checkpointable = submitit.helpers.Checkpointable if submitit is not None else object


@dataclass(frozen=True)
class SubmitOptions:
    """Where and how big the job is; everything about the run itself is in the config."""

    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_task: int = 0
    time_min: int = 60
    partition: str | None = None
    cluster: str | None = None  # None: SLURM when sbatch is on PATH, else local processes


class PruneTask(Checkpointable):
    """The callable submitit runs in every task: one rank of `hpcprune prune` on `config`."""

    def __init__(self, config: RunConfig, *, resume: bool = False, force: bool = False):
        self.config, self.resume, self.force = config, resume, force

    def __call__(self):
        from hpcprune.dist import signals
        from hpcprune.run.pipeline import run

        submitit_handler = signal.getsignal(signal.SIGUSR2)  # submitit's checkpoint-and-requeue
        signals.listen((*signals.STOP_SIGNALS, signal.SIGUSR2))
        environment = submitit.JobEnvironment()
        world = task_world(environment)
        setup_logging(world.rank, quiet=False)
        restarted = int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0  # requeued by SLURM itself
        with signals.exits_when_preempted(world, requeue=lambda: _requeue_through(submitit_handler)):
            result = run(self.config, world, resume=self.resume or restarted, force=self.force and not restarted)
        world.close()
        return replace(result, model=None) if world.is_root else None

    def checkpoint(self, *args, **kwargs):
        """What submitit requeues: the same run, continuing from its archive."""
        return submitit.helpers.DelayedSubmission(PruneTask(self.config, resume=True))


def task_world(environment) -> World:
    """The World of a submitit task: ranks from the job environment, rendezvous on the first host."""
    if environment.num_tasks == 1:
        return SingleWorld()
    from hpcprune.dist.torch_dist import joined_by_announcement

    # Rank 0 announces its store on a free port of a list every task derives from the job id.
    return joined_by_announcement(environment.global_rank, environment.num_tasks, environment.local_rank,
                                  environment.hostnames[0], environment.job_id, f"submitit-{environment.job_id}")


def _requeue_through(handler) -> str | None:
    """Run submitit's checkpoint-and-requeue handler; it ends by raising SystemExit once requeued."""
    if not callable(handler):
        return None
    try:
        handler(signal.SIGUSR2, None)
    except SystemExit:
        return f"submitit checkpoint, job {submitit.JobEnvironment().job_id} requeued"
    except Exception as error:  # e.g. SLURM requeued the job already, or timed out too often
        log.warning("submitit did not requeue the job (%s): continue it with --resume", error)
    return None


def submit(config: RunConfig, options: SubmitOptions, *, resume: bool = False, force: bool = False):
    """Submit the run; returns the submitit Job. The archive must not exist unless resuming or forcing."""
    if submitit is None:
        raise UsageError("hpcprune submit needs submitit: pip install 'hpcprune[slurm]'")
    if options.cluster is not None and options.cluster not in CLUSTERS:
        raise UsageError(f"--cluster: unknown cluster {options.cluster!r}; use {' or '.join(CLUSTERS)}")
    archive = Path(config.output.path).absolute()
    check_output_path(archive, logs_folder(archive), state_path(archive, "dense"))
    if archive.exists() and not (resume or force):
        raise UsageError(f"{archive} exists; pass --resume to continue it or --force to overwrite")
    config = config.model_copy(update={"output": config.output.model_copy(update={"path": str(archive)})})
    try:
        executor = submitit.AutoExecutor(folder=logs_folder(archive) / "%j", cluster=options.cluster)
        executor.update_parameters(
            name="hpcprune", nodes=options.nodes, tasks_per_node=options.tasks_per_node,
            gpus_per_node=options.tasks_per_node * options.gpus_per_task, timeout_min=options.time_min,
            slurm_partition=options.partition,
        )
        return executor.submit(PruneTask(config, resume=resume, force=force))
    except RuntimeError as error:  # no SLURM here, or sbatch refused the job (partition, limits)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"cannot submit to {options.cluster or 'the detected cluster'}: {first_line}") from None
