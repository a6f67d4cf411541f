# Sourced by the batch scripts: rendezvous from the allocation, then one srun step that trains and,
# when the run stopped on the warning signal (exit status 3), requeues this job to resume it.
set -uo pipefail
MMCL_STOPPED=3  # mmcl train's exit status after checkpointing on SIGTERM/SIGUSR1

# The first node of the allocation hosts the rendezvous, at its NodeAddr (the node name unless the
# cluster maps names to other addresses); the port is fixed per job.
first_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
MASTER_ADDR="$(scontrol show node "$first_node" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')"
export MASTER_ADDR="${MASTER_ADDR:-$first_node}"
export MASTER_PORT="${MMCL_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): ${SLURM_NTASKS} tasks on ${SLURM_JOB_NODELIST}, rendezvous ${MASTER_ADDR}:${MASTER_PORT}"

train_and_requeue() {
    # run.resume=latest: a requeued job continues from its last checkpoint (a fresh job starts anew).
    # Every task exits 3 after the warning signal's checkpoint, but not at the same instant: killing
    # the others as soon as one exits (--kill-on-bad-exit) would turn their 3 into 143 and lose the
    # requeue. Instead the others get 120 s to finish (a crashed task's peers, stuck in a collective,
    # are then terminated).
    srun --kill-on-bad-exit=0 --wait=120 "$(dirname "${BASH_SOURCE[0]}")/launch.sh" train "$@" run.resume=latest
    status=$?
    if [ "$status" -eq "$MMCL_STOPPED" ]; then
        echo "stopped on the warning signal: requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    exit "$status"
}
