"""torchcodec on PyAV's FFmpeg (datasets/pyav_ffmpeg.py): the links, the LD_LIBRARY_PATH they need, and a
frame-exact decode by torchcodec through them in a fresh process."""
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import av
import pytest

from datasets import pyav_ffmpeg
from tests.frame_code import code_frame, encode_frames

ROOT = Path(__file__).resolve().parents[1]
LIBS = pyav_ffmpeg.pyav_libs_dir()
needs_wheel_ffmpeg = pytest.mark.skipif(LIBS is None, reason="this PyAV carries no FFmpeg of its own (conda/source)")


@needs_wheel_ffmpeg
def test_sonames_are_pyavs_ffmpeg_versions():
    sonames = pyav_ffmpeg.ffmpeg_sonames(LIBS)
    expected = {f"{lib}.so.{version[0]}" for lib, version in av.library_versions.items()}
    assert set(sonames) == expected
    for name, path in sonames.items():
        assert path.parent == LIBS and path.name.startswith(name.split(".so.")[0] + "-")


@needs_wheel_ffmpeg
def test_link_dir_is_made_once_and_points_at_pyavs_files(tmp_path):
    first = pyav_ffmpeg.link_dir(tmp_path, LIBS)
    again = pyav_ffmpeg.link_dir(tmp_path, LIBS)
    assert first == again and first.parent == tmp_path
    links = {link.name: link.resolve() for link in first.iterdir()}
    assert links == pyav_ffmpeg.ffmpeg_sonames(LIBS)
    assert [p.name for p in tmp_path.iterdir()] == [first.name]       # no staging folder left behind


def test_link_dir_refuses_a_folder_without_ffmpeg(tmp_path):
    (tmp_path / "libs").mkdir()
    (tmp_path / "libs" / "libx264-d6533a8d.so.165").touch()
    with pytest.raises(FileNotFoundError, match="holds no FFmpeg libraries"):
        pyav_ffmpeg.link_dir(tmp_path / "cache", tmp_path / "libs")


