#!/usr/bin/env bash
# Run the test suite on CPU: installs what is missing, then pytest. Extra args go to pytest,
# e.g. `./scripts/test.sh -k model -x`. PYTHON: the interpreter (default: python3).
# TEST_WORKERS: pytest-xdist processes (default 2: each test runs one intra-op thread, so two processes use two
# cores and halve the suite's time); 0 runs the tests in this process (for -s or --pdb).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/install_deps.sh test
source scripts/common.sh
lend_ffmpeg   # no system FFmpeg (no root for apt): torchcodec's tests run on PyAV's
export HF_HUB_OFFLINE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m pytest -n "${TEST_WORKERS:-2}" "$@"
