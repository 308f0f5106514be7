#!/usr/bin/env bash
# SVT end to end on a CPU in minutes: install what is missing, generate the synthetic motion videos,
# pretrain a small TimeSformer with SVT (train_ssl.py, the same code path as a GPU run), then kNN and a
# short linear probe of the SSL teacher and of a randomly initialised backbone of the same size, and a
# table of the four top-1 accuracies (also in $DEMO_OUT/results.json).
#
#   DEMO_OUT     outputs (checkpoint, log.txt, tb/, eval folders, results.json)  (default: outputs/demo)
#   DATA_PATH    dataset root with annotations/train.csv, knn_splits/ and splits/ (UCF-101 list names)
#                and videos/, the layout of datasets/synthetic.py  (default: data/synthetic_particles, generated
#                when missing; data/synthetic_particles_quick with REDUCED=1)
#   SEED         seed of training and of the random-init baseline                     (default: 0)
#   EPOCHS       SSL epochs                                          (default: 12; REDUCED=1: 2)
#   BATCH_SIZE   clips per step                                      (default: 16; REDUCED=1: 8)
#   REDUCED      1: a quick smoke run (fewer videos, epochs and probe epochs; same code path)
#   NUM_WORKERS  data-loading workers                                (default: 1)
#   PYTHON       interpreter                                         (default: python3)
# Extra arguments go to train_ssl.py (an `--opts KEY VALUE ...` of yours must come last).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
REDUCED="${REDUCED:-0}"
start=$(date +%s)
stamp() { echo "[demo $(( $(date +%s) - start ))s] $*"; }

stamp "1/4 dependencies"
PYTHON="$PYTHON" bash scripts/install_deps.sh

if [[ "$REDUCED" == 1 ]]; then
    DATA_PATH="${DATA_PATH:-$ROOT/data/synthetic_particles_quick}"
    gen=(--classes 3 --per_class 6)
    EPOCHS="${EPOCHS:-2}"; BATCH_SIZE="${BATCH_SIZE:-8}"; LINEAR_EPOCHS=2; KNN_K=(5 10)
else
    DATA_PATH="${DATA_PATH:-$ROOT/data/synthetic_particles}"
    gen=(--per_class 40)
    EPOCHS="${EPOCHS:-12}"; BATCH_SIZE="${BATCH_SIZE:-16}"; LINEAR_EPOCHS=5; KNN_K=(10 20)
fi
DEMO_OUT="${DEMO_OUT:-$ROOT/outputs/demo}"
SEED="${SEED:-0}"
NUM_WORKERS="${NUM_WORKERS:-1}"
mkdir -p "$DEMO_OUT"

if [[ ! -f "$DATA_PATH/annotations/train.csv" ]]; then
    stamp "2/4 generating the synthetic motion videos in $DATA_PATH"
    # Fields of dots doing the 6 motions of datasets.synthetic.FLIP_DISTINCT (SVT's views are flipped, so
    # mirror-image classes such as move_left / move_right would be indistinguishable to the
    # self-supervision); every video looks the same but for its motion.
    "$PYTHON" -m datasets.synthetic --out "$DATA_PATH" --scene particles --motions move_right move_up \
        move_down rotate_cw zoom_in zoom_out --frames 64 --size 64 "${gen[@]}"
else
    stamp "2/4 using the videos in $DATA_PATH"
fi

# 4 frames of 64x64 (16 patches each) per global view, 2 local views of 32x32; the clip of an eval
# covers the 64-frame video (4 frames x sampling rate 16). A 4-block vit_tiny (MODEL.DEPTH 4).
data_opts=(DATA.PATH_PREFIX "$DATA_PATH/videos" DATA.NUM_FRAMES 4 DATA.SAMPLING_RATE 16
           DATA.TRAIN_CROP_SIZE 64 DATA.LOCAL_CROP_SIZE 32 DATA.TEST_CROP_SIZE 64
           DATA.TRAIN_JITTER_SCALES "[64, 64]" TEST.NUM_SPATIAL_CROPS 1 MODEL.DROP_PATH_RATE 0.0 MODEL.DEPTH 4)

