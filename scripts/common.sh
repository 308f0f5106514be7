# Shared by the launch scripts (sourced, not run).

# Python output reaches log files line by line (a killed job keeps its last lines).
export PYTHONUNBUFFERED=1

# check_deps: stop before launching when a required package is missing (scripts/install_deps.sh --check,
# which names the fix). Launches never install, so no pip runs on compute nodes at each job start. Then
# lend_ffmpeg.
check_deps() {
    PYTHON="${PYTHON:-python3}" bash "$(dirname "${BASH_SOURCE[0]}")/install_deps.sh" --check || exit $?
    lend_ffmpeg
}

# lend_ffmpeg: with no system FFmpeg, torchcodec (the default decoder, and the only one for DATA.DECODE_DEVICE
# cuda) loads none; PyAV's wheel carries one (8.x, with NVDEC). datasets/pyav_ffmpeg.py links it under FFmpeg's
# usual names and prints the LD_LIBRARY_PATH entries, which this launch (and its workers) then uses. A launch
# started by one that lent it (scripts/test.sh running the launch scripts) inherits them and checks nothing again.
lend_ffmpeg() {
    # a system FFmpeg 4-9 (libavcodec 58-63) is one torchcodec loads: nothing to lend
    if ldconfig -p 2>/dev/null | grep -qE "libavcodec\.so\.(5[89]|6[0-3])( |$)"; then return 0; fi
    local entries dirs dir link
    IFS=: read -r -a dirs <<< "${LD_LIBRARY_PATH:-}"
    for dir in ${dirs[@]+"${dirs[@]}"}; do  # pyav_ffmpeg.link_dir's folder of links: lent already
        if [[ "${dir##*/}" == pyav-ffmpeg-* ]]; then
            for link in "$dir"/libavcodec.so.*; do
                if [[ -e "$link" ]]; then return 0; fi
            done
        fi
    done
    entries=$("${PYTHON:-python3}" "$(dirname "${BASH_SOURCE[0]}")/../datasets/pyav_ffmpeg.py" 2>/dev/null) || return 0
    if [[ -n "$entries" ]]; then
        export LD_LIBRARY_PATH="$entries${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        echo "[svt] no system FFmpeg: torchcodec uses PyAV's bundled FFmpeg (LD_LIBRARY_PATH += $entries)" >&2
    fi
}

# recipe_defaults: the original's pretraining recipe (TimeSformer-B, 8 clips per process, 100 epochs, 10
# workers), each value overridable from the environment; sets train_args for train_ssl.py. Needs PROJECT_PATH.
recipe_defaults() {
    DATA_PATH="${DATA_PATH:-$PROJECT_PATH/data/kinetics400/annotations}"
    EXP_NAME="${EXP_NAME:-svt_test}"
    BATCH_SIZE="${BATCH_SIZE:-8}"
    EPOCHS="${EPOCHS:-100}"
    NUM_WORKERS="${NUM_WORKERS:-10}"
    train_args=(--arch timesformer --batch_size_per_gpu "$BATCH_SIZE" --epochs "$EPOCHS" --num_workers "$NUM_WORKERS"
                --data_path "$DATA_PATH" --output_dir "checkpoints/$EXP_NAME")
}

# eval_defaults EXP_NAME: the evaluation scripts' environment (UCF-101 split 1 under data/ucf101, 1 GPU,
# outputs named EXP_NAME unless set); CHECKPOINT is required.
eval_defaults() {
    DATA_PATH="${DATA_PATH:-data/ucf101}"
    DATASET="${DATASET:-ucf101}"
    EXP_NAME="${EXP_NAME:-$1}"
    GPUS="${GPUS:-1}"
    : "${CHECKPOINT:?set CHECKPOINT to the checkpoint to evaluate}"
}

# dataset_defaults: what DATASET implies: DEFAULT_LABELS, its class count (101 UCF-101, 51 HMDB-51, 400
# Kinetics-400, 174 SSv2), and the folders under DATA_PATH its lists and videos are usually in, LISTS (splits;
# Kinetics and SSv2: annotations) and VIDEOS (videos; SSv2: frames). Another DATASET stops the launch.
dataset_defaults() {
    LISTS=splits
    VIDEOS=videos
    case "$DATASET" in
        ucf101) DEFAULT_LABELS=101 ;;
        hmdb51) DEFAULT_LABELS=51 ;;
        kinetics400|kinetics) DEFAULT_LABELS=400; LISTS=annotations ;;
        ssv2) DEFAULT_LABELS=174; LISTS=annotations; VIDEOS=frames ;;
        *) echo "unknown DATASET=$DATASET (ucf101, hmdb51, kinetics400, ssv2)" >&2; exit 2 ;;
    esac
}

# one_node_rendezvous: the rendezvous arguments of a one-node torch.distributed.run launch, in `rendezvous`: at
# MASTER_PORT when it is set (scripts/slurm_eval.sh sets one from the job id), else --standalone, which takes a free
# port of its own, so launches side by side on one machine (one evaluation per GPU) do not collide on a fixed port.
one_node_rendezvous() {
    if [[ -n "${MASTER_PORT:-}" ]]; then
        rendezvous=(--master_port="$MASTER_PORT")
    else
        rendezvous=(--standalone --nnodes=1)
    fi
}

