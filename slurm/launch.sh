#!/usr/bin/env bash
# One training process of a SLURM job step (started by srun, one per task): map SLURM's task
# variables onto the launcher variables mmcl reads (the same ones torchrun sets), then run mmcl.
# MASTER_ADDR / MASTER_PORT come from the batch script, which derives them from the allocation.
set -euo pipefail
export RANK="${SLURM_PROCID:?launch.sh runs inside srun}"
export WORLD_SIZE="${SLURM_NTASKS:?}"
export LOCAL_RANK="${SLURM_LOCALID:?}"
export LOCAL_WORLD_SIZE="${SLURM_NTASKS_PER_NODE:-1}"
exec "${MMCL_PYTHON:-python}" -m mmcl "$@"
