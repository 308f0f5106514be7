#!/usr/bin/env bash
# SVT end to end in minutes: install what is missing, generate synthetic motion videos, pretrain a small
# TimeSformer with SVT (train_ssl.py, the same code path as a GPU run, online kNN every epoch), evaluate
# the SSL teacher and a randomly initialised twin with kNN (eval_knn.py) and a linear probe
# (eval_linear.py), then print the table and write $DEMO_OUT/results.json and $DEMO_OUT/report.png.
#
#   DEMO_SCALE   cpu (default): ~4 minutes on 2 CPU cores; gpu: a larger set and model for one GPU (~5 minutes)
#   REDUCED      1: a quick smoke run of the cpu scale (fewer videos and epochs; same commands)
#   DEMO_OUT     outputs (checkpoint, log.txt, tb/, eval folders, results.json, report.png) (default: outputs/demo)
#   DATA_PATH    dataset root in the layout of datasets/synthetic.py (annotations/train.csv, splits/,
#                knn_splits/, videos/, classes.txt); generated when missing
#                (default: data/synthetic_particles[_quick|_gpu])
#   SEED         seed of training, of the random-init twin and of the probe                  (default: 0)
#   EPOCHS       SSL epochs                                 (default: cpu 12, REDUCED=1 2, gpu 60)
#   NUM_WORKERS  data-loading workers                       (default: cpu 1, gpu 12)
#   PYTHON       interpreter                                (default: python3)
#   DRY_RUN      1: print the commands instead of running them
# Precision is --amp_dtype auto: bf16 on GPUs and on CPUs with native bf16 (AVX-512 BF16 / AMX), fp32 on
# other CPUs (emulated bf16 is 3-60x slower there); the training log says which and why.
# Extra arguments go to train_ssl.py; an `--opts KEY VALUE ...` of yours is appended after the demo's own in the
# training and in every evaluation, so its values win (a MODEL.DEPTH or DATA.NUM_FRAMES of yours reaches all three).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
REDUCED="${REDUCED:-0}"
DEMO_SCALE="${DEMO_SCALE:-cpu}"
DRY_RUN="${DRY_RUN:-0}"
start=$(date +%s)
stamp() { echo "[demo $(( $(date +%s) - start ))s] $*"; }
run() { if [[ "$DRY_RUN" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }

# Scene: fields of dots doing 6 motions no two of which are left-right mirrors (datasets.synthetic.FLIP_DISTINCT;
# SVT flips its views, so mirror classes such as move_left / move_right would look alike to it). Every
# video has the same colours and dot density: only the motion tells the classes apart.
gen=(--scene particles --motions move_right move_up move_down rotate_cw zoom_in zoom_out --frames 64 --size 64)
case "$DEMO_SCALE" in
cpu)
    if [[ "$REDUCED" == 1 ]]; then
        DATA_PATH="${DATA_PATH:-$ROOT/data/synthetic_particles_quick}"
        gen+=(--classes 3 --per_class 6)
        EPOCHS="${EPOCHS:-2}"; BATCH_SIZE=8; LINEAR_EPOCHS=2; KNN_K=(5 10)
    else
        DATA_PATH="${DATA_PATH:-$ROOT/data/synthetic_particles}"
        gen+=(--per_class 40)
        EPOCHS="${EPOCHS:-12}"; BATCH_SIZE=16; LINEAR_EPOCHS=10; KNN_K=(10 20)
    fi
    NUM_WORKERS="${NUM_WORKERS:-1}"
    # A 4-block vit_tiny; 4 frames of 64x64 (16 patches each) per global view, 2 local views of 32x32.
    ARCH=vit_tiny; OUT_DIM=512; LOCAL_CROPS=2
    model_opts=(DATA.NUM_FRAMES 4 DATA.SAMPLING_RATE 16 MODEL.DEPTH 4)
    ;;
gpu)
    DATA_PATH="${DATA_PATH:-$ROOT/data/synthetic_particles_gpu}"
    gen+=(--per_class 150)
    EPOCHS="${EPOCHS:-60}"; BATCH_SIZE=64; LINEAR_EPOCHS=20; KNN_K=(10 20)
    NUM_WORKERS="${NUM_WORKERS:-12}"
    # A full-depth vit_small; 8 frames 8 apart (less aliasing of the fast dots), 4 local views.
    ARCH=vit_small; OUT_DIM=4096; LOCAL_CROPS=4
    model_opts=(DATA.NUM_FRAMES 8 DATA.SAMPLING_RATE 8 MODEL.DEPTH 12)
    ;;
*)
    echo "DEMO_SCALE must be cpu or gpu, got '$DEMO_SCALE'" >&2; exit 2 ;;
esac
DEMO_OUT="${DEMO_OUT:-$ROOT/outputs/demo}"
SEED="${SEED:-0}"
LINEAR_LR=0.064

stamp "1/5 dependencies"
run env PYTHON="$PYTHON" bash scripts/install_deps.sh
source scripts/common.sh
lend_ffmpeg   # no system FFmpeg (no root for apt): torchcodec gets PyAV's
split_user_args "$@"

if [[ ! -f "$DATA_PATH/annotations/train.csv" ]]; then
    stamp "2/5 generating the synthetic motion videos in $DATA_PATH"
    run "$PYTHON" -m datasets.synthetic --out "$DATA_PATH" "${gen[@]}"
else
    stamp "2/5 using the videos in $DATA_PATH"
fi
run mkdir -p "$DEMO_OUT"

