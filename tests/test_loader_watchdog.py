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

from datasets import ReturnIndexDataset, build_dataset, decoder, loader_watchdog
from datasets.device_views import DeviceViews, collate_plans
from datasets.loader_watchdog import DecodeHang, DecodeSlots, WatchedLoader
from datasets.seeding import SeededDataset
from datasets.transform import VideoDataAugmentationDINO
from tests.conftest import build_cfg, write_ssv2
from tests.test_device_views import _aug, _datasets
from tests.test_fault_tolerance import ROOT, _set_flag, _tiny_argv, _train_here
from utils import preemption, utils
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


def test_an_error_of_a_worker_is_raised_as_itself_not_as_a_hang(synthetic_cfg, monkeypatch):
    """Only the DataLoader's own timeout is a hang: a worker's error (here a RuntimeError of the decoder, not one
    it skips as unreadable) reaches the caller as it is, naming its cause."""
    def broken(path, backend="auto"):
        raise RuntimeError(f"{path}: the decoder broke (test)")

    monkeypatch.setattr(decoder, "open_video", broken)
    dataset = ReturnIndexDataset(build_dataset("kinetics400", synthetic_cfg(), "val"))
    with pytest.raises(RuntimeError, match="the decoder broke") as raised:
        list(make_loader(dataset, 4, num_workers=1, decode_timeout=1))
    assert not isinstance(raised.value, DecodeHang)


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


def _message_of(dataset, *busy: tuple[int, float]) -> str:
    """The DecodeHang message of a watched loader over `dataset` whose workers read each (video, since seconds) of
    `busy`, one each."""
    loader = WatchedLoader(dataset, batch_size=2, num_workers=max(len(busy), 1), decode_timeout=1)
    for worker, (video, seconds) in enumerate(busy):
        loader.slots.table[worker] = torch.tensor([video, time.time() - seconds], dtype=torch.float64)
    return loader.hang_message()


def test_the_slots_hold_each_worker_s_video_from_its_start_to_its_end(monkeypatch):
    """DecodeSlots as the workers write it: a worker's row names its video (0 too) from begin to end, busy() lists
    the videos being read, the longest first, with the seconds since each began; outside a worker nothing."""
    now, worker = [100.0], argparse.Namespace(id=None)
    monkeypatch.setattr(loader_watchdog, "time", argparse.Namespace(time=lambda: now[0]))
    monkeypatch.setattr(loader_watchdog, "get_worker_info", lambda: worker if worker.id is not None else None)
    slots = DecodeSlots(3)
    for now[0], worker.id, video in ((100.0, 2, 0), (130.0, 0, 7), (145.0, 1, 3)):
        slots.begin(video)
    slots.end()  # worker 1's video 3 is done
    worker.id, now[0] = None, 190.0
    slots.begin(5)
    assert slots.busy() == [(0, 90.0), (7, 60.0)]
    worker.id = 2
    slots.end()
    assert slots.busy() == [(7, 60.0)]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 4 workers on 2 cores, never started
def test_the_message_lists_the_three_videos_read_longest_and_names_the_longest(synthetic_cfg):
    """Four workers stuck: the three longest reads are listed, the longest first; the fix names the longest one
    and a backend other than the one that hangs."""
    dataset = build_dataset("kinetics400", synthetic_cfg(**{"DATA.DECODING_BACKEND": "pyav"}), "val")
    message = _message_of(dataset, (1, 90), (2, 30), (0, 150), (3, 60))
    paths = dataset.video_paths
    assert _listed(message) == {paths[0]: 2.5, paths[1]: 1.5, paths[3]: 1.0}
    assert f"Delete {paths[0]} " in message and f"ffmpeg -i {paths[0]} " in message
    assert "with pyav (DATA.DECODING_BACKEND pyav)" in message
    assert "decode with another backend (--opts DATA.DECODING_BACKEND torchcodec)" in message


def test_workers_stuck_outside_any_video_are_named_so(synthetic_cfg):
    """No worker is reading a video when the wait runs out (a collate or a file system stuck): no video is named."""
    message = _message_of(build_dataset("kinetics400", synthetic_cfg(), "val"))
    assert message == ("No batch came from the DataLoader workers within --decode_timeout 1 min, and none of them is "
                       "reading a video: they are stuck elsewhere (e.g. in a collate or a file system that stopped "
                       "answering). If they were only slow, raise --decode_timeout (0: wait forever).")


