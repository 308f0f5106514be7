"""The torchcodec requirement that loads with the installed torch, for scripts/install_deps.sh: each torchcodec
release is built for one torch release (TorchCodec's README, "Installing TorchCodec"), and pip, which does not know
that, installs the newest torchcodec whatever the torch (0.17 does not load on torch 2.5).

    python scripts/torchcodec_for_torch.py [TORCH_VERSION]

prints the pip requirement (e.g. torchcodec==0.10.*), or nothing when no torchcodec svt can use is built for that
torch (requirements.txt asks for torchcodec >= 0.10, the first with custom_frame_mappings, built for torch 2.10): the
decoding then falls back to decord, then PyAV. TORCH_VERSION defaults to the installed torch's (its package
metadata: no torch import); without torch, requirements.txt's own (constraints.txt then pins the pair). A torch
newer than the table gets the newest torchcodec.
"""
import re
import sys
from importlib import metadata

# torch (major, minor) -> the newest torchcodec built for it: TorchCodec's README table (0.10: torch 2.10, 0.11:
# 2.11, 0.12: >= 2.11) and, for torch 2.14, constraints.txt (the pair svt is tested with).
TORCHCODEC_FOR_TORCH = {(2, 10): "0.10", (2, 11): "0.12", (2, 12): "0.12", (2, 13): "0.12", (2, 14): "0.17"}
OLDEST = "0.10"  # requirements.txt's torchcodec>=0.10


def minor(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as 2.5.1+cu124."""
    major, minor_, *_ = re.findall(r"\d+", version.split("+")[0])
    return int(major), int(minor_)


def requirement(torch_version: str) -> str:
    """The torchcodec requirement for `torch_version` ('' when none of the releases svt can use is built for it)."""
    key = minor(torch_version)
    if key in TORCHCODEC_FOR_TORCH:
        return f"torchcodec=={TORCHCODEC_FOR_TORCH[key]}.*"
    return f"torchcodec>={OLDEST}" if key > max(TORCHCODEC_FOR_TORCH) else ""


def installed_torch() -> str | None:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    version = sys.argv[1] if len(sys.argv) > 1 else installed_torch()
    print(requirement(version) if version else f"torchcodec>={OLDEST}")