# Views: 64 px globals, 32 px locals; an eval clip spans the whole 64-frame video; 1 spatial crop.
data_opts=(DATA.PATH_PREFIX "$DATA_PATH/videos" "${model_opts[@]}" DATA.TRAIN_CROP_SIZE 64
           DATA.LOCAL_CROP_SIZE 32 DATA.TEST_CROP_SIZE 64 DATA.TRAIN_JITTER_SCALES "[64, 64]"
           TEST.NUM_SPATIAL_CROPS 1 MODEL.DROP_PATH_RATE 0.0)

# SVT's recipe at a CPU budget (120 steps of batch 16). Every video looks alike, so a random network's
# outputs barely differ between videos; BatchNorm in the head (DINO's --use_bn_in_head) and a sharper
# teacher (0.015; SVT 0.04) keep the targets apart, where the defaults collapse to a uniform output (the loss
# sits at ln(out_dim)); at 0.02 the targets still drift to near-uniform by the last epochs and the teacher ends
# no better than random init. Teacher momentum 0.99: its EMA time constant (100 steps) is close to the whole
# run. Centre momentum 0.95 (SVT 0.9): 0.99 with a teacher at 0.01 sent every clip to one prototype (a low
# loss, no learning); the log's train_target_mean_entropy shows which regime a run is in (docs/demo_notes.md).
stamp "3/5 SVT pretraining ($ARCH, $EPOCHS epochs, batch $BATCH_SIZE, online kNN every epoch) -> $DEMO_OUT/ssl"
run "$PYTHON" train_ssl.py --arch "$ARCH" --out_dim "$OUT_DIM" --seed "$SEED" --epochs "$EPOCHS" \
    --batch_size_per_gpu "$BATCH_SIZE" --lr 0.01 --warmup_epochs 2 --min_lr 1e-5 \
    --momentum_teacher 0.99 --center_momentum 0.95 --use_bn_in_head True --teacher_temp 0.015 --warmup_teacher_temp 0.015 \
    --freeze_last_layer 1 --local_crops_number "$LOCAL_CROPS" --use_fp16 True --amp_dtype auto \
    --num_workers "$NUM_WORKERS" --log_freq 5 \
    --knn_freq 1 --nb_knn "${KNN_K[0]}" --knn_data_path "$DATA_PATH/knn_splits" --knn_path_prefix "$DATA_PATH/videos" \
    --eval_batch_size_per_gpu 64 \
    --data_path "$DATA_PATH/annotations" --output_dir "$DEMO_OUT/ssl" \
    ${user_args[@]+"${user_args[@]}"} --opts "${data_opts[@]}" ${user_opts[@]+"${user_opts[@]}"}

# The probe's own recipe (eval_linear.py's default stays the paper's raw features at lr 0.001): the features
# standardised first (--feature_bn, MAE's linear probe; raw, they are dominated by a direction every video
# shares and SGD stays at chance), lr 0.064 at batch 256 for 10 epochs (docs/demo_notes.md), and no random
# flip (a flipped rotate_cw is a rotate_ccw, which no class is).
stamp "4/5 evaluation: kNN and linear probe ($LINEAR_EPOCHS epochs), SSL teacher vs random init"
for model in ssl random; do
    weights=()
    if [[ "$model" == ssl ]]; then weights=(--pretrained_weights "$DEMO_OUT/ssl/checkpoint.pth"); fi
    run "$PYTHON" eval_knn.py --arch "$ARCH" "${weights[@]}" --seed "$SEED" --nb_knn "${KNN_K[@]}" --dataset ucf101 \
        --batch_size_per_gpu 64 --num_workers "$NUM_WORKERS" --output_dir "$DEMO_OUT/knn_$model" \
        --opts "${data_opts[@]}" DATA.PATH_TO_DATA_DIR "$DATA_PATH/knn_splits" ${user_opts[@]+"${user_opts[@]}"}
    run "$PYTHON" eval_linear.py --arch "$ARCH" "${weights[@]}" --seed "$SEED" --epochs "$LINEAR_EPOCHS" --lr "$LINEAR_LR" \
        --feature_bn True --batch_size_per_gpu 16 --val_freq "$LINEAR_EPOCHS" --dataset ucf101 --num_workers "$NUM_WORKERS" \
        --output_dir "$DEMO_OUT/linear_$model" \
        --opts "${data_opts[@]}" DATA.PATH_TO_DATA_DIR "$DATA_PATH/splits" DATA.RANDOM_FLIP False \
        ${user_opts[@]+"${user_opts[@]}"}
done

stamp "5/5 report"
num_frames="${model_opts[1]}"; sampling_rate="${model_opts[3]}"
for ((i = 0; i + 1 < ${#user_opts[@]}; i += 2)); do
    case "${user_opts[i]}" in
        DATA.NUM_FRAMES) num_frames="${user_opts[i + 1]}" ;;
        DATA.SAMPLING_RATE) sampling_rate="${user_opts[i + 1]}" ;;
    esac
done
notes="{\"scale\": \"$DEMO_SCALE\", \"reduced\": $REDUCED, \"arch\": \"$ARCH\", \"out_dim\": $OUT_DIM, \"epochs\": $EPOCHS,"
notes+=" \"batch_size\": $BATCH_SIZE, \"linear_lr\": $LINEAR_LR, \"linear_feature_bn\": true, \"linear_epochs\": $LINEAR_EPOCHS, \"online_knn_k\": ${KNN_K[0]}}"
run "$PYTHON" scripts/demo_report.py --demo_out "$DEMO_OUT" --data_path "$DATA_PATH" --seed "$SEED" \
    --seconds "$(( $(date +%s) - start ))" --num_frames "$num_frames" --sampling_rate "$sampling_rate" \
    --image_size 64 --notes "$notes"
stamp "done"
