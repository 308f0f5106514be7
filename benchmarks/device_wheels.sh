#!/usr/bin/env bash
# Wheels for a GPU machine that cannot reach a package index: what svt needs beyond an image that already has
# torch, torchvision, timm, numpy, einops, tensorboard, matplotlib and pytest (an NGC-style image). Run it where
# pip can download, then carry the folder along; benchmarks/device_check.sh installs it with --wheels, never
# touching the network:
#
#   bash benchmarks/device_wheels.sh [--python 3.12] [--torchcodec 0.16.0] [--out .whl]
#   bash benchmarks/device_check.sh --wheels .whl ...          # on the GPU machine
#
# --torchcodec must match the torch there: 0.11 <-> torch 2.11 only, 0.12-0.16 <-> torch >= 2.11 (torchcodec's
# table). Linux torchcodec wheels from PyPI are CUDA builds (NVDEC), and FFmpeg comes from PyAV's wheel
# (datasets/pyav_ffmpeg.py), so the folder holds everything the decoders need: about 60 MB.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
py=3.12
torchcodec=0.16.0
out="$ROOT/.whl"
while (( $# )); do
    case "$1" in
        --python) py="$2"; shift 2 ;;
        --torchcodec) torchcodec="$2"; shift 2 ;;
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
# binary wheels for the target Python: the decoders, and what fvcore needs that such an image lacks
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    "${platforms[@]}" -d "$out" av==18.1.0 "torchcodec==$torchcodec" decord==0.6.0 iopath==0.1.9 yacs==0.1.8 \
    termcolor==3.3.0
# fvcore (FLOP counts of the benchmarks, the config system) is published as source only: build its pure-Python wheel
"$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation -w "$out" fvcore==0.1.5.post20221221
bytes=$(du -cb "$out"/*.whl | tail -1 | cut -f1)
ls -1 "$out"
echo "device_wheels.sh: $(ls "$out"/*.whl | wc -l) wheels, $(( bytes / 1048576 )) MiB in $out (Python $py)"
if (( bytes > 62 * 1048576 )); then
    echo "device_wheels.sh: over 62 MiB: a device run carries at most 64 MiB with the working tree" >&2
    exit 1
fi
