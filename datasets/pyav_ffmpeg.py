"""FFmpeg's shared libraries for torchcodec, lent by PyAV's wheel.

torchcodec loads FFmpeg's shared libraries by their usual names (libavcodec.so.62, ...) and finds none on a
node without a system FFmpeg (a cluster without root, a bare container): DATA.DECODING_BACKEND auto then
falls back to decord or PyAV, and DATA.DECODE_DEVICE cuda cannot run at all. PyAV's manylinux wheels carry a
whole FFmpeg (8.x, built with NVDEC) in site-packages/av.libs, under renamed files. `link_dir` makes a folder
of symbolic links with the usual names; with it and av.libs on LD_LIBRARY_PATH, torchcodec loads PyAV's
FFmpeg, the same files PyAV already uses. The dynamic loader reads LD_LIBRARY_PATH when a process starts, so
the launch scripts set it before Python runs (scripts/common.sh):

    python -m datasets.pyav_ffmpeg          # the LD_LIBRARY_PATH entries torchcodec needs here, or nothing
"""
import argparse
import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# libavcodec-5e6b81c2.so.62.28.102 -> (libavcodec, 62): auditwheel's renamed copies of FFmpeg's libraries
_RENAMED = re.compile(r"^(libavcodec|libavformat|libavutil|libavfilter|libavdevice|libswscale|libswresample)"
                      r"-[0-9a-f]+\.so\.(\d+)(\.\d+)*$")


def pyav_libs_dir() -> Path | None:
    """PyAV's bundled libraries (site-packages/av.libs), found without importing av; None when PyAV is not
    installed or carries no FFmpeg of its own (a conda or source build links the system's)."""
    spec = importlib.util.find_spec("av")
    if spec is None or not spec.submodule_search_locations:
        return None
    libs = Path(next(iter(spec.submodule_search_locations))).resolve().parent / "av.libs"
    return libs if libs.is_dir() else None


def ffmpeg_sonames(libs: Path) -> dict[str, Path]:
    """The usual file name of each FFmpeg library in `libs` ("libavcodec.so.62") -> the renamed file."""
    found = {}
    for path in sorted(libs.iterdir()):
        match = _RENAMED.match(path.name)
        if match:
            found[f"{match.group(1)}.so.{match.group(2)}"] = path
    return found


def link_dir(cache: Path, libs: Path) -> Path:
    """A folder under `cache` of links named as FFmpeg names its libraries, to PyAV's copies in `libs`.
    Its name is a digest of the files it points to, so another or an upgraded PyAV gets its own folder; it
    is made in a temporary folder and renamed into place, so jobs starting at once on a shared home folder
    never see a half-made one."""
    sonames = ffmpeg_sonames(libs)
    if not any(name.startswith("libavcodec.") for name in sonames):
        raise FileNotFoundError(f"{libs} holds no FFmpeg libraries")
    digest = hashlib.sha1("\n".join(str(path) for path in sonames.values()).encode()).hexdigest()[:12]
    target = cache / f"pyav-ffmpeg-{digest}"
    if target.is_dir():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".pyav-ffmpeg-", dir=cache))
    for name, path in sonames.items():
        (staging / name).symlink_to(path)
    try:
        staging.rename(target)
    except OSError:  # another job renamed its (identical) folder into place first
        for link in staging.iterdir():
            link.unlink()
        staging.rmdir()
    return target


def torchcodec_finds_ffmpeg(env: dict | None = None) -> bool | None:
    """Whether torchcodec loads an FFmpeg in a fresh process with environment `env`; None when torchcodec
    is not installed (nothing to lend it)."""
    if importlib.util.find_spec("torchcodec") is None:
        return None
    probe = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, timeout=120)
    return probe.returncode == 0


# Older torchcodec raises at import when it loads no FFmpeg; newer (0.16, 0.17) imports anyway, with
# _core.ops._FFMPEG_AVAILABLE False and its decoding ops raising when called: the probe reads that flag.
_PROBE = "import sys, torchcodec._core.ops as ops; sys.exit(0 if getattr(ops, '_FFMPEG_AVAILABLE', True) else 1)"


def ld_library_path(cache: Path) -> str:
    """The LD_LIBRARY_PATH entries that let torchcodec load PyAV's FFmpeg ("" when PyAV has none)."""
    libs = pyav_libs_dir()
    if libs is None or not ffmpeg_sonames(libs):
        return ""
    return f"{link_dir(cache, libs)}{os.pathsep}{libs}"


def needed_entries(cache: Path) -> str:
    """`ld_library_path(cache)` when torchcodec is installed, finds no FFmpeg now and loads one with it;
    else "" (nothing to do, or nothing that would help)."""
    if torchcodec_finds_ffmpeg() is not False:
        return ""
    entries = ld_library_path(cache)
    if not entries:
        return ""
    current = os.environ.get("LD_LIBRARY_PATH", "")
    env = {**os.environ, "LD_LIBRARY_PATH": entries + (os.pathsep + current if current else "")}
    return entries if torchcodec_finds_ffmpeg(env) else ""


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "svt"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=default_cache(), help="Where the folder of links is made.")
    p.add_argument("--always", action="store_true",
                   help="Print the entries even when torchcodec already finds an FFmpeg (its newest wins).")
    opt = p.parse_args(argv)
    print(ld_library_path(opt.cache) if opt.always else needed_entries(opt.cache))


if __name__ == "__main__":
    main()
