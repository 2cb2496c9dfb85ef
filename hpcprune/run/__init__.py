"""Floor 7, run: the pipelines that turn a config into an archive.

What lives here: `hpcprune prune` top down (`pipeline`, then `resume` and `rounds`, sharing a `job`
and moving masks between ranks with `mask_traffic`), the block-sequential pipeline (`sequential`,
with `sequential_streams`, `sequential_archive`, `sequential_eval`), selection fanned out to SLURM job arrays or dask
(`fanout`, `fanout_files`, `slurm_array`, `dask_tasks`), and `hpcprune submit` (`submit`). It may
import every floor below; `read`, `deploy` and the CLI sit above it.
"""
