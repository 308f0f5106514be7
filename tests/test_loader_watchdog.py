"""A decode that never returns stops the run with an error naming the video (datasets/loader_watchdog.py): in the
training loop and in an evaluation loader, for a hang that holds the GIL (as decord's, dmlc/decord #375) and one
that does not; no loader worker outlives the error, and a loader without a hang yields what a plain one does."""
import ctypes
import multiprocessing
import os
import threading

import pytest
import torch
from torch.utils.data import DataLoader, get_worker_info

from datasets import ReturnIndexDataset, build_dataset, decoder
from datasets.loader_watchdog import DecodeHang
from tests.test_fault_tolerance import _tiny_argv, _train_here
from utils import utils
from utils.evaluation import make_loader

TWO_SECONDS_MIN = "0.033"  # --decode_timeout in minutes


def _hang_on(record, should_hang, hold_gil: bool):
    """decoder.open_video that, in a loader worker, appends 'pid path' to `record` and never returns when
    `should_hang(path)`: in libc's sleep holding the GIL (nothing but SIGKILL ends it), or waiting on an event
    that never fires."""
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
    rows = message.split("the longest first:\n", 1)[1].split("\nA decode", 1)[0].splitlines()
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
