"""Fault tolerance: kill -9 at the fragile points of a tiny training run and resume; a stalled rank ends a
2-process job with a message naming it; temporary files, file modes, non-finite states, mismatched resumes,
line-buffered output.

The kills happen in forked children of one subprocess. KILL_RUNNER (test code, no hook in train_ssl.py)
wraps one function of the run so that its N-th call sends SIGKILL to its own process: DINOLoss.forward
(mid-step), torch.save (mid-save: the temporary file is complete, the rename never happens),
utils.write_epoch_log (between train_ssl's epoch-end checkpoint and its log.txt line) or train_ssl.atomic_copy
(between checkpoint.pth and checkpointNNNN.pth).
"""
import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import models
import train_ssl
from utils import utils
from tests.conftest import WALL_CLOCK_KEYS, log_records, on_free_port
from tests.forked_runs import run_jobs
from utils.checkpoint import atomic_save, remove_stale_temp_files, safe_torch_load

ROOT = Path(__file__).resolve().parents[1]

KILL_RUNNER = textwrap.dedent("""
    # Runs train_ssl.train_svt once per job (tests/forked_runs.py), the child killed by SIGKILL at the N-th call
    # of one function. argv[1]: a JSON list of [kill_at, log_file, train_ssl argv]; prints the exit statuses.
    import functools, json, os, signal, sys
    sys.path.insert(0, {root!r})
    import torch
    import models, train_ssl
    from models import DINOLoss
    from tests.forked_runs import run_forked

    OWNERS = {{"step": (DINOLoss, "forward"), "save": (torch, "save"), "log": (train_ssl.utils, "write_epoch_log"),
               "numbered": (train_ssl, "atomic_copy")}}

    def die_at(target, nth):
        owner, name = OWNERS[target]
        real, calls = getattr(owner, name), []

        def dying(*args, **kwargs):
            calls.append(1)
            if len(calls) == nth:
                if target == "save":  # the whole temporary file is written, the rename never happens
                    real(*args, **kwargs)
                    args[1].flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        setattr(owner, name, dying)

    def child(kill_at, argv):
        os.umask(0o022)
        train_ssl.build_backbone = functools.partial(models.build_backbone, embed_dim=48, num_heads=2)
        if kill_at:
            target, nth = kill_at.split(":")
            die_at(target, int(nth))
        train_ssl.train_svt(train_ssl.get_args_parser().parse_args(argv))

    print(json.dumps(run_forked(json.loads(sys.argv[1]), child)))
""")


def _tiny_argv(root: Path, out: Path) -> list[str]:
    """2 epochs of 4 steps (16 videos, batch 4), a depth-1 width-48 TimeSformer on 2 frames of 32 px and
    2 local views; checkpoint.pth after every 2nd step and every epoch, numbered every epoch."""
    return ["--arch", "vit_tiny", "--out_dim", "64", "--batch_size_per_gpu", "4", "--epochs", "2",
            "--warmup_epochs", "1", "--local_crops_number", "2", "--num_workers", "0", "--log_freq", "1",
            "--lr", "0.05", "--saveckp_iters", "2", "--saveckp_freq", "1",
            "--data_path", str(root / "annotations"), "--output_dir", str(out),
            "--opts", "DATA.PATH_PREFIX", str(root / "videos"), "MODEL.DEPTH", "1", "DATA.NUM_FRAMES", "2",
            "DATA.SAMPLING_RATE", "2", "DATA.TRAIN_CROP_SIZE", "32", "DATA.LOCAL_CROP_SIZE", "16",
            "DATA.LOCAL_NUM_FRAMES", "[2, 2]"]


@pytest.fixture(scope="module")
def seek_unsafe_root(synthetic_root, tmp_path_factory) -> Path:
    """The synthetic training list with every video re-encoded as MPEG-4 AVI with B-frames: every one is
    decoded sequentially and counted in `sequential_decodes`, which a resume must not forget."""
    import av
    from tests.frame_code import encode_frames
    root = tmp_path_factory.mktemp("seek_unsafe")
    (root / "annotations").mkdir()
    lines = []
    for line in (synthetic_root / "annotations" / "train.csv").read_text().splitlines():
        rel, label = line.split()
        with av.open(str(synthetic_root / "videos" / rel)) as video:
            frames = [f.to_ndarray(format="rgb24") for f in video.decode(video=0)]
        dst = root / "videos" / rel.replace(".mp4", ".avi")
        dst.parent.mkdir(parents=True, exist_ok=True)
        encode_frames(str(dst), "mpeg4", frames, {"g": "6", "bf": "2", "qscale": "3"}, codec_tag="DX50")
        lines.append(f"{rel.replace('.mp4', '.avi')} {label}")
    (root / "annotations" / "train.csv").write_text("\n".join(lines) + "\n")
    return root


