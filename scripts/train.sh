#!/usr/bin/env bash
# SVT self-supervised pretraining on Kinetics (the original's launch: TimeSformer-B, 8 clips per GPU; the
# recipe is scripts/common.sh's recipe_defaults). Every path and size comes from the environment; extra arguments are forwarded
# to train_ssl.py, and any `--opts KEY VALUE ...` of yours is appended after the script's own, e.g.
#   DATA_PATH=/data/k400/annotations ./scripts/train.sh --epochs 20 --opts DATA.PATH_PREFIX /data/k400/videos
#
#   PROJECT_PATH  repository root                                  (default: this script's repo)
#   DATA_PATH     folder with the Kinetics train.csv                (default: $PROJECT_PATH/data/kinetics400/annotations)
#   EXP_NAME      run name; outputs in $PROJECT_PATH/checkpoints/$EXP_NAME    (default: svt_test)
#   GPUS          processes on this node          (default: visible GPU count; 1 process on CPU)
#   BATCH_SIZE    clips per process                                 (default: 8)
#   EPOCHS        training epochs                  (default: 100, the original; the paper used 20; below 10,
#                 pass --warmup_epochs N <= EPOCHS: the warm-up is 10 epochs)
#   NUM_WORKERS   data-loading workers per process                  (default: 10)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node: run this script on every node with the same
#                 NNODES/MASTER_ADDR/MASTER_PORT and NODE_RANK 0..NNODES-1  (default: 1 node, standalone)
#   PYTHON        interpreter                                       (default: python3)
set -euo pipefail
PROJECT_PATH="${PROJECT_PATH:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
PYTHON="${PYTHON:-python3}"
cd "$PROJECT_PATH"
source scripts/common.sh
check_deps
recipe_defaults
NNODES="${NNODES:-1}"
if [[ -z "${GPUS:-}" ]]; then
    GPUS=$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi

split_user_args "$@"

require_train_csv "$DATA_PATH"
mkdir -p "checkpoints/$EXP_NAME"

if (( NNODES > 1 )); then
    : "${MASTER_ADDR:?set MASTER_ADDR (the address of node 0) for a multi-node run}"
    : "${NODE_RANK:?set NODE_RANK (0..NNODES-1) for a multi-node run}"
    launch=(--nnodes="$NNODES" --node_rank="$NODE_RANK" --rdzv_endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}")
else
    launch=(--standalone --nnodes=1)
fi

"$PYTHON" -m torch.distributed.run "${launch[@]}" --nproc_per_node="$GPUS" train_ssl.py "${train_args[@]}" \
  ${user_args[@]+"${user_args[@]}"} ${user_opts[@]+--opts "${user_opts[@]}"}
