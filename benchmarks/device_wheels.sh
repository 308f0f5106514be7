#!/usr/bin/env bash
# Wheels for a GPU machine that cannot reach a package index: what svt needs beyond an image that already has
# torch, torchvision, timm, numpy, einops, tensorboard, matplotlib and pytest (an NGC-style image). Run it where
# pip can download, then carry the folder along; benchmarks/device_check.sh installs it with --wheels, never
# touching the network:
#
#   bash benchmarks/device_wheels.sh [--python 3.12] [--torchcodec 0.17.0] [--fallback 0.16.0|none] [--decord]
#                                    [--out .whl]
#   bash benchmarks/device_check.sh --wheels .whl ...          # on the GPU machine
#
# --torchcodec must match the torch there (torchcodec's table: 0.11 <-> torch 2.11 only; 0.12-0.16 <-> torch
# >= 2.11, built against torch's stable ABI; 0.17, not yet in its table, targets torch 2.11 as 0.16 does).
# --fallback puts a second torchcodec in OUT/fallback/: device_check.sh installs it instead when the first does
# not decode there. Linux torchcodec wheels from PyPI are CUDA builds (NVDEC), and FFmpeg comes from PyAV's
# wheel (datasets/pyav_ffmpeg.py), so the folder holds everything the decoders need. A device run carries at
# most 64 MiB with the working tree: PyAV (34 MiB) and two torchcodecs (9.5 MiB each) leave no room for decord
# (13 MiB), so decord comes only with --decord, and then without a fallback (--fallback none): about 57 MiB.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
py=3.12
torchcodec=0.17.0
fallback=0.16.0
decord=()
out="$ROOT/.whl"
while (( $# )); do
    case "$1" in
        --python) py="$2"; shift 2 ;;
        --torchcodec) torchcodec="$2"; shift 2 ;;
        --fallback) fallback="$2"; shift 2 ;;
        --decord) decord=(decord==0.6.0); shift ;;
        --out) out="$2"; shift 2 ;;
        *) echo "device_wheels.sh: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done
rm -rf "$out"
mkdir -p "$out"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux2010_x86_64 \
         manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
download=("$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$py" --implementation cp
          "${platforms[@]}")
# binary wheels for the target Python: the decoders, and what fvcore needs that such an image lacks
"${download[@]}" -d "$out" av==18.1.0 "torchcodec==$torchcodec" "${decord[@]}" iopath==0.1.9 yacs==0.1.8 \
    termcolor==3.3.0
if [[ "$fallback" != none ]]; then
    "${download[@]}" -d "$out/fallback" "torchcodec==$fallback"
fi
# fvcore (FLOP counts of the benchmarks, the config system) is published as source only: build its pure-Python wheel
"$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation -w "$out" fvcore==0.1.5.post20221221
bytes=$(find "$out" -name '*.whl' -printf '%s\n' | awk '{ s += $1 } END { print s }')
(cd "$out" && find . -name '*.whl' | sort)
echo "device_wheels.sh: $(find "$out" -name '*.whl' | wc -l) wheels, $(( bytes / 1048576 )) MiB in $out (Python $py)"
if (( bytes > 62 * 1048576 )); then
    echo "device_wheels.sh: over 62 MiB: a device run carries at most 64 MiB with the working tree" >&2
    exit 1
fi
