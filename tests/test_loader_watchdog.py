"""A decode that never returns stops the run with an error naming the video (datasets/loader_watchdog.py): in the
training loop and in an evaluation loader, for a hang that holds the GIL (as decord's, dmlc/decord #375) and one
that does not; no loader worker outlives the error, and a loader without a hang yields what a plain one does;
in a 2-process torchrun job the stuck rank's error ends the job and is the one torchrun's summary names."""
import argparse
import ctypes
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, get_worker_info

from datasets import ReturnIndexDataset, build_dataset, decoder
from datasets.loader_watchdog import DecodeHang, WatchedLoader
from datasets.seeding import SeededDataset
from datasets.transform import VideoDataAugmentationDINO
from tests.conftest import build_cfg, write_ssv2
from tests.test_fault_tolerance import ROOT, _set_flag, _tiny_argv, _train_here
from utils import utils
from utils.evaluation import make_loader

TWO_SECONDS_MIN = "0.033"  # --decode_timeout in minutes


def _hang_on(record, should_hang, hold_gil: bool):
    """decoder.open_video that, in a loader worker, appends 'pid path' to `record` and never returns when
    `should_hang(path)`: in libc's sleep holding the GIL (no Python signal handler runs; torch's C handler of
    SIGTERM ends it), or waiting on an event that never fires."""
    real = decoder.open_video

    def open_video(path, backend="auto"):
        if get_worker_info() is not None and should_hang(path):
            with open(record, "a") as f:
                f.write(f"{os.getpid()} {path}\n")
            if hold_gil:
                ctypes.PyDLL(None).sleep(3600)
            threading.Event().wait()
        return real(path, backend)
    return open_video


def _listed(message: str) -> dict[str, float]:
    """{path: minutes} of the videos a DecodeHang message lists, checked to be in order, the longest first."""
    rows = message.split("the longest first:\n", 1)[1].split("\nA ", 1)[0].splitlines()
    minutes = [float(row.rsplit(": ", 1)[1].removesuffix(" min")) for row in rows]
    assert minutes == sorted(minutes, reverse=True)
    return {row.strip().rsplit(": ", 1)[0]: m for row, m in zip(rows, minutes)}


def _assert_workers_gone(pids: list[int]) -> None:
    assert multiprocessing.active_children() == []
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_decode_that_never_returns_stops_training_naming_the_video(synthetic_root, tmp_path, monkeypatch):
    record = tmp_path / "hung.txt"
    first = []  # per process: worker 0 hangs in the first video it opens, worker 1 reads every video

    def worker_0_first(path):
        first.append(path)
        return get_worker_info().id == 0 and len(first) == 1

    monkeypatch.setattr(decoder, "open_video", _hang_on(record, worker_0_first, hold_gil=True))
    argv = _tiny_argv(synthetic_root, tmp_path / "run")
    argv[argv.index("--num_workers") + 1] = "2"
    with pytest.raises(DecodeHang) as stopped:
        _train_here(monkeypatch, ["--decode_timeout", TWO_SECONDS_MIN, *argv])
    (pid, path), = [line.split(" ", 1) for line in record.read_text().splitlines()]
    message = str(stopped.value)
    assert path in _listed(message)
    assert f"No batch came from the DataLoader workers within --decode_timeout {float(TWO_SECONDS_MIN):g} min" in message
    assert f"with {decoder.resolve_backend('auto')} (DATA.DECODING_BACKEND auto)" in message
    assert f"ffmpeg -i {path} -c:v libx264" in message and "--opts DATA.DECODING_BACKEND" in message
    assert "rerun the same command" in message
    _assert_workers_gone([int(pid)])
    assert not (tmp_path / "run" / "checkpoint.pth").exists()  # it stopped in the first batch


def test_an_evaluation_loader_names_the_stuck_video_and_is_otherwise_unchanged(synthetic_cfg, tmp_path,
                                                                             monkeypatch):
    dataset = ReturnIndexDataset(build_dataset("kinetics400", synthetic_cfg(), "val"))
    expected = [batch for batch in DataLoader(dataset, batch_size=4)]
    watched = list(make_loader(dataset, 4, num_workers=2, decode_timeout=float(TWO_SECONDS_MIN)))
    assert len(watched) == len(expected)
    for batch, reference in zip(watched, expected):  # (clips, index)
        assert all(torch.equal(a, b) for a, b in zip(batch, reference, strict=True))

    stuck = dataset.dataset.video_paths[4]  # the first of worker 1's first batch
    record = tmp_path / "hung.txt"
    monkeypatch.setattr(decoder, "open_video", _hang_on(record, lambda path: path == stuck, hold_gil=False))
    loader = make_loader(dataset, 4, num_workers=2, decode_timeout=float(TWO_SECONDS_MIN))
    with pytest.raises(DecodeHang) as stopped:
        list(loader)
    assert stuck in _listed(str(stopped.value))
    _assert_workers_gone([int(line.split()[0]) for line in record.read_text().splitlines()])


