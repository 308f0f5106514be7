#!/usr/bin/env bash
# A linear probe or fine-tuning launch script (scripts/eval_linear.sh, scripts/finetune.sh) as a SLURM batch job that
# requeues itself when stopped. Submit from the repo root with the script's environment; arguments after the script
# are forwarded to it:
#   CHECKPOINT=kinetics400_vitb_ssl.pth DATASET=kinetics400 LIST_DIR=/data/k400/annotations \
#     VIDEO_DIR=/data/k400/videos sbatch scripts/slurm_eval.sh scripts/eval_linear.sh
# Change the #SBATCH lines for your cluster; GPUS defaults to the GPUs SLURM gives the node, MASTER_PORT to one
# derived from the job id. PROJECT_PATH: the repo (default: the submit directory). 120 s before the time limit
# SLURM signals this script (USR1, --signal below), which passes it on to torchrun as SIGTERM; torchrun sends it to
# the processes, which finish their step (at most 5 more, or 5 batches of a validation or test, which a resume runs
# again), write checkpoint.pth.tar (checkpoint.pth) and exit with status 3. The job then requeues itself and
# resumes there (REQUEUE=0 or a refusing cluster: exit 3, submit it again), as scripts/slurm_train.sh does.
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT: seconds torchrun leaves them after passing the signal on (default here 100;
# torchrun's own is 30; torchrun reads it after torch 2.11).
#SBATCH --job-name=svt-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=10
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
set -euo pipefail
cd "${PROJECT_PATH:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
source scripts/common.sh  # sbatch runs a spooled copy: source from the repo
script="${1:?usage: sbatch scripts/slurm_eval.sh scripts/eval_linear.sh|scripts/finetune.sh [ARGS...]}"
shift
if [[ -z "${GPUS:-}" && -n "${SLURM_GPUS_ON_NODE:-}" ]]; then export GPUS="$SLURM_GPUS_ON_NODE"; fi
# jobs packed onto one node (1-GPU probes) each need their own rendezvous port: one from the job id, below Linux's
# ephemeral ports (without MASTER_PORT the scripts' torchrun --standalone takes a free one)
export MASTER_PORT="${MASTER_PORT:-$((15000 + ${SLURM_JOB_ID:-0} % 15000))}"
# torchrun kills its processes 30 s after passing on the signal by default: leave them the warning's time (read by
# torchrun after torch 2.11; 2.11 and older keep 30 s, which 5 steps and a checkpoint usually fit in)
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-100}"
run_requeueable TERM bash "$script" "$@"  # the script execs torchrun: the signal reaches it
