# Shared by the training launch scripts (sourced, not run).

# The --opts the original's train.sh passes: its experimental branches, all off.
ORIGINAL_OPTS=(MODEL.TWO_STREAM False MODEL.TWO_TOKEN False DATA.NO_FLOW_AUG False DATA.USE_FLOW False
               DATA.RAND_CONV False DATA.NO_SPATIAL False)

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
