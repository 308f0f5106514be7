#!/usr/bin/env bash
# One device check of svt on a CUDA machine, as is, in under 8 minutes on one H100/H200: installs what is
# missing (scripts/install_deps.sh; a failure is recorded, not fatal), then runs benchmarks/device_check.py:
# the GPU-only and cuda-capable tests, the ViT-B step (bf16, SDPA, fused AdamW, batch 8 and 16, eager and
# compiled), the data path (CPU workers per decoder, GPU decode), a ~100-step train_ssl.py run + kNN, and
# the GPU demo when demo.sh has DEMO_SCALE. Every stage is time-boxed. Writes OUT/device_check.json and
# OUT/device_check.md (default OUT: device_check_out).
#
#   bash benchmarks/device_check.sh [--out DIR] [--budget_s 450] [--only STAGE ...] [--dry-run]
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
install_rc=0
# torchcodec (with FFmpeg's libraries) is what decodes on the GPU: install_deps.sh installs both
PYTHON="$PYTHON" timeout 600 bash scripts/install_deps.sh test || install_rc=$?
export HF_HUB_OFFLINE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" benchmarks/device_check.py --install_rc "$install_rc" "$@"
