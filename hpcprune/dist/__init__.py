"""Floor 3, dist: the ranks of a job and how they talk.

What lives here: the `World` interface (`world`) and its backends (`mpi` over mpi4py,
`torch_dist` over gloo), launcher detection (`detect`), DistributedDataParallel set-up (`ddp`),
preemption signals and the safe points where ranks stop together (`signals`), per-rank log
lines (`logs`), sums with the same bits for any world size (`exact_sum`), and what a rank's
process does with its threads and its heap (`threads`, `heap`). It may import `archive`,
`config` and the bottom floor; everything above is written once against `World`.
"""
