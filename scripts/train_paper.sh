#!/usr/bin/env bash
# The paper's SVT recipe (arXiv 2112.01514 and the author's answers in kahnchana/svt#16/#23) on top of
# scripts/train.sh: 20 epochs with 5 warm-up epochs, weight decay 0.04 -> 0.1, global views of 8 and 16
# frames and local views of 2,2,4,4,8,8,16,16 frames, a global batch of 32 (8 clips x 4 GPUs), and the DINO
# ImageNet ViT-B/16 spatial init when PRETRAINED is set. Same environment as scripts/train.sh plus:
#   PRETRAINED  local dino_vitbase16_pretrain.pth (TIMESFORMER.PRETRAINED_MODEL); empty = random init
#   EXP_NAME    (default: svt_paper)   EPOCHS (default: 20)
#   BATCH_SIZE  (default: 32 / (GPUS x NNODES) with 4, 8, 16 or 32 processes, so the batch and lr are the
#               paper's; 8 otherwise, and the lr scales with the global batch, as --lr says)
# Extra arguments and `--opts` are forwarded and win over the preset.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/common.sh"
export EXP_NAME="${EXP_NAME:-svt_paper}"
export EPOCHS="${EPOCHS:-20}"

split_user_args "$@"

if [[ -z "${BATCH_SIZE:-}" ]]; then
    if [[ -z "${GPUS:-}" ]]; then
        GPUS=$("${PYTHON:-python3}" -c "import torch; print(max(torch.cuda.device_count(), 1))")
        export GPUS
    fi
    processes=$(( GPUS * ${NNODES:-1} ))
    if (( processes >= 4 && 32 % processes == 0 )); then
        BATCH_SIZE=$(( 32 / processes ))
    else
        BATCH_SIZE=8
        echo "train_paper.sh: $processes processes x 8 clips = a global batch of $(( 8 * processes )), not the" \
             "paper's 32 (the lr scales with it); set BATCH_SIZE to choose." >&2
    fi
    export BATCH_SIZE
fi

paper_opts=(DATA.GLOBAL_NUM_FRAMES "[8, 16]" DATA.LOCAL_NUM_FRAMES "[2, 2, 4, 4, 8, 8, 16, 16]")
if [[ -n "${PRETRAINED:-}" ]]; then
    if [[ ! -f "$PRETRAINED" ]]; then
        echo "PRETRAINED=$PRETRAINED: no such file (the DINO ViT-B/16 ImageNet weights)." >&2
        exit 1
    fi
    paper_opts+=(TIMESFORMER.PRETRAINED_MODEL "$PRETRAINED")
fi

exec bash "$HERE/train.sh" \
  --warmup_epochs 5 \
  --weight_decay 0.04 \
  --weight_decay_end 0.1 \
  --local_crops_number 8 \
  ${user_args[@]+"${user_args[@]}"} \
  --opts "${paper_opts[@]}" ${user_opts[@]+"${user_opts[@]}"}
