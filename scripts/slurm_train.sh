#!/usr/bin/env bash
# SVT pretraining on a SLURM cluster: one task per GPU, train_ssl.py reads SLURM_PROCID / SLURM_NTASKS /
# SLURM_LOCALID and takes the first host of SLURM_NODELIST as MASTER_ADDR. Submit from the repo root:
#   DATA_PATH=/data/k400/annotations sbatch scripts/slurm_train.sh --opts DATA.PATH_PREFIX /data/k400/videos
# Change the #SBATCH lines for your cluster (nodes x GPUs per node = processes). Environment: PROJECT_PATH
# (default: the submit directory), DATA_PATH, EXP_NAME (svt_test), BATCH_SIZE (8), EPOCHS (100),
# NUM_WORKERS (10), MASTER_PORT (29500), PYTHON (python3). Extra arguments are forwarded.
#SBATCH --job-name=svt
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=10
#SBATCH --time=72:00:00
#SBATCH --output=slurm-%j.out
set -euo pipefail
PROJECT_PATH="${PROJECT_PATH:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
PYTHON="${PYTHON:-python3}"
cd "$PROJECT_PATH"
source scripts/common.sh  # sbatch runs a spooled copy: source from the repo
check_deps
recipe_defaults
export MASTER_PORT="${MASTER_PORT:-29500}"

split_user_args "$@"

require_train_csv "$DATA_PATH"
mkdir -p "checkpoints/$EXP_NAME"

srun --kill-on-bad-exit=1 "$PYTHON" train_ssl.py "${train_args[@]}" \
  ${user_args[@]+"${user_args[@]}"} ${user_opts[@]+--opts "${user_opts[@]}"}
