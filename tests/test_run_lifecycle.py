"""The lifecycle of a pretraining run's --output_dir (train_ssl.py): what a start checks before it writes anything
(the checkpoint it resumes, the folder it starts in), how a resume keeps log.txt and the config files of the run
consistent, and the notes it prints for what changed since the checkpoint. Tiny runs on the synthetic videos."""
import io
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import log_records
from tests.test_train import _argv, _train
from utils import run_dir, utils
from utils.checkpoint import IncompleteFileError, safe_torch_load


@pytest.fixture(scope="module")
def finished(synthetic_root, tmp_path_factory) -> Path:
    """A finished 2-epoch run (4 steps each) with a numbered checkpoint after each epoch."""
    out = tmp_path_factory.mktemp("finished")
    mp = pytest.MonkeyPatch()
    try:
        _train(mp, _argv(synthetic_root, out, "--saveckp_freq", "1"))
    finally:
        mp.undo()
    return out


def copy_run(finished: Path, tmp_path: Path) -> Path:
    """A copy of the `finished` run's folder to change (its lock file left out)."""
    return Path(shutil.copytree(finished, tmp_path / "run", ignore=shutil.ignore_patterns(".lock")))


def written(folder: Path) -> list[str]:
    """What a run wrote into `folder`, but the lock file every start takes."""
    return sorted(p.name for p in folder.iterdir() if p.name != ".lock")


def test_resume_from_a_weights_only_file_is_refused_before_anything_is_written(finished, synthetic_root, tmp_path,
                                                                             monkeypatch):
    """The released file's layout (a flat teacher state dict) has no training state: --resume_from it trained on
    from random weights; now it is an error naming the flag that initialises from weights."""
    flat = tmp_path / "flat_teacher.pth"
    torch.save(safe_torch_load(finished / "checkpoint.pth")["teacher"], flat)
    out = tmp_path / "new"
    with pytest.raises(ValueError, match=rf"{flat} is not a train_ssl.py training checkpoint: it has no student / "
                                         rf"teacher / optimizer entry \(it is a flat state dict of \d+ tensors: weights "
                                         rf"only, as the released kinetics400_vitb_ssl.pth\), so there is no training "
                                         rf"to continue from it. To start a pretraining from its weights, pass "
                                         rf"--pretrained_rgb {flat} "):
        _train(monkeypatch, _argv(synthetic_root, out, "--resume_from", str(flat)))
    assert written(out) == []
    # the flag it names takes the file: a new run starts from those weights
    _train(monkeypatch, _argv(synthetic_root, out, "--pretrained_rgb", str(flat), "--epochs", "1"))
    assert [r["epoch"] for r in log_records(out)] == [0]


def test_an_own_checkpoint_of_another_program_is_refused_and_left_as_it_is(synthetic_root, tmp_path, monkeypatch):
    """A fine-tuning checkpoint.pth (model_state, epoch 2) in --output_dir was "resumed" at epoch 2 from random
    weights and overwritten; now the run stops, and the folder keeps its files as they were."""
    out = tmp_path / "ft"
    out.mkdir()
    torch.save({"model_state": {"head.weight": torch.zeros(3, 4)}, "epoch": 2}, out / "checkpoint.pth")
    (out / "config.txt").write_text("the fine-tuning's\n")
    before = (out / "checkpoint.pth").read_bytes()
    with pytest.raises(ValueError, match=rf"{out / 'checkpoint.pth'} is not a train_ssl.py training checkpoint: it "
                                         r"has no student / teacher / optimizer entry \(it holds model_state: the "
                                         rf"weights of a TimeSformer or eval_finetune.py model\), so --output_dir "
                                         rf"{out} is another program's folder; .* Pass another --output_dir."):
        _train(monkeypatch, _argv(synthetic_root, out))
    assert (out / "checkpoint.pth").read_bytes() == before
    assert (out / "config.txt").read_text() == "the fine-tuning's\n"
    assert written(out) == ["checkpoint.pth", "config.txt"]