def test_a_stuck_frame_folder_is_named_as_a_folder_of_jpeg_frames_not_as_a_video_to_re_encode(tmp_path):
    """SSv2's samples are folders of JPEGs read with PIL: the message names the folder (its list item is a video
    id, no file) and no video advice (delete, ffmpeg, DATA.DECODING_BACKEND: none applies to a JPEG read)."""
    write_ssv2(tmp_path)
    dataset = build_dataset("ssv2", build_cfg(tmp_path, tmp_path / "frames"), "val")
    message = _message_of(dataset, (1, 90))
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
    message = _message_of(SeededDataset(plans), (2, 90))
    assert _listed(message) == {plans.video_paths[2]: 1.5}
    assert "with PyAV (its probe and a read of the bytes: DATA.DECODE_DEVICE cuda)" in message
    assert "--opts DATA.DECODE_DEVICE cpu" in message and "DATA.DECODING_BACKEND" not in message
    # DATA.AUGMENT_DEVICE cuda alone: the workers decode with the backend, the GPU only augments
    decoding = build_dataset("kinetics400", synthetic_cfg(**{"DATA.AUGMENT_DEVICE": "cuda"}), "train", ssl_aug=aug)
    message = _message_of(SeededDataset(decoding), (2, 90))
    assert f"with {decoding.backend} (DATA.DECODING_BACKEND auto)" in message and "PyAV" not in message


def test_a_decode_timeout_too_long_for_the_loader_is_refused_when_parsed(capsys):
    """A DataLoader wait above 2**31 ms (~35,791 min; 'inf' too) raises OverflowError at the first batch, deep in
    multiprocessing, after the whole setup: --decode_timeout refuses it when parsed, with the way to wait
    forever; the largest value it takes is a wait the loader accepts."""
    parser = argparse.ArgumentParser()
    utils.add_decode_timeout_arg(parser)
    assert parser.parse_args(["--decode_timeout", "0"]).decode_timeout == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["--decode_timeout", "inf"])
    assert "argument --decode_timeout: inf is not a number of minutes" in capsys.readouterr().err
    # by default on, and shorter than the collectives' wait: the stuck rank names its video before a peer times out
    assert 0 < parser.parse_args([]).decode_timeout < utils.DEFAULT_DIST_TIMEOUT_MIN
    for value in ("inf", "nan", "-1", "1e6", f"{utils.MAX_DECODE_TIMEOUT_MIN + 1}"):
        with pytest.raises(argparse.ArgumentTypeError, match="0: wait forever"):
            utils.decode_timeout_minutes(value)
    longest = parser.parse_args(["--decode_timeout", str(utils.MAX_DECODE_TIMEOUT_MIN)]).decode_timeout
    batches = list(WatchedLoader(list(range(4)), batch_size=2, num_workers=1, decode_timeout=longest))
    assert [b.tolist() for b in batches] == [[0, 1], [2, 3]]


# ---------------------------------------------------------------------------------------------
# DATA.DECODE_DEVICE cuda: the videos are decoded in the training process, in DeviceViews' decode threads (here on
# the CPU: the same threads; each video decoded sequentially from its bytes with PyAV, no torchcodec needed)
# ---------------------------------------------------------------------------------------------
def hanging(stuck: list[str], release: threading.Event, refused: tuple = ()) -> tuple:
    """Stand-ins for (decoder.decode_on_device, decoder.decode_bytes_sequentially) that decode every video
    sequentially from its bytes, except that the decode of each `stuck` video waits for `release` (the GIL
    released, as in torchcodec's and PyAV's native decode): in torchcodec's place, or, for a video in `refused`
    (which torchcodec refuses), in the sequential decode after it. The stuck decodes begin in the order listed."""
    sequential, began = decoder.decode_bytes_sequentially, [threading.Event() for _ in stuck]

    def hang(path: str) -> None:
        if path in stuck:
            k = stuck.index(path)
            if k:
                began[k - 1].wait()
            began[k].set()
            release.wait()

    def on_device(data, indices, info, device, path):
        if path in refused:
            raise decoder.DecodeError(f"{path}: refused (test)")
        hang(path)
        return sequential(data, indices, info, path), ""

    def bytes_sequentially(data, indices, info, path):
        hang(path)
        return sequential(data, indices, info, path)
    return on_device, bytes_sequentially


@pytest.fixture
def release():
    """The event stuck decode threads wait for; set at the end, so that no thread of the test outlives it."""
    before, event = set(threading.enumerate()), threading.Event()
    yield event
    event.set()
    for thread in set(threading.enumerate()) - before:
        thread.join(timeout=60)
        assert not thread.is_alive(), thread.name


