#!/usr/bin/env bash
# One device check of svt on a CUDA machine, as is, in under 8 minutes on one H100/H200: installs what is
# missing, then runs benchmarks/device_check.py: the GPU-only and cuda-capable tests, the ViT-B step (bf16,
# SDPA, fused AdamW, batch 8 and 16, eager and compiled), the data path (CPU workers per decoder, GPU decode),
# a ~100-step train_ssl.py run + kNN, and the GPU demo when demo.sh has DEMO_SCALE. Every stage is time-boxed.
# Writes OUT/device_check.json and OUT/device_check.md (default OUT: device_check_out); --export DIR also
# writes those two and logs.tar.gz (every stage's log) to DIR, three files in all.
#
#   bash benchmarks/device_check.sh [--wheels DIR] [--export DIR] [--out DIR] [--budget_s 450] [--only STAGE ...]
#                                   [--dry-run]
#
# Installing: with --wheels DIR (made by benchmarks/device_wheels.sh where pip can download), those wheels
# only, offline; else scripts/install_deps.sh when pip can reach an index; else nothing (recorded, not fatal).
# Where the system has no FFmpeg, torchcodec is lent PyAV's (scripts/common.sh lend_ffmpeg).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
wheels=""
args=()
while (( $# )); do
    if [[ "$1" == "--wheels" ]]; then wheels="$2"; shift 2; else args+=("$1"); shift; fi
done
install_rc=0
if [[ -n "$wheels" ]]; then
    site="${TMPDIR:-/tmp}/svt_device_site"
    install="wheels from $wheels ($(ls "$wheels"/*.whl 2>/dev/null | wc -l) files) into $site"
    rm -rf "$site"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile \
        --target "$site" "$wheels"/*.whl || install_rc=$?
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
source scripts/common.sh
lend_ffmpeg
export HF_HUB_OFFLINE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" benchmarks/device_check.py --install "$install" --install_rc "$install_rc" "${args[@]}"
