#!/usr/bin/env bash
# Install what svt needs into the active Python environment, but only what is missing.
# A torch that is already importable is kept (cluster users keep their CUDA build); when torch
# is missing, constraints.txt pins the versions we test with. Pass "test" to add pytest and pytest-xdist.
# torchcodec (the default decoder when it works): the release built for the torch there (torchcodec_for_torch.py),
# none for a torch older than 2.10. It needs FFmpeg's shared libraries: installed with apt
# when we are root and apt-get exists, otherwise one line says how; without them DATA.DECODING_BACKEND
# auto falls back to decord, then PyAV.
# `install_deps.sh --check` installs nothing: it exits 3 naming what is missing of the required packages
# (the launch scripts call it, so no pip runs on compute nodes at each job start). torchcodec and decord
# are optional there: DATA.DECODING_BACKEND auto uses whichever decoder imports.
# PYTHON: the interpreter whose environment is checked and installed into (default: python3).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"

required="torch torchvision timm numpy einops fvcore tensorboard av matplotlib"
optional="torchcodec"
if [[ "$(uname -m)" == "x86_64" ]]; then optional="$optional decord"; fi

missing_of() {
    "$PYTHON" -c 'import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))' "$@"
}

# old_torch: the installed torch's version when it is older than requirements.txt's minimum, else nothing
# (read from the package metadata: no torch import).
old_torch() {
    "$PYTHON" -c 'import re, sys
from importlib import metadata
try:
    need = re.search(r"^torch>=([\d.]+)", open(sys.argv[1]).read(), re.M).group(1)
except (OSError, AttributeError):  # no requirements.txt beside this script, or no torch line in it
    sys.exit()
try:
    have = metadata.version("torch")
except metadata.PackageNotFoundError:
    sys.exit()
key = lambda v: tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:2])
if key(have) < key(need):
    print(f"torch {have} is older than {need}, the oldest svt runs on (requirements.txt)")' \
        "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/../requirements.txt"
}

too_old=$(old_torch)
if [[ -n "$too_old" ]]; then
    echo "$(basename "${0}"): $too_old. Install a newer CUDA build of torch and torchvision in this environment" \
         "(https://pytorch.org/get-started/locally/); this script never replaces a torch you have." >&2
    exit 3
fi

if [[ "${1:-}" == "--check" ]]; then
    missing=$(missing_of $required)
    if [[ -n "$missing" ]]; then
        echo "$(basename "${0}"): missing Python packages: $missing. Install them once in this environment:" \
             "bash scripts/install_deps.sh (or pip install -r requirements.txt)." >&2
        exit 3
    fi
    exit 0
fi

if ! ldconfig -p 2>/dev/null | grep -q "libavcodec\.so"; then
    if [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null; then
        echo "[install_deps] installing FFmpeg's shared libraries for torchcodec (apt-get install -y ffmpeg)" >&2
        apt-get install -y -qq ffmpeg >/dev/null 2>&1 || { apt-get update -qq >/dev/null && apt-get install -y -qq ffmpeg >/dev/null; }
    else
        echo "[install_deps] FFmpeg libraries not found: torchcodec needs them (conda install -c conda-forge ffmpeg, or your package manager's ffmpeg). Until then the launch scripts lend torchcodec PyAV's bundled FFmpeg (scripts/common.sh lend_ffmpeg); a plain python run falls back to decord/PyAV." >&2
    fi
fi

# The torchcodec built for the torch there is (each release is built for one torch: scripts/torchcodec_for_torch.py);
# none for a torch older than 2.10: it is left out, and decoding falls back to decord, then PyAV.
codec=$("$PYTHON" "$ROOT/scripts/torchcodec_for_torch.py")
if [[ -z "$codec" ]]; then
    optional="${optional/torchcodec/}"
    echo "[install_deps] no torchcodec release svt can use (>= 0.10) is built for this torch (2.10 or newer needed):" \
         "torchcodec is not installed; DATA.DECODING_BACKEND auto decodes with decord, then PyAV." >&2
fi

modules="$required $optional"
if [[ "${1:-}" == "test" ]]; then modules="$modules pytest xdist"; fi
missing=$(missing_of $modules)
if [[ -z "$missing" ]]; then
    exit 0
fi
echo "[install_deps] missing: $missing -> installing requirements.txt" >&2
constraint=()
requirements="$ROOT/requirements.txt"
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    constraint=(-c "$ROOT/constraints.txt")
else  # requirements.txt with the torchcodec of this torch (pip would take the newest, built for another torch)
    requirements=$(mktemp)
    trap 'rm -f "$requirements"' EXIT
    grep -v '^torchcodec' "$ROOT/requirements.txt" > "$requirements"
    if [[ -n "$codec" ]]; then echo "$codec" >> "$requirements"; fi
fi
extra=()
if [[ " $missing " == *" pytest "* ]]; then extra=(pytest); fi
if [[ " $missing " == *" xdist "* ]]; then extra+=(pytest-xdist); fi
"$PYTHON" -m pip install --quiet --disable-pip-version-check -r "$requirements" "${constraint[@]}" "${extra[@]}"
