"""A full disk or an output folder made read-only while a run writes: nothing already written is lost, no temporary
file stays behind, and the error names the file, its folder and the cause in words (README "Reliability"). The
faults are injected where the OS would raise them: a file write that raises OSError(ENOSPC) under a real torch.save
(which reports it as a RuntimeError), an os.open / open that raises PermissionError(EACCES)."""
import argparse
import errno
import functools
import json
import os
import re

import pytest
import torch
import torch.distributed as dist

import eval_knn
import models
import train_ssl
from tests.test_eval_e2e import OPTS, _data_opts, linear
from tests.test_train import TINY_BACKBONE
from utils import utils
from utils.parser import load_config_from
from utils.checkpoint import atomic_save, atomic_write_text

REAL_SAVE = torch.save


class FullDisk:
    """A file object over `f` that takes `room` bytes, then raises ENOSPC as the kernel does."""

    def __init__(self, f, room: int = 100):
        self.f, self.room = f, room

    def write(self, data) -> int:
        if len(data) > self.room:
            self.f.write(bytes(data[:self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def save_to_a_full_disk(obj, f, *args, **kwargs):
    REAL_SAVE(obj, FullDisk(f), *args, **kwargs)


def denied_tmp(real_open):
    def os_open(path, *args, **kwargs):
        if str(path).endswith(".tmp"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real_open(path, *args, **kwargs)
    return os_open


def test_a_full_disk_during_a_checkpoint_write_names_the_folder_and_keeps_the_previous_checkpoint(tmp_path,
                                                                                                    monkeypatch):
    path = tmp_path / "checkpoint.pth"
    atomic_save({"epoch": 3, "w": torch.ones(1000)}, path)
    monkeypatch.setattr(torch, "save", save_to_a_full_disk)
    with pytest.raises(OSError, match=rf"^{re.escape(str(path))}: could not be written \(the disk of "
                                      rf"{re.escape(str(tmp_path))} is full: No space left on device\); the previous "
                                      rf"checkpoint.pth is intact\. Free space in {re.escape(str(tmp_path))} "
                                      rf"\(df -h {re.escape(str(tmp_path))}\) and run the same command again"):
        atomic_save({"epoch": 4, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["checkpoint.pth"]  # no temporary file
    assert torch.load(path, weights_only=True)["epoch"] == 3


def test_a_folder_made_read_only_names_it_instead_of_the_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "log.txt"
    atomic_write_text("earlier\n", path)
    monkeypatch.setattr(os, "open", denied_tmp(os.open))
    with pytest.raises(OSError, match=rf"^{re.escape(str(path))}: could not be written \({re.escape(str(tmp_path))} "
                                      r"is not writable: Permission denied\); the previous log.txt is intact\. Make "
                                      rf"{re.escape(str(tmp_path))} writable \(its permissions, a read-only mount\) "
                                      r"or pass another output folder"):
        atomic_write_text("later\n", path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["log.txt"] and path.read_text() == "earlier\n"


def test_a_folder_that_cannot_be_made_is_named_and_nothing_is_left(tmp_path, monkeypatch):
    def denied(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

    monkeypatch.setattr(os, "makedirs", denied)
    folder = tmp_path / "out"
    with pytest.raises(OSError, match=rf"^{re.escape(str(folder / 'log.txt'))}: could not be written \("
                                      rf"{re.escape(str(folder))} is not writable: Permission denied\); nothing was "
                                      r"written\."):
        atomic_write_text("later\n", folder / "log.txt")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("code, cause", [(errno.EDQUOT, "the disk of {} is full: Disk quota exceeded"),
                                         (errno.EROFS, "{} is not writable: Read-only file system"),
                                         (errno.EPERM, "{} is not writable: Operation not permitted")])
def test_a_quota_or_a_read_only_mount_is_named_in_words_with_the_absolute_folder(tmp_path, monkeypatch, code, cause):
    """A cluster's disk quota is a full disk, a read-only mount or a refused operation a folder not writable; a file
    named relative to the working folder (here: in it) is named with its folder's absolute path."""
    monkeypatch.chdir(tmp_path)
    err = RuntimeError("torch.save failed")  # as torch.save reports the OSError of a write: its context
    err.__context__ = OSError(code, os.strerror(code))
    fault = utils.storage_fault("checkpoint.pth", err, "the previous checkpoint.pth is intact")
    assert fault.startswith(f"checkpoint.pth: could not be written ({cause.format(tmp_path)}); the previous "
                            "checkpoint.pth is intact. ")
    assert (f"df -h {tmp_path})" in fault) == (code == errno.EDQUOT)


def test_a_knn_dump_removes_the_temporary_files_of_a_killed_one(tmp_path):
    killed = [tmp_path / ".testfeat.pth.123.abcd1234.tmp", tmp_path / ".dump_record.json.123.abcd1234.tmp"]
    for path in killed:
        path.write_bytes(b"partial")
    tensors = (torch.ones(2, 3), torch.ones(1, 3), torch.zeros(2), torch.zeros(1))
    eval_knn.dump_features(str(tmp_path), tensors, {"num_train": 2})
    assert sorted(os.listdir(tmp_path)) == ["dump_record.json", "testfeat.pth", "testlabels.pth", "trainfeat.pth",
                                            "trainlabels.pth"]


class HalfWritten:
    """open(..., "a") of a file on a full disk: half of each write reaches the file, then ENOSPC."""

    def __init__(self, path, mode):
        self.f = open(path, mode)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, text: str):
        self.f.write(text[:len(text) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_failed_log_append_keeps_the_earlier_lines_whole_and_names_the_cause(tmp_path, monkeypatch):
    utils.write_epoch_log(tmp_path, {"epoch": 0, "train_loss": 1.5})
    before = (tmp_path / "log.txt").read_text()
    monkeypatch.setattr(utils, "open", HalfWritten, raising=False)
    log = re.escape(str(tmp_path / "log.txt"))
    with pytest.raises(OSError, match=rf"^{log}: could not be written \(the disk of {re.escape(str(tmp_path))} is "
                                      r"full: No space left on device\); its earlier lines are intact\. Free space"):
        utils.write_epoch_log(tmp_path, {"epoch": 1, "train_loss": 1.25})
    assert (tmp_path / "log.txt").read_text() == before  # no partial line for the next start to drop

    def not_writable(path, mode):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

    monkeypatch.setattr(utils, "open", not_writable, raising=False)
    with pytest.raises(OSError, match=rf"^{log}: could not be written \({re.escape(str(tmp_path))} is not writable: "
                                      r"Permission denied\); its earlier lines are intact\. Make"):
        utils.write_epoch_log(tmp_path, {"epoch": 1, "train_loss": 1.25})
    monkeypatch.undo()
    assert (tmp_path / "log.txt").read_text() == before and os.listdir(tmp_path) == ["log.txt"]


def test_a_failed_first_log_append_leaves_no_log(tmp_path, monkeypatch):
    """The disk fills at the first line of a new log.txt: the error says nothing was written, and so it is (a
    half line left in a new log.txt was glued to the next start's first line)."""
    monkeypatch.setattr(utils, "open", HalfWritten, raising=False)
    with pytest.raises(OSError, match=r"full: No space left on device\); nothing was written\. Free space"):
        utils.write_epoch_log(tmp_path, {"epoch": 0, "train_loss": 1.5})
    assert os.listdir(tmp_path) == []


def test_train_ssl_on_a_disk_that_fills_keeps_the_last_checkpoint_and_log(synthetic_root, tmp_path, monkeypatch):
    """Epoch 0 ends with its checkpoint and log line; the disk fills during epoch 1's checkpoint.pth: the run stops
    naming the folder and the cause, epoch 0's checkpoint (which the rerun resumes) and log line are intact."""
    out = tmp_path / "ssl"
    argv = ["--arch", "vit_tiny", "--out_dim", "64", "--batch_size_per_gpu", "4", "--epochs", "2",
            "--warmup_epochs", "0", "--local_crops_number", "2", "--num_workers", "0", "--use_fp16", "false",
            "--data_path", str(synthetic_root / "annotations"), "--output_dir", str(out),
            "--opts", "DATA.PATH_PREFIX", str(synthetic_root / "videos"), "DATA.NUM_FRAMES", "4",
            "DATA.SAMPLING_RATE", "2", "DATA.TRAIN_CROP_SIZE", "32", "DATA.LOCAL_CROP_SIZE", "16",
            "DATA.LOCAL_NUM_FRAMES", "[2, 4]"]
    monkeypatch.setattr(train_ssl, "build_backbone", functools.partial(models.build_backbone, **TINY_BACKBONE))
    saves = []

    def fills_at_epoch_1(obj, f, *args, **kwargs):
        saves.append(obj.get("epoch"))
        (save_to_a_full_disk if obj.get("epoch") == 2 else REAL_SAVE)(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fills_at_epoch_1)
    with pytest.raises(OSError, match=rf"^{re.escape(str(out / 'checkpoint.pth'))}: could not be written \(the disk "
                                      rf"of {re.escape(str(out))} is full: No space left on device\); the previous "
                                      r"checkpoint.pth is intact\."):
        train_ssl.train_svt(train_ssl.get_args_parser().parse_args(argv))
    monkeypatch.undo()
    if dist.is_initialized():
        dist.destroy_process_group()
    assert saves == [1, 2]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert torch.load(out / "checkpoint.pth", weights_only=False)["epoch"] == 1
    assert [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()] == [0]


def test_eval_linear_on_a_disk_that_fills_keeps_the_last_checkpoint_and_log(synthetic_root, tmp_path, monkeypatch):
    weights = tmp_path / "backbone.pth"
    torch.save(models.build_backbone("vit_tiny", load_config_from(None, OPTS)).state_dict(), weights)
    out = tmp_path / "le"
    args = ["--arch", "vit_tiny", "--pretrained_weights", str(weights), "--n_last_blocks", "1", "--epochs", "2",
            "--batch_size_per_gpu", "8", "--num_workers", "0", "--dataset", "ucf101", "--output_dir", str(out),
            "--opts"] + _data_opts(synthetic_root, "splits")

    def fills_at_epoch_1(obj, f, *a, **kw):
        (save_to_a_full_disk if obj.get("epoch") == 2 else REAL_SAVE)(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", fills_at_epoch_1)
    with pytest.raises(OSError, match=rf"^{re.escape(str(out / 'checkpoint.pth.tar'))}: could not be written \(the "
                                      rf"disk of {re.escape(str(out))} is full: No space left on device\); the "
                                      r"previous checkpoint.pth.tar is intact\."):
        linear(args)
    monkeypatch.undo()
    if dist.is_initialized():
        dist.destroy_process_group()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert torch.load(out / "checkpoint.pth.tar", weights_only=False)["epoch"] == 1
    assert [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()] == [0]


def test_a_knn_dump_on_a_full_disk_leaves_no_partial_file(synthetic_root, tmp_path, monkeypatch):
    """The disk fills while testfeat.pth is written: the files written before it are whole, none is partial (a
    truncated testfeat.pth would fail --load_features with a torch error, not the missing-file one), no temporary
    file stays, and the error names the dump folder and the cause."""
    feats = tmp_path / "feats"
    args = ["--arch", "vit_tiny", "--nb_knn", "1", "--batch_size_per_gpu", "8", "--num_workers", "0",
            "--use_cuda", "False", "--output_dir", str(tmp_path / "out"), "--dump_features", str(feats),
            "--opts"] + _data_opts(synthetic_root, "knn_splits")

    def fills_at_testfeat(obj, f, *a, **kw):
        (save_to_a_full_disk if obj.shape[0] == 8 and obj.ndim == 2 else REAL_SAVE)(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", fills_at_testfeat)
    with pytest.raises(OSError, match=rf"^{re.escape(str(feats / 'testfeat.pth'))}: could not be written \(the disk "
                                      rf"of {re.escape(str(feats))} is full: No space left on device\); nothing was "
                                      r"written\."):
        eval_knn.main(argparse.ArgumentParser(parents=[eval_knn.get_args_parser()]).parse_args(args))
    monkeypatch.undo()
    if dist.is_initialized():
        dist.destroy_process_group()
    assert sorted(os.listdir(feats)) == ["dump_record.json", "trainfeat.pth"]
    assert torch.load(feats / "trainfeat.pth", weights_only=True).shape == (16, 192)
    with pytest.raises(FileNotFoundError, match="testfeat.pth is missing"):
        eval_knn.load_dumped_features(str(feats))

