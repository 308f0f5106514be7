#!/usr/bin/env bash
# SVT pretraining on a SLURM cluster: one task per GPU, train_ssl.py reads SLURM_PROCID / SLURM_NTASKS /
# SLURM_LOCALID and takes the first host of SLURM_NODELIST as MASTER_ADDR. Submit from the repo root:
#   DATA_PATH=/data/k400/annotations sbatch scripts/slurm_train.sh --opts DATA.PATH_PREFIX /data/k400/videos
# Change the #SBATCH lines for your cluster (nodes x GPUs per node = processes). Environment: PROJECT_PATH
# (default: the submit directory), DATA_PATH, EXP_NAME (svt_test), BATCH_SIZE (8), EPOCHS (100),
# NUM_WORKERS (10), MASTER_PORT (29500), PYTHON (python3). Extra arguments are forwarded.
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
export MASTER_PORT="${MASTER_PORT:-29500}"

split_user_args "$@"

require_train_csv "$DATA_PATH"
mkdir -p "checkpoints/$EXP_NAME"

PREEMPTED=3  # train_ssl.py's exit status after a stop signal: checkpoint.pth holds the step reached
signalled=0
srun_pid=
forward_stop() {  # the batch shell got the warning: pass it to srun, which signals every task
  signalled=1
  [ -n "$srun_pid" ] && kill -USR1 "$srun_pid" 2>/dev/null || true
}
trap forward_stop USR1
srun --kill-on-bad-exit=1 "$PYTHON" train_ssl.py "${train_args[@]}" \
  ${user_args[@]+"${user_args[@]}"} ${user_opts[@]+--opts "${user_opts[@]}"} &
srun_pid=$!
if [ "$signalled" -eq 1 ]; then kill -USR1 "$srun_pid" 2>/dev/null || true; fi  # the warning came before srun's pid
while kill -0 "$srun_pid" 2>/dev/null; do  # `wait` returns early when a trapped signal arrives
  wait "$srun_pid" || true
done
status=0
wait "$srun_pid" || status=$?  # srun's own exit status
# After a stop the first task to exit may make srun end the others (--kill-on-bad-exit): a signalled run that
# did not end cleanly is a stop too (checkpoint.pth is written before any task exits).
if [ "$status" -eq "$PREEMPTED" ] || { [ "$signalled" -eq 1 ] && [ "$status" -ne 0 ]; }; then
  if [ "${REQUEUE:-1}" = 1 ] && [ -n "${SLURM_JOB_ID:-}" ] && scontrol requeue "$SLURM_JOB_ID"; then
    echo "Stopped on a signal with checkpoints/$EXP_NAME/checkpoint.pth written; job $SLURM_JOB_ID requeued: it resumes there."
  else
    echo "Stopped on a signal with checkpoints/$EXP_NAME/checkpoint.pth written; not requeued (REQUEUE=${REQUEUE:-1}" \
         "or the cluster refuses): submit the same command again to resume." >&2
  fi
  exit "$PREEMPTED"
fi
exit "$status"
