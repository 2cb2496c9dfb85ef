"""Scoring tasks on dask workers: a LocalCluster, a running scheduler, or dask-jobqueue's SLURMCluster.

    hpcprune prune --config configs/oneshot_global.yaml --set fanout.backend=dask --set fanout.dask.workers=4
    hpcprune prune ... --set fanout.backend=dask --set fanout.dask.address=tcp://scheduler:8786
    hpcprune prune ... --set fanout.backend=dask --set fanout.dask.cluster=slurm --set fanout.slurm.partition=cpu

The cluster this backend starts lives for one round and is closed after it; a scheduler given by
address is only connected to. Workers must see the archive's folder (a shared filesystem).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from dask.distributed import Client, Future, LocalCluster

from hpcprune.config import FanoutConfig
from hpcprune.errors import UsageError
from hpcprune.run.fanout import Backend, Running, Task


def local_cluster(config: FanoutConfig, logs: Path) -> LocalCluster:
    # Threads enough for every task of a stage at once: a task waiting for the others' sums sleeps
    # and uses no CPU. Dask sets torch's threads to one in each worker process.
    threads = -(-config.shards // config.dask.workers)
    return LocalCluster(n_workers=config.dask.workers, threads_per_worker=threads, processes=True,
                        dashboard_address=":0", silence_logs=logging.WARNING)


def slurm_cluster(config: FanoutConfig, logs: Path):
    from dask_jobqueue import SLURMCluster

    slurm = config.slurm
    walltime = f"{slurm.time_min // 60:02d}:{slurm.time_min % 60:02d}:00"
    cluster = SLURMCluster(queue=slurm.partition, cores=slurm.cpus_per_task, processes=1, memory=f"{slurm.mem_gb}GB",
                           walltime=walltime, log_directory=str(logs), job_name="hpcprune-dask")
    cluster.scale(jobs=config.dask.workers)
    return cluster


CLUSTERS: dict[str, Callable] = {"local": local_cluster, "slurm": slurm_cluster}


class DaskWorkers(Backend):
    def __init__(self, config: FanoutConfig, logs: Path):
        logging.getLogger("distributed").setLevel(logging.WARNING)  # its INFO lines would drown the run's log
        self.cluster = None if config.dask.address else CLUSTERS[config.dask.cluster](config, logs)
        try:
            self.client = Client(config.dask.address or self.cluster)
        except OSError as error:  # includes timeouts: nothing answers at that address
            raise UsageError(f"fanout.dask.address {config.dask.address}: no dask scheduler answers ({error})") from None

    def submit(self, task: Task, folder: str, ranks: list[int]) -> list[Running]:
        # pure=False: a task started again must really run, not reuse the failed one's key.
        return [WorkerTask(future) for future in self.client.map(task, [folder] * len(ranks), ranks, pure=False)]

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


class WorkerTask:
    """One task on the dask cluster, as the coordinator polls it."""

    def __init__(self, future: Future):
        self.future = future

    def done(self) -> bool:
        return self.future.done()

    def failure(self) -> str | None:
        error = self.future.exception()
        return None if error is None else f"{type(error).__name__}: {error}"

    def cancel(self) -> None:
        self.future.cancel()
