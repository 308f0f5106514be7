"""What this machine gives svt: Python and package versions, the GPU, driver and NCCL, the precision
`--amp_dtype auto` picks, and each decoder with the FFmpeg it loads and what DATA.DECODING_BACKEND auto
chooses. Paste its output into a bug report (benchmarks/device_check.py records the same).

    python -m utils.collect_env
"""
import ctypes
import importlib.util
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

from datasets import decoder, pyav_ffmpeg
from utils.utils import choose_precision, cpu_has_native_bf16, default_device


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows of it."""
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "missing"


def decoder_versions() -> dict:
    """Versions of the decoders and of the FFmpeg each one uses ("missing (why)" for one that fails)."""
    found = {}
    try:
        import av
        found["av"] = f"{av.__version__} (FFmpeg {av.ffmpeg_version_info})"
    except ImportError as err:
        found["av"] = f"missing ({err})"
    try:
        import torchcodec
        from torchcodec._core import get_ffmpeg_library_versions
        found["torchcodec"] = f"{torchcodec.__version__} (FFmpeg {get_ffmpeg_library_versions()['ffmpeg_version']})"
    except Exception as err:  # ImportError, or no FFmpeg it can load
        found["torchcodec"] = f"missing ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    try:
        import decord
        found["decord"] = decord.__version__
    except Exception as err:
        found["decord"] = f"missing ({err})"
    return found


def gpu_info() -> dict:
    """The GPUs torch sees, the driver, NCCL, and whether NVDEC's driver library loads."""
    if not torch.cuda.is_available():
        return {"gpu": "none (torch.cuda.is_available() is False)"}
    props = torch.cuda.get_device_properties(0)
    info = {"gpu": f"{torch.cuda.device_count()} x {props.name}, {props.total_memory / 2 ** 30:.1f} GiB, "
                   f"compute capability {props.major}.{props.minor}",
            "nccl": ".".join(map(str, torch.cuda.nccl.version()))}
    try:  # NVDEC's user-space library comes with the driver (a container needs the 'video' capability)
        ctypes.CDLL("libnvcuvid.so.1")
        info["nvcuvid"] = "loads"
    except OSError as err:
        info["nvcuvid"] = f"missing ({err})"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        info["driver"] = smi.stdout.strip().splitlines()[0] if smi.stdout.strip() else smi.stderr.strip()[-200:]
    except (OSError, subprocess.TimeoutExpired) as err:
        info["driver"] = f"nvidia-smi: {err}"
    return info


def collect_env() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu_name(),
            "cpu_count": os.cpu_count(), "cpu_native_bf16": cpu_has_native_bf16(),
            "torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    info.update({name: _version(name) for name in ("torchvision", "timm", "numpy", "einops", "fvcore")})
    info.update(gpu_info())
    precision, why = choose_precision(True, "auto", default_device())
    info["amp_dtype_auto"] = f"{precision} ({why})"
    info.update(decoder_versions())
    chosen = decoder.resolve_backend("auto")
    reasons = {"torchcodec": decoder.torchcodec_status(), "decord": decoder.decord_status()}
    info["decoding_backend_auto"] = chosen + "".join(f"; {b} unavailable: {why}" for b, why in reasons.items() if why)
    if reasons["torchcodec"] and importlib.util.find_spec("torchcodec") and pyav_ffmpeg.pyav_libs_dir():
        info["torchcodec_hint"] = ("no FFmpeg for torchcodec: the launch scripts lend it PyAV's; for a plain python "
                                   "run: export LD_LIBRARY_PATH=$(python datasets/pyav_ffmpeg.py --always):"
                                   "$LD_LIBRARY_PATH")
    info["ld_library_path"] = os.environ.get("LD_LIBRARY_PATH", "")
    return info


def main() -> None:
    for key, value in collect_env().items():
        print(f"{key + ':':24s}{value}")


if __name__ == "__main__":
    sys.exit(main())
