"""Scoring tasks as a SLURM job array, submitted with submitit.

    hpcprune prune --config configs/oneshot_global.yaml --set fanout.backend=slurm-array --set fanout.shards=8

A round submits one array of all its shards; the tasks run side by side through every stage. Shards
started again (a task failed, or stopped waiting) go in one smaller array each time. Partition, time
limit, CPUs and memory come from `fanout.slurm`; logs go to `<archive>.fanout/logs/<job id>_<task>/`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import submitit

from hpcprune.config import FanoutConfig
from hpcprune.errors import UsageError
from hpcprune.run.fanout import Backend, Running, Task


class ShardTask(submitit.helpers.Checkpointable):
    """An array task that submitit requeues as it is when SLURM preempts it or its time runs out:
    whatever it wrote is complete (written aside, then renamed), so starting it over is safe."""

    def __init__(self, task: Task):
        self.task = task

    def __call__(self, folder: str, rank: int) -> str:
        return self.task(folder, rank)


class SlurmArray(Backend):
    def __init__(self, config: FanoutConfig, logs: Path):
        if shutil.which("sbatch") is None:
            raise UsageError("fanout.backend slurm-array needs SLURM: sbatch is not on PATH")
        slurm = config.slurm
        self.executor = submitit.AutoExecutor(folder=logs / "%j", cluster="slurm")
        parameters = dict(name="hpcprune-scoring", timeout_min=slurm.time_min, cpus_per_task=slurm.cpus_per_task,
                          tasks_per_node=1, nodes=1, slurm_partition=slurm.partition, mem_gb=slurm.mem_gb,
                          slurm_array_parallelism=slurm.array_parallelism)
        self.executor.update_parameters(**{key: value for key, value in parameters.items() if value is not None})

    def submit(self, task: Task, folder: str, ranks: list[int]) -> list[Running]:
        try:
            with submitit.helpers.clean_env():  # from inside a SLURM job (hpcprune submit), submit a fresh one
                jobs = self.executor.map_array(ShardTask(task), [folder] * len(ranks), ranks)
        except submitit.core.utils.FailedJobError as error:  # sbatch said no: a partition, a limit, a QoS
            raise UsageError(f"fanout.backend slurm-array: sbatch refused the array: "
                             f"{str(error).strip().splitlines()[-1]}") from None
        return [ArrayTask(job) for job in jobs]


class ArrayTask:
    """One task of a submitted array, as the coordinator polls it."""

    def __init__(self, job: submitit.Job):
        self.job = job

    def done(self) -> bool:
        return self.job.done()

    def failure(self) -> str | None:
        try:
            self.job.result()
        except submitit.core.utils.UncompletedJobError as error:  # killed, timed out, node lost
            return f"job {self.job.job_id}: {str(error).strip().splitlines()[0]}"
        except submitit.core.utils.FailedJobError as error:  # raised: the trace's last line says what
            trace = [line for line in str(error).strip().splitlines() if not line.startswith("srun:")]
            return f"job {self.job.job_id}: {trace[-1]} (log: {self.job.paths.stderr})"
        return None

    def cancel(self) -> None:
        self.job.cancel(check=False)