def _plans_batch(synthetic_cfg, size: int) -> tuple:
    aug = _aug()
    _, plans = _datasets(synthetic_cfg, aug)
    return aug, collate_plans([plans[(i, 100 + i)] for i in range(size)])[0]


def test_a_decode_thread_that_never_returns_is_named_instead_of_waited_for(synthetic_cfg, monkeypatch, release):
    """Samples 0 and 2 never decode (0 in torchcodec's place, 2 in the sequential decode after torchcodec refused
    it), each in a thread of its own (sample 1 decodes in between): DecodeHang after --decode_timeout names both,
    the longest first, with their decoders and the fix; the thread pool is let go, not waited for."""
    aug, batch = _plans_batch(synthetic_cfg, 3)
    stuck = [batch["path"][0], batch["path"][2]]
    on_device, sequentially = hanging(stuck, release, refused=(stuck[1],))
    monkeypatch.setattr(decoder, "decode_on_device", on_device)
    monkeypatch.setattr(decoder, "decode_bytes_sequentially", sequentially)
    stage = DeviceViews(aug.sizes, "cpu", threads=2, decode_timeout=float(TWO_SECONDS_MIN))
    with pytest.raises(DecodeHang) as stopped:
        stage(batch)
    message = str(stopped.value)
    assert stopped.value.stuck_threads
    assert list(_listed(message)) == stuck
    assert (f"A video did not finish decoding in this process's decode threads (DATA.DECODE_DEVICE cuda) within "
            f"--decode_timeout {float(TWO_SECONDS_MIN):g} min. The videos the threads are decoding, with torchcodec "
            "on cpu or the sequential CPU decode (PyAV, from its bytes), the longest first:") in message
    assert f"Delete {stuck[0]} (a missing video is skipped and counted like any unreadable one" in message
    assert f"ffmpeg -i {stuck[0]} -c:v libx264" in message and "or decode in the loader workers (--opts " \
        "DATA.DECODE_DEVICE cpu); then rerun the same command" in message and "raise --decode_timeout" in message
    assert all(minutes < 1 for minutes in _listed(message).values())  # decoding since the wait began
    assert stage._pool is None  # let go: its shutdown would wait for the stuck threads
    stage.close()


def test_a_decode_that_ended_just_after_the_wait_is_called_slow_not_stuck(synthetic_cfg):
    """The wait ran out, but no thread decodes any more when the error is made: nothing to name, no stuck thread."""
    hang = DeviceViews(_aug().sizes, "cpu", decode_timeout=0.5)._hang()
    assert str(hang) == ("A video did not finish decoding in this process's decode threads (DATA.DECODE_DEVICE cuda) "
                         "within --decode_timeout 0.5 min; it ended just after, so it was only slow: raise "
                         "--decode_timeout (0: wait forever).")
    assert not hang.stuck_threads
    # DATA.AUGMENT_DEVICE cuda alone (no NVDEC): the threads copy what the workers decoded; its key is named
    copying = DeviceViews(_aug().sizes, "cpu", nvdec=False, decode_timeout=0.5)._hang()
    assert "decode threads (DATA.AUGMENT_DEVICE cuda) within" in str(copying)


def test_decode_threads_without_a_hang_give_their_views_and_0_waits_for_any_decode(synthetic_cfg, monkeypatch,
                                                                                  release):
    """--decode_timeout 0 waits as long as a decode takes (here until it is released, 1 s on); a limit changes
    nothing for a batch that decodes within it (a decode of 1 s within 0.5 min: the limit counts minutes), and no
    thread's note outlives its sample."""
    aug, batch = _plans_batch(synthetic_cfg, 3)

    def views_with_a_1s_decode(decode_timeout: float, held: threading.Event) -> list[torch.Tensor]:
        monkeypatch.setattr(decoder, "decode_on_device", hanging([batch["path"][1]], held)[0])
        threading.Timer(1.0, held.set).start()
        stage = DeviceViews(aug.sizes, "cpu", threads=2, decode_timeout=decode_timeout)
        views, skipped = stage(batch)
        stage.close()
        assert skipped.tolist() == [0, 0, 0] and stage._decoding == {}
        return views

    expected = views_with_a_1s_decode(0, release)
    views = views_with_a_1s_decode(0.5, threading.Event())
    assert all(torch.equal(a, b) for a, b in zip(views, expected, strict=True))


