#!/usr/bin/env bash
# SVT pretraining on a SLURM cluster: one task per GPU, train_ssl.py reads SLURM_PROCID / SLURM_NTASKS /
# SLURM_LOCALID and takes the first host of SLURM_NODELIST as MASTER_ADDR. Submit from the repo root:
#   DATA_PATH=/data/k400/annotations sbatch scripts/slurm_train.sh --opts DATA.PATH_PREFIX /data/k400/videos
# Change the #SBATCH lines for your cluster (nodes x GPUs per node = processes). Environment: PROJECT_PATH
# (default: the submit directory), DATA_PATH, EXP_NAME (svt_test), BATCH_SIZE (8), EPOCHS (100),
# NUM_WORKERS (10), MASTER_PORT (default: one derived from the job id, so jobs packed on one node do not
# collide), PYTHON (python3). Extra arguments are forwarded.
# Time limit and preemption: 120 s before the limit SLURM signals this script (USR1, --signal below), which passes
# it on to the tasks; they finish their step (at most 5 more), write checkpoint.pth and exit with status 3. The
# job then requeues itself (scontrol requeue; same job id, the log is appended) and resumes there. Where the cluster
# forbids requeue, or with REQUEUE=0, the job ends with status 3: submit it again and it resumes. A preemption's
# SIGTERM reaches the tasks directly, with the same stop (SLURM requeues preempted jobs itself where configured).
#SBATCH --job-name=svt
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=10
#SBATCH --time=72:00:00
#SBATCH --output=slurm-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
set -euo pipefail
PROJECT_PATH="${PROJECT_PATH:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
PYTHON="${PYTHON:-python3}"
cd "$PROJECT_PATH"
source scripts/common.sh  # sbatch runs a spooled copy: source from the repo
check_deps
recipe_defaults
export MASTER_PORT="${MASTER_PORT:-$((15000 + ${SLURM_JOB_ID:-0} % 15000))}"  # as scripts/slurm_eval.sh

split_user_args "$@"

require_train_csv "$DATA_PATH"
mkdir -p "checkpoints/$EXP_NAME"

run_requeueable USR1 srun --kill-on-bad-exit=1 "$PYTHON" train_ssl.py "${train_args[@]}" \
  ${user_args[@]+"${user_args[@]}"} ${user_opts[@]+--opts "${user_opts[@]}"}
