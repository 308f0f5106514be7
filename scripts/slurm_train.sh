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
PYTHON="$PYTHON" bash scripts/install_deps.sh

DATA_PATH="${DATA_PATH:-$PROJECT_PATH/data/kinetics400/annotations}"
EXP_NAME="${EXP_NAME:-svt_test}"
export MASTER_PORT="${MASTER_PORT:-29500}"

user_args=()
user_opts=()
in_opts=0
for arg in "$@"; do
    if [[ "$arg" == "--opts" ]]; then in_opts=1; continue; fi
    if (( in_opts )); then user_opts+=("$arg"); else user_args+=("$arg"); fi
done

# Fail before launching when the train list is not where the run will look (a forwarded --data_path wins).
data_dir="$DATA_PATH"
for ((i = 0; i < ${#user_args[@]}; i++)); do
    case "${user_args[i]}" in
        --data_path) data_dir="${user_args[i + 1]:-}" ;;
        --data_path=*) data_dir="${user_args[i]#--data_path=}" ;;
    esac
done
if [[ ! -f "$data_dir/train.csv" ]]; then
    echo "$(basename "$0"): $data_dir/train.csv not found. Set DATA_PATH (or pass --data_path) to the folder" \
         "with the Kinetics train.csv ('path label' per line), e.g. DATA_PATH=/data/k400/annotations;" \
         "video paths in it are joined to DATA.PATH_PREFIX (--opts DATA.PATH_PREFIX /data/k400/videos)." >&2
    exit 2
fi
mkdir -p "checkpoints/$EXP_NAME"

srun --kill-on-bad-exit=1 "$PYTHON" train_ssl.py \
  --arch timesformer \
  --batch_size_per_gpu "${BATCH_SIZE:-8}" \
  --epochs "${EPOCHS:-100}" \
  --num_workers "${NUM_WORKERS:-10}" \
  --data_path "$DATA_PATH" \
  --output_dir "checkpoints/$EXP_NAME" \
  ${user_args[@]+"${user_args[@]}"} \
  --opts \
  MODEL.TWO_STREAM False \
  MODEL.TWO_TOKEN False \
  DATA.NO_FLOW_AUG False \
  DATA.USE_FLOW False \
  DATA.RAND_CONV False \
  DATA.NO_SPATIAL False \
  ${user_opts[@]+"${user_opts[@]}"}