# SVT's recipe at a CPU budget (120 steps of batch 16). Every video looks alike, so a random
# network's outputs barely differ between videos; BatchNorm in the head (DINO's --use_bn_in_head)
# and a sharper teacher (0.01) keep the targets apart, where the defaults collapse to a uniform output
# (the loss sits at ln(out_dim) = 6.24).
stamp "3/4 SVT pretraining (4-block vit_tiny TimeSformer, $EPOCHS epochs, batch $BATCH_SIZE) -> $DEMO_OUT/ssl"
"$PYTHON" train_ssl.py --arch vit_tiny --out_dim 512 --seed "$SEED" --epochs "$EPOCHS" \
    --batch_size_per_gpu "$BATCH_SIZE" --lr 0.01 --warmup_epochs 2 --min_lr 1e-5 \
    --momentum_teacher 0.99 --use_bn_in_head True --teacher_temp 0.01 --warmup_teacher_temp 0.01 \
    --freeze_last_layer 1 \
    --local_crops_number 2 --use_fp16 True --amp_dtype bf16 --num_workers "$NUM_WORKERS" --log_freq 5 \
    --data_path "$DATA_PATH/annotations" --output_dir "$DEMO_OUT/ssl" "$@" --opts "${data_opts[@]}"

stamp "4/4 evaluation: kNN and linear probe, SSL teacher vs random init"
for model in ssl random; do
    weights=()
    if [[ "$model" == ssl ]]; then weights=(--pretrained_weights "$DEMO_OUT/ssl/checkpoint.pth"); fi
    "$PYTHON" eval_knn.py --arch vit_tiny "${weights[@]}" --seed "$SEED" --nb_knn "${KNN_K[@]}" --dataset ucf101 \
        --batch_size_per_gpu 16 --num_workers "$NUM_WORKERS" --output_dir "$DEMO_OUT/knn_$model" \
        --opts "${data_opts[@]}" DATA.PATH_TO_DATA_DIR "$DATA_PATH/knn_splits"
    "$PYTHON" eval_linear.py --arch vit_tiny "${weights[@]}" --seed "$SEED" --epochs "$LINEAR_EPOCHS" --lr 0.001 \
        --batch_size_per_gpu 16 --val_freq "$LINEAR_EPOCHS" --dataset ucf101 --num_workers "$NUM_WORKERS" \
        --output_dir "$DEMO_OUT/linear_$model" --opts "${data_opts[@]}" DATA.PATH_TO_DATA_DIR "$DATA_PATH/splits"
done

"$PYTHON" - "$DEMO_OUT" "$SEED" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
out, seed, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rows = {}
for model in ("ssl", "random"):
    knn = json.load(open(f"{out}/knn_{model}/knn_results.json"))["results"]
    linear = json.load(open(f"{out}/linear_{model}/linear_results.json"))
    rows[model] = {"knn_top1": {k: v["top1"] for k, v in knn.items()}, "linear_top1": linear["multiview_acc1"]}
ks = list(rows["ssl"]["knn_top1"])
results = {"seed": seed, "wall_seconds": seconds, **rows,
           "knn_gain": rows["ssl"]["knn_top1"][ks[0]] - rows["random"]["knn_top1"][ks[0]]}
json.dump(results, open(f"{out}/results.json", "w"), indent=2)
head = "model        " + "".join(f"kNN top-1 (k={k})  " for k in ks) + "linear top-1"
print("\n" + head + "\n" + "-" * len(head))
for model, name in (("ssl", "SVT (SSL)"), ("random", "random init")):
    r = rows[model]
    print(f"{name:<13}" + "".join(f"{r['knn_top1'][k]:>16.1f}  " for k in ks) + f"{r['linear_top1']:>12.1f}")
print(f"\nseed {seed}, {seconds} s in all; results in {out}/results.json")
PY