def test_kill_9_at_every_fragile_point_then_resume_ends_as_an_uninterrupted_run(seek_unsafe_root, tmp_path):
    synthetic_root = seek_unsafe_root
    reference, out = tmp_path / "reference", tmp_path / "killed"
    argv = _tiny_argv(synthetic_root, out)
    # One chain of runs, each killed at the N-th call (counted in that run) of a function, each resuming from
    # what the previous one left. Epoch e has steps 4e+1..4e+4; checkpoint.pth after steps 2 and 4.
    chain = [
        ("step:3", "mid-step (epoch 0, step 3): resumes mid-epoch from the step-2 checkpoint"),
        ("save:1", "mid-save of the epoch-0 checkpoint: a complete .tmp, no rename"),
        ("log:1", "after the epoch-0 checkpoint, before its log.txt line"),
        ("step:3", "mid-step (epoch 1, step 3): the epoch's means must include steps 1-2"),
        ("numbered:1", "after the last checkpoint.pth, before checkpoint0001.pth and its log line"),
        ("", "the resume that finishes the run"),
    ]
    logs = [tmp_path / f"run{i}.log" for i in range(len(chain) + 1)]
    statuses = run_jobs(KILL_RUNNER, tmp_path, [("", logs[-1], _tiny_argv(synthetic_root, reference))] +
                         [(kill_at, log, argv) for (kill_at, _), log in zip(chain, logs)])
    assert statuses[0] == 0, logs[-1].read_text()[-3000:]
    for status, (kill_at, where), log in zip(statuses[1:], chain, logs):
        assert status == (-signal.SIGKILL if kill_at else 0), f"{where}: {log.read_text()[-3000:]}"
    assert "Removed 1 temporary file(s)" in logs[2].read_text()  # left by the mid-save kill
    assert "Wrote the log.txt line of epoch 0" in logs[3].read_text()
    assert "Wrote the log.txt line of epoch 1" in logs[5].read_text()

    records = log_records(out)
    assert [r["sequential_decodes"] for r in records] == [16, 16]  # every video, in every epoch's line
    assert records == log_records(reference)
    assert sorted(p.name for p in out.glob("checkpoint*.pth")) == \
        ["checkpoint.pth", "checkpoint0000.pth", "checkpoint0001.pth"]
    for name in ("checkpoint.pth", "checkpoint0000.pth", "checkpoint0001.pth"):
        got, want = safe_torch_load(out / name), safe_torch_load(reference / name)
        assert (got["epoch"], got["iteration"]) == (want["epoch"], want["iteration"])
        assert got["sequential_videos"] == want["sequential_videos"] == {"num_videos": 16, "indices": list(range(16))}
        for key in ("student", "teacher", "dino_loss"):
            for param, value in want[key].items():
                assert torch.equal(got[key][param], value), f"{name}: {key}.{param}"
        assert got["epoch_log"] == {**want["epoch_log"], **{k: got["epoch_log"][k] for k in WALL_CLOCK_KEYS}}
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert (out / "checkpoint.pth").stat().st_mode & 0o777 == 0o644  # the launcher's umask 022


