#!/usr/bin/env bash
# Fine-tune an SVT checkpoint end to end with the paper's recipe (TimeSformer's: SGD, lr 0.005 for an effective
# batch of 64, x0.1 at epochs 11 and 14, 15 epochs, 8x32 clips at 224, 1 x 3 test views). TimeSformer reaches 64 by
# accumulating the gradients of 8 iterations of 8 clips (its GLOBAL_BATCH_SIZE); with the defaults below so does
# this script: 8 GPUs x 1 clip x 8 accumulated. Every path comes from the environment; extra arguments are forwarded
# to eval_finetune.py (a `--opts KEY VALUE ...` of yours goes after the script's own), e.g.
# `./scripts/finetune.sh --slowfast_eval True` or `./scripts/finetune.sh --evaluate`.
#   DATA_PATH   dataset root with splits/ and videos/ (SSv2: annotations/ and frames/)  (default: data/ucf101)
#   CHECKPOINT  initialisation (the released file or a train_ssl.py checkpoint.pth)     [required; not with --evaluate]
#   DATASET     ucf101 | hmdb51 | kinetics400 | ssv2          (default: ucf101)
#   NUM_LABELS  classes (101 UCF, 51 HMDB, 400 K400, 174 SSv2; default: from DATASET)
#   GPUS        processes (GPUs) to use                        (default: 8, the paper's)
#   BATCH_SIZE  clips per GPU per iteration   (default: 8 / GPUS where that divides, else 1; TimeSformer's 8 per
#               iteration)
#   ACCUM_ITER  iterations per optimizer step (effective batch = BATCH_SIZE x GPUS x ACCUM_ITER; the lr scales
#               with it)        (default: 64 / (GPUS x BATCH_SIZE), rounded up: the recipe's 64, or the nearest above)
#               Set these two here: --batch_size_per_gpu / --accum_iter among the arguments are refused (they would
#               override the defaults above, and the check of the effective batch, unseen).
#   EXP_NAME    run name                                       (default: ft_$DATASET)
#   OUTPUT_DIR  checkpoints, logs, results   (default: <repo>/checkpoints/finetune/$EXP_NAME); rerun to resume
#   LIST_DIR    folder of the list files     (default: $DATA_PATH/splits; K400: $DATA_PATH/annotations)
#   VIDEO_DIR   prefix of the list paths     (default: $DATA_PATH/videos; SSv2: $DATA_PATH/frames)
#               SSv2: the folder of the extracted JPEG frames (a folder per video id), not of the .webm videos
#   EXTRA_OPTS  more KEY VALUE config overrides, e.g. "TEST.NUM_ENSEMBLE_VIEWS 3"
#   MASTER_PORT rendezvous port       (default: a free one, so that evaluations can share a machine)
#   PYTHON      interpreter (runs torch.distributed.run)       (default: python3)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
source "$ROOT/scripts/common.sh"
check_deps
split_user_args "$@"
for arg in ${user_args[@]+"${user_args[@]}"}; do
    name="${arg%%=*}"
    for flag in --batch_size_per_gpu=BATCH_SIZE --accum_iter=ACCUM_ITER; do
        # the flag or an abbreviation argparse takes for it (--b..., --ac...: no other flag starts so)
        if [[ "${flag%=*}" == "$name"* && ( "$name" == --b* || "$name" == --ac* ) ]]; then
            echo "finetune.sh: set ${flag#*=}=... instead of passing $name: the script derives the effective" \
                 "batch (and the lr, which scales with it) from BATCH_SIZE and ACCUM_ITER, and the argument would" \
                 "override them unseen." >&2
            exit 2
        fi
    done
done
DATA_PATH="${DATA_PATH:-data/ucf101}"
DATASET="${DATASET:-ucf101}"
GPUS="${GPUS:-8}"
if [[ -z "${CHECKPOINT:-}" ]] && has_arg --evaluate ${user_args[@]+"${user_args[@]}"}; then
    init=()  # --evaluate tests OUTPUT_DIR's checkpoint.pth, which holds every weight
else
    : "${CHECKPOINT:?set CHECKPOINT to the checkpoint to fine-tune (e.g. checkpoints/kinetics400_vitb_ssl.pth)}"
    init=(--pretrained_weights "$CHECKPOINT")
fi
dataset_defaults  # DEFAULT_LABELS, LISTS, VIDEOS
if (( GPUS > 8 || 8 % GPUS )); then DEFAULT_BATCH=1; else DEFAULT_BATCH=$(( 8 / GPUS )); fi
BATCH_SIZE="${BATCH_SIZE:-$DEFAULT_BATCH}"
per_iteration=$(( GPUS * BATCH_SIZE ))
ACCUM_ITER="${ACCUM_ITER:-$(( (64 + per_iteration - 1) / per_iteration ))}"
if (( per_iteration * ACCUM_ITER != 64 )); then
    echo "finetune.sh: $GPUS GPUs x $BATCH_SIZE clips x $ACCUM_ITER accumulated = an effective batch of" \
         "$(( per_iteration * ACCUM_ITER )), not TimeSformer's 64 (the lr scales with it); set BATCH_SIZE and" \
         "ACCUM_ITER to choose." >&2
fi
LIST_DIR="${LIST_DIR:-$DATA_PATH/$LISTS}"
require_eval_inputs "$LIST_DIR"

one_node_rendezvous
exec "$PYTHON" -m torch.distributed.run "${rendezvous[@]}" --nproc_per_node="$GPUS" \
  "$ROOT/eval_finetune.py" \
  --arch vit_base \
  ${init[@]+"${init[@]}"} \
  --dataset "$DATASET" \
  --num_labels "${NUM_LABELS:-$DEFAULT_LABELS}" \
  --batch_size_per_gpu "$BATCH_SIZE" \
  --accum_iter "$ACCUM_ITER" \
  --num_workers 8 \
  --output_dir "${OUTPUT_DIR:-$ROOT/checkpoints/finetune/${EXP_NAME:-ft_$DATASET}}" \
  ${user_args[@]+"${user_args[@]}"} \
  --opts DATA.PATH_TO_DATA_DIR "$LIST_DIR" DATA.PATH_PREFIX "${VIDEO_DIR:-${DATA_PATH}/${VIDEOS}}" \
  ${EXTRA_OPTS:-} ${user_opts[@]+"${user_opts[@]}"}