def test_another_optimizer_on_resume_is_an_error_before_anything_loads(finished, synthetic_root, tmp_path,
                                                                     monkeypatch, capsys):
    """--optimizer is a model flag: SGD loaded AdamW's state without complaint and crashed at the first step with a
    bare KeyError: 'momentum'. Now the flags are compared first; the folder's config stays the run's."""
    out = copy_run(finished, tmp_path)
    config = (out / "config.txt").read_text()
    with pytest.raises(ValueError, match=r"checkpoint.pth is a checkpoint of other model flags.\nThat checkpoint was "
                                         r"written by another model: --optimizer adamw \(this run: sgd\). Resume with "
                                         r"the same flags, or use a new --output_dir"):
        _train(monkeypatch, _argv(synthetic_root, out, "--optimizer", "sgd", "--epochs", "3"))
    assert "Resuming from" not in capsys.readouterr().out
    assert (out / "config.txt").read_text() == config


def test_a_resume_from_an_older_checkpoint_sets_the_later_log_lines_aside(finished, synthetic_root, tmp_path,
                                                                        monkeypatch, capsys):
    """checkpoint0000.pth (after epoch 0) copied over checkpoint.pth of the finished run: the rerun trains epoch 1
    again. log.txt had [0, 1, 1]; now the old epoch-1 line goes to log.txt.before_resume and log.txt ends as the
    uninterrupted run's."""
    out = copy_run(finished, tmp_path)
    shutil.copy(out / "checkpoint0000.pth", out / "checkpoint.pth")
    old_line = (out / "log.txt").read_text().splitlines(keepends=True)[1]
    _train(monkeypatch, _argv(synthetic_root, out, "--saveckp_freq", "1"))
    assert (f"Note: this run resumes at epoch 1, but {out / 'log.txt'} has lines of epochs [1] (of a run that went "
            f"on past the checkpoint resumed): moved them to {out / 'log.txt.before_resume'}, so that log.txt holds "
            "each epoch once.") in capsys.readouterr().out
    assert log_records(out) == log_records(finished)
    assert (out / "log.txt.before_resume").read_text() == old_line


