#!/usr/bin/env bash
# Weighted k-NN evaluation of an SVT checkpoint (the original's settings: UCF-101 split 1, k 5, T 0.07,
# batch 128). Every path comes from the environment; extra arguments are forwarded to eval_knn.py
# (a `--opts KEY VALUE ...` of yours goes after the script's own), e.g.
# `./scripts/eval_knn.sh --nb_knn 10 20 --train_aug True --opts DATA.NUM_FRAMES 16`.
#   DATA_PATH   dataset root with splits/, knn_splits/ and videos/  (default: data/ucf101)
#   CHECKPOINT  checkpoint to evaluate (train_ssl.py checkpoint.pth or the released file)  [required]
#   DATASET     ucf101 | hmdb51 | kinetics400 | ssv2                 (default: ucf101)
#   EXP_NAME    run name                                      (default: knn_001)
#   OUTPUT_DIR  results folder                   (default: <repo>/checkpoints/eval/$EXP_NAME)
#   LIST_DIR    folder of the list files                     (default: $DATA_PATH/knn_splits)
#   VIDEO_DIR   prefix of the list paths (DATA.PATH_PREFIX)   (default: $DATA_PATH/videos; SSv2: $DATA_PATH/frames)
#               SSv2: LIST_DIR the folder of its JSONs and frame lists, VIDEO_DIR that of the extracted JPEG
#               frames (a folder per video id), not of the .webm videos (datasets/DATASET.md)
#   EXTRA_OPTS  more KEY VALUE config overrides, e.g. "DATA.NUM_FRAMES 16"
#   GPUS        processes (GPUs) to use                               (default: 1)
#   MASTER_PORT rendezvous port       (default: a free one, so that evaluations can share a machine)
#   PYTHON      interpreter (runs torch.distributed.run)              (default: python3)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
source "$ROOT/scripts/common.sh"
check_deps
split_user_args "$@"
eval_defaults knn_001
dataset_defaults  # VIDEOS; the lists stay in $DATA_PATH/knn_splits (the original's layout)

LIST_DIR="${LIST_DIR:-$DATA_PATH/knn_splits}"
require_eval_inputs "$LIST_DIR"

one_node_rendezvous
"$PYTHON" -m torch.distributed.run "${rendezvous[@]}" --nproc_per_node="$GPUS" \
  "$ROOT/eval_knn.py" \
  --arch vit_base \
  --pretrained_weights "$CHECKPOINT" \
  --batch_size_per_gpu 128 \
  --nb_knn 5 \
  --temperature 0.07 \
  --num_workers 4 \
  --dataset "$DATASET" \
  --output_dir "${OUTPUT_DIR:-$ROOT/checkpoints/eval/$EXP_NAME}" \
  ${user_args[@]+"${user_args[@]}"} \
  --opts DATA.PATH_TO_DATA_DIR "$LIST_DIR" DATA.PATH_PREFIX "${VIDEO_DIR:-${DATA_PATH}/${VIDEOS}}" \
  ${EXTRA_OPTS:-} ${user_opts[@]+"${user_opts[@]}"}