def test_atomic_save_follows_the_umask_and_stale_temp_files_are_removed(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_save({"x": torch.ones(1)}, tmp_path / "checkpoint.pth")
    finally:
        os.umask(old)
    assert (tmp_path / "checkpoint.pth").stat().st_mode & 0o777 == 0o640
    ours = [".checkpoint.pth.123.abcd.tmp", ".config.txt.123.abcd.tmp", ".log.txt.before_resume.123.abcd.tmp"]
    for name in ours:
        (tmp_path / name).write_bytes(b"partial")
    (tmp_path / ".other.tmp").write_bytes(b"not ours")
    assert remove_stale_temp_files(tmp_path) == ours
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp", "checkpoint.pth"]


# ---------------------------------------------------------------------------------------------
# A stalled rank: 2 gloo processes, rank 1 stops itself (SIGSTOP), --dist_timeout 0.05 min (3 s)
# ---------------------------------------------------------------------------------------------
STALL_LAUNCHER = textwrap.dedent("""
    import argparse, os, signal, sys, time
    sys.path.insert(0, {root!r})
    import torch, torch.distributed as dist
    from utils import utils

    # --dist_timeout bounds the rendezvous too (rank 0 waits that long for rank 1 to connect): both ranks start
    # it together, whatever the skew of their imports on a loaded machine
    open(os.path.join({folder!r}, "imported." + os.environ["RANK"]), "w").close()
    while not all(os.path.exists(os.path.join({folder!r}, f"imported.{{r}}")) for r in (0, 1)):
        time.sleep(0.01)
    parser = argparse.ArgumentParser()
    utils.add_distributed_args(parser)
    args = parser.parse_args()
    with utils.named_rank_failures(args.dist_timeout):
        utils.init_distributed_mode(args)
        dist.all_reduce(torch.ones(1))
        if args.rank == 1:
            os.kill(os.getpid(), signal.SIGSTOP)
        dist.all_reduce(torch.ones(1))
    print("not reached", flush=True)
""")


def test_a_stopped_rank_ends_the_job_with_a_message_naming_it(tmp_path):
    def launch(port: int) -> subprocess.CompletedProcess:
        ready = tmp_path / f"ready_{port}"  # the import barrier's folder, one per try
        ready.mkdir()
        launcher = tmp_path / f"stall_{port}.py"
        launcher.write_text(STALL_LAUNCHER.format(root=str(ROOT), folder=str(ready)))
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
               "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, str(launcher), "--dist_timeout", "0.05"],
                                  env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for r in (0, 1)]
        try:
            start = time.time()
            out, err = procs[0].communicate(timeout=120)
            elapsed.append(time.time() - start)
        finally:
            procs[1].kill()  # SIGKILL also ends a stopped process
            procs[1].wait()
            procs[0].kill()
        return subprocess.CompletedProcess(launcher, procs[0].returncode, out, err)

    elapsed = []
    proc = on_free_port(launch)
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 1, out + err
    assert "rank 0/2: a collective operation failed" in err
    assert "rank(s) [1] did not answer" in err and "--dist_timeout 0.05" in err
    assert "not reached" not in out
    assert elapsed[-1] < 60


@pytest.mark.parametrize("program", ["eval_knn.py", "train_ssl.py"])
def test_torchruns_closing_summary_names_the_error(tmp_path, program):
    """The launch scripts run torchrun, whose summary is the last thing a user sees: it must carry the error
    (here: a list folder that does not exist), not `error_file: <N/A>` and a link to the docs."""
    missing = tmp_path / "no lists"
    data = (["--data_path", str(missing)] if program == "train_ssl.py"
            else ["--pretrained_weights", str(tmp_path / "c.pth"), "--opts", "DATA.PATH_TO_DATA_DIR", str(missing)])
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                          str(ROOT / program), "--output_dir", str(tmp_path / "out"), *data],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 1
    summary = (run.stdout + run.stderr).rsplit("Root Cause", 1)[-1]
    assert "FileNotFoundError" in summary and str(missing) in summary, summary
    assert "<N/A>" not in summary


def test_dist_timeout_reaches_the_process_group_and_nccl_error_handling_is_on(monkeypatch):
    seen = {}

    def fake_init(backend, **kwargs):
        seen.update(kwargs)
        raise _Stop

    class _Stop(Exception):
        pass

    monkeypatch.setattr(utils, "is_dist_avail_and_initialized", lambda: False)
    monkeypatch.setattr(utils.dist, "init_process_group", fake_init)
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "")  # restored after the test
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING")
    args = train_ssl.get_args_parser().parse_args(["--dist_timeout", "7.5"])
    with pytest.raises(_Stop):
        utils.init_distributed_mode(args)
    assert seen["timeout"].total_seconds() == 450
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert train_ssl.get_args_parser().parse_args([]).dist_timeout == 30


# ---------------------------------------------------------------------------------------------
# Divergence and resume guards (in-process tiny runs)
# ---------------------------------------------------------------------------------------------
def _train_here(monkeypatch, argv: list[str]) -> None:
    monkeypatch.setattr(train_ssl, "build_backbone", functools.partial(models.build_backbone, embed_dim=48,
                                                                       num_heads=2))
    train_ssl.train_svt(train_ssl.get_args_parser().parse_args(argv))


def _set_flag(argv: list[str], flag: str, value: str) -> list[str]:
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