def test_a_start_from_scratch_in_another_runs_folder_is_refused(finished, synthetic_root, tmp_path, monkeypatch):
    """checkpoint.pth deleted from a finished run's folder: the rerun started from scratch, appended epochs [0, 1]
    to its log.txt and overwrote its numbered checkpoints; --resume_from another folder's checkpoint there did the
    same with that run's epochs. Now both stop naming the folder and the ways on: the newest numbered checkpoint
    that reads (checkpoint0001.pth is cut here; it was named all the same), which continues the run, or deleting
    what the run left."""
    out = copy_run(finished, tmp_path)
    (out / "checkpoint.pth").unlink()
    data = (out / "checkpoint0001.pth").read_bytes()
    (out / "checkpoint0001.pth").write_bytes(data[:len(data) // 2])
    files = {name: (out / name).read_bytes() for name in written(out) if name != "tb"}
    foreign = copy_run(finished, tmp_path / "other") / "checkpoint0000.pth"
    for extra, start, run in (([], "starting from scratch", "a new run"),
                              (["--resume_from", str(foreign)], f"continuing --resume_from {foreign}", "this run")):
        with pytest.raises(FileExistsError, match=rf"^--output_dir {out} holds another run \(log.txt, "
                                                  r"checkpoint0000.pth, checkpoint0001.pth\) but no checkpoint.pth to "
                                                  rf"resume: {start} there would append to its log.txt, overwrite "
                                                  r"its numbered checkpoints and add this run's curves to its tb/\. "
                                                  rf"Pass another --output_dir for {run}, or "
                                                  r"continue that run from its newest readable numbered checkpoint "
                                                  rf"with --resume_from {out / 'checkpoint0000.pth'} \(it resumes at "
                                                  r"epoch 1: the epochs from 1 on are trained again\), or delete its "
                                                  rf"log.txt, checkpointNNNN.pth files, tb/ to start {run} there.$"):
            _train(monkeypatch, _argv(synthetic_root, out, "--saveckp_freq", "1", *extra))
        assert {name: (out / name).read_bytes() for name in files} == files
    _train(monkeypatch, _argv(synthetic_root, out, "--saveckp_freq", "1", "--resume_from",
                              str(out / "checkpoint0000.pth")))
    assert log_records(out) == log_records(finished)


def test_the_newest_readable_numbered_checkpoint_is_found_without_reading_the_tensors(tmp_path, monkeypatch):
    """Both refusals name the newest numbered checkpoint that reads, and its epoch; the damaged-checkpoint one
    loaded each numbered checkpoint in full (~1 GB for ViT-B + AdamW) on every rank just for the epoch. Now the
    files are memory-mapped (torch.load's mmap=True): only their pickles are read."""
    torch.save({"epoch": 1, "student": torch.ones(3)}, tmp_path / "checkpoint0000.pth")
    torch.save({"epoch": 2, "student": torch.ones(3)}, tmp_path / "checkpoint0001.pth")
    data = (tmp_path / "checkpoint0001.pth").read_bytes()
    (tmp_path / "checkpoint0001.pth").write_bytes(data[:-30])  # its end (the zip's directory) is cut
    torch.save({"student": torch.ones(3)}, tmp_path / "checkpoint0002.pth")  # no epoch: not a training checkpoint
    loads, torch_load = [], torch.load

    def spy(*args, **kwargs):
        loaded = torch_load(*args, **kwargs)
        loads.append((kwargs.get("mmap"), loaded))
        return loaded

    monkeypatch.setattr(torch, "load", spy)
    assert run_dir.newest_readable_checkpoint(tmp_path) == (tmp_path / "checkpoint0000.pth", 1)
    assert [mmap for mmap, _ in loads] == [True, True]  # 0002 and 0000 (0001 fails before torch.load returns)
    assert str(tmp_path / "checkpoint0000.pth") in Path("/proc/self/maps").read_text()  # mapped (spy holds it)
    assert run_dir.newest_readable_checkpoint(tmp_path / "empty") is None


def test_a_partial_last_log_line_is_dropped_at_any_start(finished, synthetic_root, tmp_path, monkeypatch, capsys):
    """A log.txt cut mid-line, resumed from a checkpoint without an epoch record (as a mid-epoch one): the next
    record was glued onto the partial line, and every later start failed with a bare JSONDecodeError."""
    out = copy_run(finished, tmp_path)
    first, second = (out / "log.txt").read_text().splitlines(keepends=True)
    (out / "log.txt").write_text(first + second[:20])
    checkpoint = safe_torch_load(out / "checkpoint0000.pth")
    torch.save({**checkpoint, "epoch_log": None}, out / "checkpoint.pth")
    _train(monkeypatch, _argv(synthetic_root, out, "--saveckp_freq", "1"))
    assert (f"Note: {out / 'log.txt'} ended with a partial line (the run was killed while writing it); dropped: "
            f"{second[:20]!r}") in capsys.readouterr().out
    assert log_records(out) == log_records(finished)


def test_a_log_line_that_is_not_a_record_is_skipped_with_a_note(finished, synthetic_root, tmp_path, monkeypatch,
                                                                capsys):
    """A line glued by an earlier version (partial line + record) in the log an epoch-end resume reads: it stopped
    every start with a JSONDecodeError; now it is skipped with a note naming log.txt and the line."""
    out = copy_run(finished, tmp_path)
    first, second = (out / "log.txt").read_text().splitlines(keepends=True)
    (out / "log.txt").write_text(first + second[:20] + second)
    shutil.copy(out / "checkpoint0000.pth", out / "checkpoint.pth")
    _train(monkeypatch, _argv(synthetic_root, out, "--saveckp_freq", "1"))
    assert f"Note: {out / 'log.txt'}:2 is not a JSON record, skipped: " in capsys.readouterr().out
    lines = (out / "log.txt").read_text().splitlines()
    assert lines[:2] == [first.strip(), (second[:20] + second).strip()] and json.loads(lines[2])["epoch"] == 1


def test_a_damaged_own_checkpoint_names_the_newest_readable_numbered_one(finished, synthetic_root, tmp_path,
                                                                       monkeypatch):
    """A truncated checkpoint.pth got the download advice ("re-download or re-copy it"), and --resume_from a
    numbered one did not help (the own checkpoint is tried first). Now the error says it is damaged and how to go
    on from the newest numbered checkpoint that reads (checkpoint0001.pth is cut too here); that recipe works."""
    out = copy_run(finished, tmp_path)
    for name in ("checkpoint.pth", "checkpoint0001.pth"):
        data = (out / name).read_bytes()
        (out / name).write_bytes(data[:len(data) // 2])
    numbered, own = out / "checkpoint0000.pth", out / "checkpoint.pth"
    for extra in ([], ["--resume_from", str(numbered)]):
        with pytest.raises(IncompleteFileError, match=rf"^{own} is damaged: it is not a complete torch.save file. .* "
                                                      r"without an atomic rename, or the file was cut by a copy. The "
                                                      rf"newest readable numbered checkpoint is {numbered}, which "
                                                      rf"resumes at epoch 1: move the damaged file aside \(mv {own} "
                                                      rf"{own}.damaged\) and rerun with --resume_from {numbered} "):
            _train(monkeypatch, _argv(synthetic_root, out, "--saveckp_freq", "1", *extra))
    own.rename(out / "checkpoint.pth.damaged")
    _train(monkeypatch, _argv(synthetic_root, out, "--saveckp_freq", "1", "--resume_from", str(numbered)))
    assert log_records(out) == log_records(finished)
    assert not list(out.glob("tb.*"))  # the run goes on: its curves stay in tb/


def test_resume_from_beside_a_loading_own_checkpoint_is_noted_as_ignored(finished, synthetic_root, tmp_path,
                                                                        monkeypatch, capsys):
    out = copy_run(finished, tmp_path)
    numbered = out / "checkpoint0000.pth"
    _train(monkeypatch, _argv(synthetic_root, out, "--saveckp_freq", "1", "--resume_from", str(numbered)))
    assert (f"Note: --resume_from {numbered} is ignored: {out / 'checkpoint.pth'} is there and loads, and a run's own "
            "checkpoint always wins (move it aside to continue from the other file).") in capsys.readouterr().out
    assert log_records(out) == log_records(finished)


def test_a_resume_notes_each_changed_flag_and_keeps_the_earlier_config(finished, synthetic_root, tmp_path,
                                                                      monkeypatch, capsys):
    """The finished 2-epoch run resumed with --epochs 3 and another --lr and --seed: each change gets a note (the
    schedules recomputed for 3 epochs, the lr where it goes on), a flag that cannot matter (--log_freq) none, and
    the config.txt of the first start is kept beside this one's (it was overwritten at every start)."""
    out = copy_run(finished, tmp_path)
    _train(monkeypatch, _argv(synthetic_root, out, "--saveckp_freq", "1", "--epochs", "3", "--lr", "0.1",
                              "--seed", "1", "--log_freq", "1"))
    printed = capsys.readouterr().out
    lr_now = utils.cosine_scheduler(0.1 * 4 / 256, 1e-6, 3, 4, warmup_epochs=1)[2 * 4]
    assert ("Note: --epochs 3 on resume, where the checkpoint's run had 2: this run goes on with 3. The lr, weight "
            "decay, teacher momentum and teacher temperature schedules are recomputed for 3 epochs (as DINO's resume "
            f"does): the lr goes on at {lr_now:.3g}, on the new schedule (after a finished run it jumps back "
            "up).") in printed
    assert "Note: --lr 0.1 on resume, where the checkpoint's run had 0.05: this run goes on with 0.1." in printed
    assert "Note: --seed 1 on resume, where the checkpoint's run had 0: this run goes on with 1." in printed
    assert "--log_freq 1 on resume" not in printed
    assert [r["epoch"] for r in log_records(out)] == [0, 1, 2]
    (kept,) = out.glob("config.*.txt")
    assert json.loads(kept.read_text()) == json.loads((finished / "config.txt").read_text())
    assert json.loads((out / "config.txt").read_text())["lr"] == 0.1
    assert f"Note: {out / 'config.txt'} of an earlier start differs from this one's: kept as {kept.name}." in printed
    assert not list(out.glob("config.*.yaml"))  # the same config.yaml: nothing to keep


@pytest.mark.parametrize("epochs", ["2", "1"])
def test_a_finished_run_says_so_and_trains_nothing(finished, synthetic_root, tmp_path, monkeypatch, capsys, epochs):
    """A rerun of the finished 2-epoch run with the same or a smaller --epochs ("SVT pretraining from epoch 2 to
    1.") trains nothing, says the run is finished and returns (the command line exits 0); its files stay as
    they were."""
    out = copy_run(finished, tmp_path)
    files = {name: (out / name).read_bytes() for name in written(out) if name != "tb"}
    _train(monkeypatch, _argv(synthetic_root, out, "--saveckp_freq", "1", "--epochs", epochs))
    printed = capsys.readouterr().out
    assert (f"The run in {out} is already finished (at epoch 2 of 2): nothing to train. To train on, pass a larger "
            "--epochs (the schedules are then recomputed for the new length).") in printed
    assert "SVT pretraining from" not in printed and "Epoch: [" not in printed and "Note: --epochs" not in printed
    assert {name: (out / name).read_bytes() for name in written(out) if name != "tb"} == files


def test_resume_from_a_finished_run_into_another_folder_names_the_file(finished, synthetic_root, tmp_path,
                                                                       monkeypatch, capsys):
    """--output_dir NEW --resume_from a finished run's checkpoint.pth said "The run in NEW is already finished":
    NEW holds no run; the message names the file resumed."""
    out = tmp_path / "new"
    _train(monkeypatch, _argv(synthetic_root, out, "--resume_from", str(finished / "checkpoint.pth")))
    assert (f"The run of --resume_from {finished / 'checkpoint.pth'} is already finished (at epoch 2 of 2): nothing "
            "to train.") in capsys.readouterr().out
    assert not (out / "log.txt").exists() and not list(out.glob("checkpoint*"))


def test_another_global_batch_at_an_epoch_boundary_is_noted_with_the_rescaled_lr(finished, synthetic_root,
                                                                                  tmp_path, monkeypatch, capsys):
    """The finished run (batch 4) resumed for a third epoch with batch 2: the note said "the mid-epoch checkpoint
    ... 0 videos of epoch 2 were done"; now it names the epoch boundary, and the lr rescaling is said."""
    out = copy_run(finished, tmp_path)
    _train(monkeypatch, _argv(synthetic_root, out, "--saveckp_freq", "1", "--epochs", "3", "--batch_size_per_gpu",
                              "2"))
    printed = capsys.readouterr().out
    assert ("Note: the checkpoint was written at an epoch boundary with a global batch of 4 videos (1 process x 4), "
            "this run 2: epoch 2 runs with the new batch from its start.") in printed
    assert ("Note: the lr is rescaled for the new global batch: --lr x global batch / 256 = 0.05 x 2 / 256 = "
            "0.000391 at the peak (the checkpoint's run: 0.05 x 4 / 256 = 0.000781).") in printed
    assert "mid-epoch" not in printed and "--batch_size_per_gpu 2 on resume" not in printed


class Killed(BaseException):
    """The process killed at that point (no handler of ours catches a BaseException)."""


def test_a_kill_between_the_two_log_writes_moves_each_line_aside_once(tmp_path, monkeypatch):
    """A resume at epoch 1 moves log.txt's epoch-1 and -2 lines to log.txt.before_resume, then rewrites log.txt.
    Killed in between, the next start moved those lines again: log.txt.before_resume held them twice."""
    lines = [json.dumps({"epoch": epoch, "train_loss": 5.0 - epoch}) + "\n" for epoch in range(3)]
    (tmp_path / "log.txt").write_text("".join(lines))
    os_replace = os.replace

    def killed_at_the_log_rename(src, dst):
        if Path(dst).name == "log.txt":
            raise Killed
        os_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_the_log_rename)
    with pytest.raises(Killed):
        run_dir.tidy_epoch_log(tmp_path, 1)
    monkeypatch.setattr(os, "replace", os_replace)
    run_dir.tidy_epoch_log(tmp_path, 1)
    assert (tmp_path / "log.txt").read_text() == lines[0]
    assert (tmp_path / "log.txt.before_resume").read_text() == "".join(lines[1:])
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_kill_while_a_config_file_is_written_leaves_no_partial_one(tmp_path, monkeypatch):
    """A start whose config differs keeps the earlier config.txt aside, then writes its own. Killed mid-write, it
    left a partial config.txt, which the next start kept as an earlier start's config."""
    (tmp_path / "config.txt").write_text('{"lr": 0.1}\n')
    io_open = io.open

    def dying_open(file, mode="r", *args, **kwargs):
        opened = io_open(file, mode, *args, **kwargs)
        if "w" not in mode:
            return opened

        class Dying:  # writes half of what it is given, then the process dies
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                opened.close()

            def write(self, data):
                opened.write(data[:len(data) // 2])
                opened.flush()
                raise Killed

        return Dying()

    monkeypatch.setattr(io, "open", dying_open)
    with pytest.raises(Killed):
        run_dir.write_config_files(tmp_path, {"config.txt": '{"lr": 0.2}\n'})
    monkeypatch.setattr(io, "open", io_open)
    run_dir.write_config_files(tmp_path, {"config.txt": '{"lr": 0.2}\n'})
    assert (tmp_path / "config.txt").read_text() == '{"lr": 0.2}\n'
    assert [p.read_text() for p in tmp_path.glob("config.*.txt")] == ['{"lr": 0.1}\n']


def test_the_refusal_names_every_file_a_restart_in_place_must_delete(tmp_path):
    """Deleting what the refusal lists must leave nothing of the old run: its log.txt.before_resume too, or a new
    run's set-aside lines would be appended to the old run's."""
    (tmp_path / "log.txt").write_text('{"epoch": 0}\n')
    (tmp_path / "log.txt.before_resume").write_text('{"epoch": 1}\n')
    with pytest.raises(FileExistsError, match=r"or delete its log.txt, log.txt.before_resume to start a new run "
                                              r"there.$"):
        run_dir.check_fresh_start(tmp_path)


def test_a_start_killed_before_its_first_checkpoint_leaves_its_curves_apart_from_the_rerun(synthetic_root, tmp_path,
                                                                                         monkeypatch):
    """train_ssl.py killed at its first checkpoint: the rerun from scratch in that folder added its event file to
    the killed start's tb/ (TensorBoard showed both starts' curves as one run). Now they move to tb.<time>/."""
    import train_ssl
    out = tmp_path / "out"
    argv = _argv(synthetic_root, out, "--epochs", "1")

    def killed(*args, **kwargs):
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(train_ssl, "atomic_save", killed)
        with pytest.raises(Killed):
            _train(m, argv)
    killed_events = {p.name: p.read_bytes() for p in (out / "tb").iterdir()}
    assert len(killed_events) == 1 and not (out / "checkpoint.pth").exists()
    _train(monkeypatch, argv)
    aside = [p for p in out.iterdir() if p.name.startswith("tb.")]
    assert len(aside) == 1 and {p.name: p.read_bytes() for p in aside[0].iterdir()} == killed_events
    own = list((out / "tb").iterdir())
    assert len(own) == 1 and own[0].name not in killed_events


def test_earlier_curves_move_to_a_folder_named_in_utc_after_the_newest_and_never_onto_another(tmp_path, monkeypatch,
                                                                                               capsys):
    """set_aside_tensorboard: only the event files move, to tb.<UTC time of the newest one> whatever the machine's
    time zone; earlier starts killed in the same second each get a folder of their own; no event file, no folder."""
    assert run_dir.set_aside_tensorboard(tmp_path) is None
    tb = tmp_path / "tb"
    tb.mkdir()
    (tb / "notes.txt").write_text("not a curve")
    assert run_dir.set_aside_tensorboard(tmp_path) is None and os.listdir(tmp_path) == ["tb"]
    newest = 1767229384  # 2026-01-01 01:03:04 UTC

    def killed_start(k: int) -> list[str]:
        names = [f"events.out.tfevents.{k}.a", f"events.out.tfevents.{k}.b"]
        for name, mtime in zip(names, (newest, newest - 3600)):
            (tb / name).write_bytes(name.encode())
            os.utime(tb / name, (mtime, mtime))
        return names

    monkeypatch.setenv("TZ", "Asia/Kolkata")  # UTC+5:30: a local time would name another hour
    time.tzset()
    try:
        for k, suffix in enumerate(["", "-1", "-2"]):
            names = killed_start(k)
            assert run_dir.set_aside_tensorboard(tmp_path) == tmp_path / f"tb.20260101T010304Z{suffix}"
            assert sorted(os.listdir(tmp_path / f"tb.20260101T010304Z{suffix}")) == names
            assert os.listdir(tb) == ["notes.txt"]
    finally:
        monkeypatch.undo()
        time.tzset()
    assert f"moved them to {tmp_path / 'tb.20260101T010304Z-2'}, so that {tb} holds this run's alone" in \
        capsys.readouterr().out
