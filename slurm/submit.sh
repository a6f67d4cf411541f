#!/usr/bin/env bash
# Submit training and, once it has completed (requeues included), its evaluation and open_clip export.
#   slurm/submit.sh cpu|gpu RUN_NAME CONFIG [key=value ...]
set -euo pipefail
kind="$1" name="$2" config="$3"
shift 3
dir="$(dirname "$0")"
mkdir -p logs
train=$(sbatch --parsable "$dir/train_${kind}.sbatch" "$config" "run.name=$name" "$@")
evaluation=$(sbatch --parsable --dependency="afterok:$train" "$dir/eval.sbatch" "runs/$name")
export_job=$(sbatch --parsable --dependency="afterok:$train" "$dir/convert.sbatch" "runs/$name" "exports/$name")
echo "training job $train, evaluation job $evaluation, export job $export_job (both after training completes)"