# split_user_args ARGS...: user_args = the arguments before a `--opts`, user_opts = the KEY VALUE pairs
# after it, so a script can put its own options first and the user's `--opts` last (where argparse needs it).
split_user_args() {
    user_args=()
    user_opts=()
    local in_opts=0 arg
    for arg in "$@"; do
        if [[ "$arg" == "--opts" ]]; then in_opts=1; continue; fi
        if (( in_opts )); then user_opts+=("$arg"); else user_args+=("$arg"); fi
    done
}

# require_train_csv DEFAULT_DIR: stop before launching when the train list is not where the run will look
# (a --data_path among user_args wins over DEFAULT_DIR, as it does in train_ssl.py).
require_train_csv() {
    local data_dir="$1" i
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
}

# require_eval_inputs LIST_DIR: stop before launching an evaluation when CHECKPOINT is set but not a file or the list
# folder does not exist, naming the variables that set them. A --pretrained_weights among user_args, or a
# DATA.PATH_TO_DATA_DIR among user_opts / EXTRA_OPTS, replaces the script's own: the program checks it.
require_eval_inputs() {
    local list_dir="$1" script
    script="$(basename "$0")"
    if [[ -n "${CHECKPOINT:-}" && ! -f "$CHECKPOINT" ]] \
        && ! has_arg --pretrained_weights ${user_args[@]+"${user_args[@]}"}; then
        echo "$script: CHECKPOINT=$CHECKPOINT is not a file. Set CHECKPOINT to a train_ssl.py checkpoint.pth or" \
             "the released kinetics400_vitb_ssl.pth." >&2
        exit 2
    fi
    # shellcheck disable=SC2086  # EXTRA_OPTS is KEY VALUE words
    if [[ ! -d "$list_dir" ]] && ! has_arg DATA.PATH_TO_DATA_DIR ${user_opts[@]+"${user_opts[@]}"} ${EXTRA_OPTS:-}; then
        echo "$script: list folder $list_dir not found. DATA_PATH is the dataset root (e.g. DATA_PATH=/data/ucf101" \
             "holding splits/, knn_splits/ and videos/); LIST_DIR names the folder of the list files itself (e.g." \
             "LIST_DIR=/data/k400/annotations for Kinetics' train.csv and val.csv) and VIDEO_DIR the folder their" \
             "paths are joined to (SSv2: the folder of the extracted JPEG frames, not of the .webm videos)." >&2
        exit 2
    fi
}

# has_arg NAME ARGS...: whether ARGS hold NAME or NAME=...
has_arg() {
    local name="$1" arg
    shift
    for arg in "$@"; do
        if [[ "$arg" == "$name" || "$arg" == "$name="* ]]; then return 0; fi
    done
    return 1
}

# run_requeueable SIGNAL COMMAND...: a SLURM batch job's launch (`#SBATCH --signal=B:USR1@120 --requeue`): runs
# COMMAND in the background and passes the warning this shell gets (USR1) on to it as SIGNAL (srun: USR1, which it
# sends to every task; torchrun: TERM, which it sends to its workers). The programs finish their step, write their
# checkpoint and exit with status 3; the job then requeues itself (scontrol requeue: same job id, log appended) and
# resumes there. With REQUEUE=0, or where the cluster refuses, it exits with 3: submit it again. Exits with
# COMMAND's status otherwise.
run_requeueable() {
    local forward="$1" status=0
    shift
    local preempted=3  # the entry points' exit status after a stop signal (utils/preemption.py)
    _stop_signalled=0
    _stop_pid=
    # passed on once: a second warning (a user's `scancel --signal=USR1` besides SLURM's) would cut torchrun's
    # shutdown wait short, and the processes would be killed before their checkpoint is written
    trap 'if [ "$_stop_signalled" -eq 0 ]; then _stop_signalled=1
              [ -n "$_stop_pid" ] && kill -'"$forward"' "$_stop_pid" 2>/dev/null || true; fi' USR1
    "$@" &
    _stop_pid=$!
    # the warning came before the pid was known
    if [ "$_stop_signalled" -eq 1 ]; then kill -"$forward" "$_stop_pid" 2>/dev/null || true; fi
    while kill -0 "$_stop_pid" 2>/dev/null; do  # `wait` returns early when a trapped signal arrives
        wait "$_stop_pid" || true
    done
    wait "$_stop_pid" || status=$?  # COMMAND's own exit status
    # After a stop the first process to exit may make the launcher end the others (srun --kill-on-bad-exit, torchrun
    # exits 1 after a forwarded TERM): a signalled run that did not end cleanly is a stop too (the checkpoint is
    # written before any process exits).
    if [ "$status" -eq "$preempted" ] || { [ "$_stop_signalled" -eq 1 ] && [ "$status" -ne 0 ]; }; then
        if [ "${REQUEUE:-1}" = 1 ] && [ -n "${SLURM_JOB_ID:-}" ] && scontrol requeue "$SLURM_JOB_ID"; then
            echo "Stopped on a signal with its checkpoint written (see above); job $SLURM_JOB_ID requeued: it resumes" \
                 "there."
        else
            echo "Stopped on a signal with its checkpoint written (see above); not requeued (REQUEUE=${REQUEUE:-1}" \
                 "or the cluster refuses): submit the same command again to resume." >&2
        fi
        exit "$preempted"
    fi
    exit "$status"
}
