"""The torchcodec requirement that loads with the installed torch, for scripts/install_deps.sh: pip does not know
which torch a torchcodec release is built for, and installs the newest whatever the torch (0.17 does not load on
torch 2.5).

    python scripts/torchcodec_for_torch.py [TORCH_VERSION]

prints the pip requirement, from TorchCodec's README table ("Compatibility with torch versions"): 0.10 is built for
torch 2.10, 0.11 for 2.11, and every release from 0.12 on for any torch >= 2.11 (the newest is taken). It prints
nothing for a torch older than 2.10: requirements.txt asks for torchcodec >= 0.10 (the first with
custom_frame_mappings), and decoding then falls back to decord, then PyAV. TORCH_VERSION defaults to the installed
torch's (its package metadata: no torch import); without torch, requirements.txt's own (constraints.txt then pins
the pair).
"""
import re
import sys
from importlib import metadata

OLDEST = "0.10"  # requirements.txt's torchcodec>=0.10, built for torch 2.10


def minor(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as 2.5.1+cu124."""
    major, minor_, *_ = re.findall(r"\d+", version.split("+")[0])
    return int(major), int(minor_)


def requirement(torch_version: str) -> str:
    """The torchcodec requirement for `torch_version` ('' when none of the releases svt can use is built for it)."""
    key = minor(torch_version)
    if key < (2, 10):
        return ""
    return f"torchcodec=={OLDEST}.*" if key == (2, 10) else "torchcodec>=0.12"


def installed_torch() -> str | None:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    version = sys.argv[1] if len(sys.argv) > 1 else installed_torch()
    print(requirement(version) if version else f"torchcodec>={OLDEST}")