STUCK_ENTRY_POINT = textwrap.dedent("""
    # An entry point's loop over DATA.DECODE_DEVICE cuda batches (DeviceViewLoader, its stage on the CPU) inside
    # utils.named_rank_failures, where the decode of the video argv[2] never returns. argv[1]: the synthetic root.
    # With argv[3] "stop", a stop signal's exit (Preempted, checkpoint written) after the first batch.
    import sys, threading
    sys.path.insert(0, {root!r})
    from pathlib import Path
    from torch.utils.data import DataLoader
    from datasets import build_dataset, decoder
    from datasets import device_views
    from datasets.device_views import DeviceViewLoader, DeviceViews, collate_plans
    from datasets.seeding import SeededDataset
    from tests.conftest import build_cfg
    from tests.test_loader_watchdog import _aug, hanging
    from utils import preemption, utils
    root, stuck, stop = Path(sys.argv[1]), sys.argv[2], sys.argv[3:] == ["stop"]
    device_views.CLOSE_GRACE_S = 1.0
    decoder.decode_on_device, decoder.decode_bytes_sequentially = hanging([stuck], threading.Event())
    aug = _aug()
    cfg = build_cfg(root / "annotations", root / "videos", **{{"DATA.DECODE_DEVICE": "cuda"}})
    plans = SeededDataset(build_dataset("kinetics400", cfg, "train", ssl_aug=aug))
    loader = DataLoader(plans, sampler=[(i, 100 + i) for i in range(4)], batch_size=2, collate_fn=collate_plans)
    with utils.named_rank_failures():
        for batch in DeviceViewLoader(loader, DeviceViews(aug.sizes, "cpu", threads=2, decode_timeout={timeout})):
            if stop:
                raise preemption.Preempted("checkpoint written", [])
    print("every batch came")
""")


def test_an_entry_point_whose_decode_thread_never_returns_exits_naming_the_video(synthetic_root, synthetic_cfg,
                                                                                tmp_path):
    """The stuck thread cannot be stopped and the interpreter would join it at exit: named_rank_failures prints
    the error, hands it to torchrun's error file and ends the process (exit code 1) instead of hanging there."""
    script = tmp_path / "stuck_entry_point.py"
    script.write_text(STUCK_ENTRY_POINT.format(root=str(ROOT), timeout=TWO_SECONDS_MIN))
    stuck = build_dataset("kinetics400", synthetic_cfg(), "train").video_paths[3]  # the second batch's
    error_file = tmp_path / "error.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHELASTIC_ERROR_FILE": str(error_file)}
    try:
        done = subprocess.run([sys.executable, str(script), str(synthetic_root), stuck], env=env,
                              capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the process did not end within 120 s (its stuck thread joined at exit?):\n"
                    f"{(err.stderr or b'').decode()[-3000:]}")
    assert done.returncode == 1, done.stderr[-3000:]
    assert "every batch came" not in done.stdout
    assert "datasets.loader_watchdog.DecodeHang: A video did not finish decoding" in done.stderr, done.stderr[-3000:]
    assert f"  {stuck}: " in done.stderr and f"Delete {stuck} " in done.stderr
    assert "DecodeHang: A video did not finish decoding" in error_file.read_text()


def test_a_stopped_entry_point_exits_with_its_stop_status_past_a_decode_thread_that_never_returns(
        synthetic_root, synthetic_cfg, tmp_path):
    """A stop signal's exit (status 3: the SLURM script requeues the job) while a decode thread of the batch ahead
    never returns (--decode_timeout far off): the thread is given CLOSE_GRACE_S (here 1 s), named in a warning and
    left behind, and the process exits with 3 instead of joining it until SLURM's kill (no requeue)."""
    script = tmp_path / "stopped_entry_point.py"
    script.write_text(STUCK_ENTRY_POINT.format(root=str(ROOT), timeout=15))
    stuck = build_dataset("kinetics400", synthetic_cfg(), "train").video_paths[3]  # the batch ahead's
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run([sys.executable, str(script), str(synthetic_root), stuck, "stop"], env=env,
                              capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the stopped process did not end within 120 s (its stuck thread joined at exit?):\n"
                    f"{(err.stderr or b'').decode()[-3000:]}")
    assert done.returncode == preemption.PREEMPTED_EXIT_STATUS, done.stderr[-3000:]
    assert "1 decode thread(s) still decoding 1 s after their pass ended, left behind: " \
           f"{stuck} (torchcodec on cpu, 0.0 min)" in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr  # no error: the stop's own exit