def test_nonfinite_weights_are_never_saved_and_the_run_continues_in_a_fresh_dir(synthetic_root, tmp_path,
                                                                                  monkeypatch, capsys):
    out = tmp_path / "run"
    argv = _tiny_argv(synthetic_root, out)
    real_ema, calls = train_ssl.ema_update, []

    def nan_teacher_at_step_4(teacher_params, student_params, m):  # the loss of step 4 is still finite
        real_ema(teacher_params, student_params, m)
        calls.append(1)
        if len(calls) == 4:
            teacher_params[0].fill_(float("nan"))

    monkeypatch.setattr(train_ssl, "ema_update", nan_teacher_at_step_4)
    with pytest.raises(SystemExit) as exc:
        _train_here(monkeypatch, argv)
    assert exc.value.code == 1
    msg = capsys.readouterr().out
    assert "Non-finite weights before saving epoch 1 iteration 0" in msg and "teacher.backbone.cls_token" in msg
    assert f"--resume_from {out / 'checkpoint.pth'}" in msg and "Do not rerun in this --output_dir" in msg
    ckpt = safe_torch_load(out / "checkpoint.pth")
    assert (ckpt["epoch"], ckpt["iteration"]) == (0, 2)  # the mid-epoch one, untouched
    assert all(torch.isfinite(v).all() for v in ckpt["teacher"].values())
    assert not (out / "log.txt").exists() and not list(out.glob("*.tmp"))
    monkeypatch.setattr(train_ssl, "ema_update", real_ema)

    # Another model in the same --output_dir: an error naming the flag, not a raw state_dict error.
    with pytest.raises(ValueError, match=r"--out_dim 64 \(this run: 32\).*use a new --output_dir"):
        _train_here(monkeypatch, _set_flag(argv, "--out_dim", "32"))

    # A fresh --output_dir continues from it (weights, optimizer, epoch and iteration).
    fresh = tmp_path / "fresh"
    fresh_argv = _set_flag(_set_flag(argv, "--output_dir", str(fresh)), "--epochs", "1")
    opts = fresh_argv.index("--opts")
    _train_here(monkeypatch, fresh_argv[:opts] + ["--resume_from", str(out / "checkpoint.pth")] + fresh_argv[opts:])
    resumed = safe_torch_load(fresh / "checkpoint.pth")
    assert (resumed["epoch"], resumed["iteration"]) == (1, 0)
    assert [json.loads(line)["epoch"] for line in (fresh / "log.txt").read_text().splitlines()] == [0]


# ---------------------------------------------------------------------------------------------
# Output reaches a pipe or file line by line: what an entry point printed survives a kill -9
# ---------------------------------------------------------------------------------------------
FLUSH_RUNNER = textwrap.dedent("""
    # Runs each entry point by path as __main__ (tests/forked_runs.py: one forked child per job, its stdout a log
    # file), its process group set-up replaced by a print and a SIGKILL. argv[1]: a JSON list of
    # [unused, log file, [script, output dir]]; prints the exit statuses.
    import json, os, runpy, signal, sys
    sys.path.insert(0, {root!r})
    import eval_finetune, eval_knn, eval_linear, train_ssl  # what they import (torch, ...), once for every child
    from tests.forked_runs import run_forked
    from utils import utils

    def dies_after_init(args):
        print("printed before the kill")
        os.kill(os.getpid(), signal.SIGKILL)

    def child(unused, argv):
        utils.init_distributed_mode = dies_after_init
        sys.argv = [argv[0], "--output_dir", argv[1]]
        runpy.run_path(argv[0], run_name="__main__")

    print(json.dumps(run_forked(json.loads(sys.argv[1]), child)))
""")


def test_entry_points_flush_each_line_before_a_kill(tmp_path):
    """Each entry point's command line, its output a file and Python not told to leave it unbuffered
    (PYTHONUNBUFFERED, which the launch scripts set, cleared): a line printed right before a kill -9 is there."""
    scripts = ["train_ssl.py", "eval_knn.py", "eval_linear.py", "eval_finetune.py"]
    logs = [tmp_path / f"{script}.log" for script in scripts]
    statuses = run_jobs(FLUSH_RUNNER, tmp_path, [("", log, [str(ROOT / script), str(tmp_path / "out")])
                                                 for script, log in zip(scripts, logs)],
                        env={"PYTHONUNBUFFERED": ""})
    for script, status, log in zip(scripts, statuses, logs):
        assert status == -signal.SIGKILL, f"{script}: {log.read_text()[-3000:]}"
        assert "printed before the kill" in log.read_text(), script


def test_sequential_video_flags_round_trip_through_a_checkpoint_and_ignore_another_list():
    from types import SimpleNamespace
    from datasets.video_dataset import checkpoint_sequential_videos, restore_sequential_videos
    saved_from = SimpleNamespace(sequential_videos=torch.tensor([0, 1, 0, 1, 1], dtype=torch.int32))
    saved = checkpoint_sequential_videos(SimpleNamespace(dataset=saved_from))  # a wrapper (DeviceViewLoader) too
    assert saved == {"num_videos": 5, "indices": [1, 3, 4]}
    resumed = SimpleNamespace(sequential_videos=torch.zeros(5, dtype=torch.int32))
    assert restore_sequential_videos(resumed, saved) and resumed.sequential_videos.tolist() == [0, 1, 0, 1, 1]
    other_list = SimpleNamespace(sequential_videos=torch.zeros(4, dtype=torch.int32))
    assert not restore_sequential_videos(other_list, saved) and other_list.sequential_videos.sum() == 0
    assert not restore_sequential_videos(resumed, None)  # a checkpoint written before the flags were kept
