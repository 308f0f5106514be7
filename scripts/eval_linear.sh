#!/usr/bin/env bash
# Linear probe of an SVT checkpoint (the original's settings: UCF-101 split 1, 20 epochs, lr 0.001,
# batch 16, CLS of the last block). Every path comes from the environment; extra arguments are
# forwarded to eval_linear.py (a `--opts KEY VALUE ...` of yours goes after the script's own), e.g.
# `./scripts/eval_linear.sh --slowfast_eval True` or `./scripts/eval_linear.sh --evaluate`.
#   DATA_PATH   dataset root with splits/ and videos/        (default: data/ucf101)
#   CHECKPOINT  checkpoint to evaluate (train_ssl.py checkpoint.pth or the released file)  [required]
#   DATASET     ucf101 | hmdb51 | kinetics400 | ssv2        (default: ucf101)
#   NUM_LABELS  classes (101 UCF, 51 HMDB, 400 K400, 174 SSv2; default: from DATASET)
#   EXP_NAME    run name                                      (default: le_001)
#   OUTPUT_DIR  results folder                   (default: <repo>/checkpoints/eval/$EXP_NAME)
#   LIST_DIR    folder of the list files                     (default: $DATA_PATH/splits)
#   VIDEO_DIR   prefix of the list paths (DATA.PATH_PREFIX)   (default: $DATA_PATH/videos; SSv2: $DATA_PATH/frames)
#               SSv2: LIST_DIR the folder of its JSONs and frame lists, VIDEO_DIR that of the extracted JPEG
#               frames (a folder per video id), not of the .webm videos (datasets/DATASET.md)
#   EXTRA_OPTS  more KEY VALUE config overrides, e.g. "DATA.NUM_FRAMES 16"
#   GPUS        processes (GPUs) to use                      (default: 1)
#   MASTER_PORT rendezvous port       (default: a free one, so that evaluations can share a machine)
#   PYTHON      interpreter (runs torch.distributed.run)     (default: python3)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
source "$ROOT/scripts/common.sh"
check_deps
split_user_args "$@"
eval_defaults le_001
dataset_defaults  # DEFAULT_LABELS, VIDEOS; the lists stay in $DATA_PATH/splits (the original's layout)
NUM_LABELS="${NUM_LABELS:-$DEFAULT_LABELS}"

LIST_DIR="${LIST_DIR:-$DATA_PATH/splits}"
require_eval_inputs "$LIST_DIR"

one_node_rendezvous
exec "$PYTHON" -m torch.distributed.run "${rendezvous[@]}" --nproc_per_node="$GPUS" \
  "$ROOT/eval_linear.py" \
  --n_last_blocks 1 \
  --arch vit_base \
  --pretrained_weights "$CHECKPOINT" \
  --epochs 20 \
  --lr 0.001 \
  --batch_size_per_gpu 16 \
  --num_workers 4 \
  --num_labels "$NUM_LABELS" \
  --dataset "$DATASET" \
  --output_dir "${OUTPUT_DIR:-$ROOT/checkpoints/eval/$EXP_NAME}" \
  ${user_args[@]+"${user_args[@]}"} \
  --opts DATA.PATH_TO_DATA_DIR "$LIST_DIR" DATA.PATH_PREFIX "${VIDEO_DIR:-${DATA_PATH}/${VIDEOS}}" \
  ${EXTRA_OPTS:-} ${user_opts[@]+"${user_opts[@]}"}
