#!/usr/bin/env bash
# One device check of svt on a CUDA machine, as is, in under 8 minutes on one H100/H200: installs what is
# missing, then runs benchmarks/device_check.py: the GPU-only and cuda-capable tests, the ViT-B step (bf16,
# SDPA, fused AdamW, batch 8 and 16, eager and compiled), the data path (CPU workers per decoder, GPU decode,
# the step fed by each), a ~100-step train_ssl.py run + kNN, and the GPU demo when demo.sh has DEMO_SCALE.
# Every stage is time-boxed, inside one budget (--budget_s, 450 s) that starts here, the install included.
# Writes OUT/device_check.json and OUT/device_check.md (default OUT: device_check_out); --export DIR also
# writes those two and logs.tar.gz (every stage's log) to DIR, three files in all, rewritten at every stage.
#
#   bash benchmarks/device_check.sh [--wheels DIR] [--export DIR] [--out DIR] [--budget_s 450] [--only STAGE ...]
#                                   [--dry-run]
#
# Installing: with --wheels DIR (made by benchmarks/device_wheels.sh where pip can download), those wheels
# only, offline; then, if its torchcodec does not decode here (it loads no FFmpeg, or does not fit this torch),
# the one in DIR/fallback instead (which one is in use goes to the env stage's record). Else
# scripts/install_deps.sh when pip can reach an index; else nothing (recorded, not fatal). Where the system has
# no FFmpeg, torchcodec is lent PyAV's (scripts/common.sh lend_ffmpeg).
set -uo pipefail
started=$(date +%s.%N)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
wheels=""
args=()
while (( $# )); do
    if [[ "$1" == "--wheels" ]]; then wheels="$2"; shift 2; else args+=("$1"); shift; fi
done
install_rc=0
site="${TMPDIR:-/tmp}/svt_device_site"
pip_offline=("$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile
             --target "$site")
if [[ -n "$wheels" ]]; then
    install="wheels from $wheels ($(ls "$wheels"/*.whl 2>/dev/null | wc -l) files) into $site"
    rm -rf "$site"
    "${pip_offline[@]}" "$wheels"/*.whl || install_rc=$?
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
elif probe=$(mktemp -d) && timeout 30 "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps \
        --timeout 5 --retries 0 -d "$probe" six >/dev/null 2>&1; then
    install="scripts/install_deps.sh test (pip reaches an index)"
    # torchcodec (with FFmpeg's libraries) is what decodes on the GPU: install_deps.sh installs both
    PYTHON="$PYTHON" timeout 600 bash scripts/install_deps.sh test || install_rc=$?
else
    install="nothing: pip reaches no index here and no --wheels was given (see benchmarks/device_wheels.sh)"
fi
echo "[device_check] installed: $install (rc $install_rc)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
source scripts/common.sh
lend_ffmpeg
# torchcodec_check: one line, "torchcodec VERSION: decodes" or why not; fails when it does not decode
torchcodec_check() {
    local line
    line=$("$PYTHON" benchmarks/device_check.py --check_torchcodec 2>/dev/null | tail -1)
    local rc=$?
    echo "${line:-torchcodec: the check crashed}"
    return $rc
}
torchcodec_wheel="not checked (no --wheels)"
if [[ -n "$wheels" ]]; then
    if tc=$(torchcodec_check); then
        torchcodec_wheel="$tc"
    elif fallback=("$wheels"/fallback/torchcodec-*.whl) && [[ -f "${fallback[0]}" ]]; then
        rm -rf "$site"/torchcodec "$site"/torchcodec-*.dist-info "$site"/torchcodec.libs
        "${pip_offline[@]}" "${fallback[@]}" || install_rc=$?
        lend_ffmpeg  # the fallback may load the FFmpeg the first one could not use
        if tc2=$(torchcodec_check); then
            torchcodec_wheel="$tc2, from fallback/ (the main wheel's $tc)"
        else
            torchcodec_wheel="$tc2, from fallback/, does not decode either (the main wheel's $tc)"
        fi
    else
        torchcodec_wheel="$tc (no fallback/ wheel)"
    fi
    echo "[device_check] $torchcodec_wheel"
fi
export HF_HUB_OFFLINE=1
exec "$PYTHON" benchmarks/device_check.py --install "$install" --install_rc "$install_rc" --started "$started" \
    --torchcodec_wheel "$torchcodec_wheel" "${args[@]}"