def test_without_workers_there_is_no_limit_and_the_hang_error_is_no_collective_failure(synthetic_cfg, tmp_path,
                                                                                     monkeypatch):
    dataset = build_dataset("kinetics400", synthetic_cfg(), "val")
    assert make_loader(dataset, 4, num_workers=0, decode_timeout=1).timeout == 0
    assert make_loader(dataset, 4, num_workers=1, decode_timeout=0).timeout == 0
    # A stuck rank's error reaches torchrun's summary as itself, not as "a collective operation failed".
    monkeypatch.setattr(utils, "get_world_size", lambda: 2)
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    with pytest.raises(DecodeHang):
        with utils.named_rank_failures():
            raise DecodeHang("No batch came within --decode_timeout 15 min: x.mp4")
    assert "DecodeHang: No batch came within --decode_timeout 15 min: x.mp4" in (tmp_path / "error.json").read_text()


# ---------------------------------------------------------------------------------------------
# 2 processes (torchrun, gloo): the loader worker of one rank, or of both, stuck in its first decode
# ---------------------------------------------------------------------------------------------
HANG_LAUNCHER = textwrap.dedent("""
    # train_ssl.py as torchrun runs it, but in the ranks {ranks} each loader worker's first decode never returns
    # (in libc's sleep, holding the GIL); such a worker writes 'pid path' to hung.<rank>.
    import os, runpy, sys
    sys.path.insert(0, {root!r})
    from datasets import decoder
    from tests.test_loader_watchdog import _hang_on
    rank = int(os.environ["RANK"])
    decoder.open_video = _hang_on(os.path.join({folder!r}, f"hung.{{rank}}"), lambda path: rank in {ranks},
                                  hold_gil=True)
    sys.argv[0] = os.path.join({root!r}, "train_ssl.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


def _processes_of(launcher: Path) -> list[int]:
    """Live processes whose command line names `launcher`: torchrun, its ranks and their (forked) loader workers.
    An exited one that is not reaped yet (a zombie) has an empty command line."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(launcher).encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:  # it exited meanwhile
            pass
    return pids


def test_a_decode_that_never_returns_on_a_rank_ends_the_torchrun_job_naming_the_video(synthetic_root, tmp_path):
    """The stuck rank (1) raises DecodeHang after --decode_timeout (3 s) and exits 1; torchrun stops the other rank
    (blocked in the first step's all-reduce) and its summary names the video, long before --dist_timeout (30 min:
    the job would exceed the 120 s limit). No process of the job is left. (Both ranks stuck, run by hand on
    2026-12-01, ended alike: each rank's DecodeHang named its own video.)"""
    ranks = [1]
    launcher = tmp_path / "hang_launcher.py"
    launcher.write_text(HANG_LAUNCHER.format(root=str(ROOT), folder=str(tmp_path), ranks=ranks))
    argv = _set_flag(_set_flag(_tiny_argv(synthetic_root, tmp_path / "run"), "--num_workers", "1"),
                     "--batch_size_per_gpu", "2")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    torchrun = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(launcher),
         "--decode_timeout", TWO_SECONDS_MIN, "--dist_timeout", "30", *argv],
        env={**env, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = torchrun.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        for pid in _processes_of(launcher):  # torchrun starts each rank in a session of its own
            os.kill(pid, signal.SIGKILL)
        out, _ = torchrun.communicate()
        pytest.fail(f"the job did not end within 120 s:\n{out[-3000:]}")
    assert torchrun.returncode == 1, out[-3000:]
    stuck = {}
    for rank in ranks:
        (line,) = (tmp_path / f"hung.{rank}").read_text().splitlines()
        stuck[rank] = line.split(" ", 1)[1]
        assert f"[rank{rank}]: datasets.loader_watchdog.DecodeHang: No batch came from the DataLoader workers" in out
        assert f"[rank{rank}]:   {stuck[rank]}: " in out, out[-3000:]
    assert sorted(p.name for p in tmp_path.glob("hung.*")) == [f"hung.{rank}" for rank in ranks]
    # torchrun's closing summary (the first rank to fail, from its error file): the stuck video and the fix
    summary = out.rsplit("Root Cause (first observed failure):", 1)[1]
    first = int(summary.split("rank      : ", 1)[1].split(" ", 1)[0])
    assert first in ranks, summary
    assert "DecodeHang: No batch came from the DataLoader workers within --decode_timeout" in summary
    assert f"Delete {stuck[first]} " in summary
    deadline = time.time() + 30  # a worker of a rank that was not stuck notices its parent's end within 5 s
    while _processes_of(launcher) and time.time() < deadline:
        time.sleep(0.5)
    assert _processes_of(launcher) == []


def _message_of(dataset, busy_video: int) -> str:
    """The DecodeHang message of a watched loader over `dataset` whose one worker reads `busy_video` since 90 s."""
    loader = WatchedLoader(dataset, batch_size=2, num_workers=1, decode_timeout=1)
    loader.slots.table[0] = torch.tensor([busy_video, time.time() - 90], dtype=torch.float64)
    return loader.hang_message()


def test_a_stuck_frame_folder_is_named_as_a_folder_of_jpeg_frames_not_as_a_video_to_re_encode(tmp_path):
    """SSv2's samples are folders of JPEGs read with PIL: the message names the folder (its list item is a video
    id, no file) and no video advice (delete, ffmpeg, DATA.DECODING_BACKEND: none applies to a JPEG read)."""
    write_ssv2(tmp_path)
    dataset = build_dataset("ssv2", build_cfg(tmp_path, tmp_path / "frames"), "val")
    message = _message_of(dataset, 1)
    folder = str(tmp_path / "frames" / "101")
    assert _listed(message) == {f"{folder} (video 101)": 1.5}
    assert "JPEG frames" in message and f"cat {folder}/*" in message and "--decode_timeout" in message
    assert "ffmpeg" not in message and "DECODING_BACKEND" not in message and "Delete" not in message


def test_workers_that_only_probe_and_read_bytes_are_named_so(synthetic_cfg):
    """DATA.DECODE_DEVICE cuda: the workers probe each video with PyAV and read its bytes (the GPU decodes it), so
    the message names PyAV, not DATA.DECODING_BACKEND, and offers the CPU decode instead of another backend."""
    aug = VideoDataAugmentationDINO(global_size=32, local_size=16, global_frames=(4, 8),
                                    local_frames=(2, 2, 4, 4, 8, 8, 16, 16))
    plans = build_dataset("kinetics400", synthetic_cfg(**{"DATA.DECODE_DEVICE": "cuda"}), "train", ssl_aug=aug)
    message = _message_of(SeededDataset(plans), 2)
    assert _listed(message) == {plans.video_paths[2]: 1.5}
    assert "with PyAV (its probe and a read of the bytes: DATA.DECODE_DEVICE cuda)" in message
    assert "--opts DATA.DECODE_DEVICE cpu" in message and "DATA.DECODING_BACKEND" not in message


def test_a_decode_timeout_too_long_for_the_loader_is_refused_when_parsed():
    """A DataLoader wait above 2**31 ms (~35,791 min; 'inf' too) raises OverflowError at the first batch, deep in
    multiprocessing, after the whole setup: --decode_timeout refuses it when parsed, with the way to wait
    forever; the largest value it takes is a wait the loader accepts."""
    parser = argparse.ArgumentParser()
    utils.add_decode_timeout_arg(parser)
    assert parser.parse_args(["--decode_timeout", "0"]).decode_timeout == 0
    for value in ("inf", "nan", "-1", "1e6", f"{utils.MAX_DECODE_TIMEOUT_MIN + 1}"):
        with pytest.raises(argparse.ArgumentTypeError, match="0: wait forever"):
            utils.decode_timeout_minutes(value)
    longest = parser.parse_args(["--decode_timeout", str(utils.MAX_DECODE_TIMEOUT_MIN)]).decode_timeout
    batches = list(WatchedLoader(list(range(4)), batch_size=2, num_workers=1, decode_timeout=longest))
    assert [b.tolist() for b in batches] == [[0, 1], [2, 3]]