@pytest.mark.parametrize("ops, finds", [
    ("_FFMPEG_AVAILABLE = True", True),
    ("_FFMPEG_AVAILABLE = False", False),  # torchcodec 0.16 / 0.17 without FFmpeg: the import works, decoding not
    ("", True),  # an older torchcodec without the flag: imported means loaded
    ("raise RuntimeError('Could not load libtorchcodec')", False),  # an older one without FFmpeg
])
def test_torchcodec_probe_reads_whether_ffmpeg_loaded(tmp_path, monkeypatch, ops, finds):
    core = tmp_path / "torchcodec" / "_core"
    core.mkdir(parents=True)
    (tmp_path / "torchcodec" / "__init__.py").write_text("")
    (core / "__init__.py").write_text("")
    (core / "ops.py").write_text(ops + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # installed here too (torch < 2.10 gets no torchcodec): probed, not None
    assert pyav_ffmpeg.torchcodec_finds_ffmpeg({**os.environ, "PYTHONPATH": str(tmp_path)}) is finds


def test_needed_entries_only_when_torchcodec_lacks_ffmpeg_and_the_links_help(tmp_path, monkeypatch):
    monkeypatch.setattr(pyav_ffmpeg, "ld_library_path", lambda cache: "/links:/av.libs")
    monkeypatch.setattr(pyav_ffmpeg, "torchcodec_finds_ffmpeg", lambda env=None: True)
    assert pyav_ffmpeg.needed_entries(tmp_path) == ""              # it has one already
    monkeypatch.setattr(pyav_ffmpeg, "torchcodec_finds_ffmpeg", lambda env=None: None)
    assert pyav_ffmpeg.needed_entries(tmp_path) == ""              # torchcodec not installed
    seen = []
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/cuda/lib64")
    monkeypatch.setattr(pyav_ffmpeg, "torchcodec_finds_ffmpeg",
                        lambda env=None: seen.append(env and env["LD_LIBRARY_PATH"]) or env is not None)
    assert pyav_ffmpeg.needed_entries(tmp_path) == "/links:/av.libs"
    assert seen == [None, "/links:/av.libs:/opt/cuda/lib64"]        # checked with the user's path kept after
    monkeypatch.setattr(pyav_ffmpeg, "torchcodec_finds_ffmpeg", lambda env=None: False)
    assert pyav_ffmpeg.needed_entries(tmp_path) == ""              # the links would not help either


@needs_wheel_ffmpeg
def test_torchcodec_decodes_frame_exact_on_pyavs_ffmpeg(tmp_path):
    try:
        importlib.import_module("torchcodec")
    except ImportError:
        pytest.skip("torchcodec is not installed")
    except OSError as err:  # its library does not load: a release built for another torch (or CUDA) than this one
        pytest.skip(f"this torchcodec does not load: {err}")
    video = tmp_path / "bframes.mp4"
    encode_frames(str(video), "libx264", [code_frame(k) for k in range(24)],
                  {"preset": "veryfast", "crf": "12", "g": "10", "bf": "3", "threads": "1"})
    entries = pyav_ffmpeg.ld_library_path(tmp_path / "cache")
    old = os.environ.get("LD_LIBRARY_PATH")
    env = {**os.environ, "LD_LIBRARY_PATH": entries + (os.pathsep + old if old else ""), "PYTHONPATH": str(ROOT)}
    code = ("import json, sys; from torchcodec._core import get_ffmpeg_library_versions as v; "
            "from datasets.decoder import open_video; from tests.frame_code import read_clip; "
            "r = open_video(sys.argv[1], 'torchcodec'); "
            "print(json.dumps({'ffmpeg': v()['libavcodec'], 'sequential': r.sequential, "
            "'read': read_clip(r.get_frames([0, 5, 11, 23]).numpy(), 0)}))")
    out = subprocess.run([sys.executable, "-c", code, str(video)], env=env, capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["ffmpeg"] == list(av.library_versions["libavcodec"])   # PyAV's FFmpeg, not the system's
    assert got == {"ffmpeg": got["ffmpeg"], "sequential": False, "read": [0, 5, 11, 23]}


def _lend(tmp_path: Path, ldconfig: str, ld_library_path: str) -> subprocess.CompletedProcess:
    """scripts/common.sh's lend_ffmpeg in bash, `ldconfig -p` printing `ldconfig`; its python a stand-in for
    `python datasets/pyav_ffmpeg.py` that prints /links:/av.libs and leaves the file `python_ran`. Prints LD=<the
    LD_LIBRARY_PATH it leaves>."""
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\ntouch {tmp_path / 'python_ran'}\necho /links:/av.libs\n")
    fake.chmod(0o755)
    lend = f"ldconfig() {{ echo '{ldconfig}'; }}; source scripts/common.sh; lend_ffmpeg; echo \"LD=$LD_LIBRARY_PATH\""
    env = {**os.environ, "PYTHON": str(fake), "LD_LIBRARY_PATH": ld_library_path}
    return subprocess.run(["bash", "-c", lend], env=env, capture_output=True, text=True, cwd=ROOT)


def test_launch_scripts_lend_ffmpeg_only_without_a_system_one(tmp_path):
    no_system = _lend(tmp_path, "", "/opt/cuda/lib64")
    assert no_system.stdout.strip() == "LD=/links:/av.libs:/opt/cuda/lib64"
    assert "torchcodec uses PyAV's bundled FFmpeg" in no_system.stderr
    system = _lend(tmp_path, "libavcodec.so.59 (libc6) => /usr/lib/x", "/opt/cuda/lib64")
    assert system.stdout.strip() == "LD=/opt/cuda/lib64" and system.stderr == ""
    # FFmpeg 3 (libavcodec 57) is too old for torchcodec: datasets/pyav_ffmpeg.py decides
    too_old = _lend(tmp_path, "libavcodec.so.57 (libc6) => /usr/lib/x", "/opt/cuda/lib64")
    assert too_old.stdout.strip() == "LD=/links:/av.libs:/opt/cuda/lib64"


def test_a_launch_started_by_one_that_lent_ffmpeg_checks_nothing_again(tmp_path):
    """scripts/test.sh lends FFmpeg, then runs the launch scripts, which inherit its LD_LIBRARY_PATH: they find
    pyav_ffmpeg.link_dir's folder there and run no Python (its torchcodec probe took seconds per launch)."""
    libs = tmp_path / "av.libs"
    libs.mkdir()
    (libs / "libavcodec-0123abcd.so.62.28.102").write_bytes(b"")
    lent = pyav_ffmpeg.link_dir(tmp_path / "cache", libs)
    inherited = f"{lent}:{libs}:/opt/cuda/lib64"
    again = _lend(tmp_path, "", inherited)
    assert again.stdout.strip() == f"LD={inherited}" and again.stderr == ""
    assert not (tmp_path / "python_ran").exists()
    # the folder of an uninstalled PyAV (its links lead nowhere) is no FFmpeg: checked again
    (libs / "libavcodec-0123abcd.so.62.28.102").unlink()
    again = _lend(tmp_path, "", inherited)
    assert again.stdout.strip() == f"LD=/links:/av.libs:{inherited}" and (tmp_path / "python_ran").exists()
