#!/usr/bin/env bash
# hpcprune as a SLURM batch job: one rank per task, started by srun, preemptible and requeued.
#
#   sbatch slurm/prune.sh CONFIG [--out ARCHIVE] [--set KEY=VALUE ...] [--force]
#   sbatch --nodes=2 --time=04:00:00 slurm/prune.sh configs/quickstart.yaml --set prune.sparsity=0.95
#
# Edit the #SBATCH header (or override any line on the sbatch command line), not the body.
# The archive is the config's output.path, or --out; a relative path is taken from the folder
# sbatch was run in. This job's log is hpcprune-<job id>.out in that folder.
#
# Preemption: SLURM sends SIGUSR1 before the time limit (--signal below; it may come up to a minute
# earlier than asked) and SIGTERM when it preempts or requeues the job. Every rank then stops at the
# same safe point (after the current fine-tuning epoch, or between rounds), rank 0 records the
# checkpoint, an "interrupt" event and the requeue in the archive, runs `scontrol requeue`, and the
# ranks exit with status 75. When the job starts again (SLURM_RESTART_COUNT > 0) this script adds
# --resume (and drops --force), so the run continues from the archive instead of starting over.
#
# Nodes, and tasks (= ranks) on each node. Ranks shard the scoring and train data-parallel.
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
# CPU cores per rank; each rank's torch uses this many threads.
#SBATCH --cpus-per-task=4
# GPUs: uncomment (remove one #) on GPU nodes; each rank then trains on its own GPU with nccl.
##SBATCH --gpus-per-task=1
# Wall-clock limit. The warning below must leave time to finish one fine-tuning epoch.
#SBATCH --time=01:00:00
# SIGUSR1 to every rank this many seconds before the limit: stop at a safe point and requeue.
# (Not B:USR1 — the ranks must receive it, not this script.)
#SBATCH --signal=USR1@300
# Allow the job to be requeued (by itself on the warning, or by the cluster on preemption).
#SBATCH --requeue
# One log for all attempts: appended to, not truncated, when the requeued job starts again.
#SBATCH --job-name=hpcprune
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append

set -euo pipefail

if [ $# -lt 1 ] || [[ $1 == -* ]] || [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "usage: sbatch slurm/prune.sh CONFIG [--out ARCHIVE] [--set KEY=VALUE ...] [--force]" >&2
  exit 2
fi
config=$1
shift

args=(prune --config "$config")
if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then
  # A requeued attempt continues the archive its first attempt created: never overwrite it.
  for arg in "$@"; do [ "$arg" = --force ] || args+=("$arg"); done
  args+=(--resume)
else
  args+=("$@")
fi

# One torch thread per allocated core, not one per core of the node, for every rank on it.
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}

# On SIGTERM (requeue, preemption, time limit) this script must outlive the ranks, which are
# checkpointing: with a trap, bash runs it only after srun has returned.
trap 'echo "prune.sh: SIGTERM, waiting for the ranks to stop"' TERM

echo "prune.sh: job $SLURM_JOB_ID attempt $((${SLURM_RESTART_COUNT:-0} + 1)) on $SLURM_JOB_NODELIST: hpcprune ${args[*]}"
# Plain srun starts one process per task; they find each other through SLURM_* (torch.distributed).
status=0
srun --unbuffered hpcprune "${args[@]}" || status=$?
if [ "$status" = 75 ]; then
  echo "prune.sh: the ranks stopped at a safe point (status 75); the archive holds the checkpoint"
fi
exit "$status"
