"""The output folder of eval_linear.py and eval_finetune.py across their starts, as train_ssl.py's
(tests/test_run_lifecycle.py): a start from scratch never writes into another run's folder, log.txt holds each epoch
once and no glued line, a damaged own checkpoint names the way on, which works, a kill between an epoch's
checkpoint and its log line loses no line, and the config files of an earlier start are kept."""
import json
import re
import shutil

import pytest
import torch
import torch.distributed as dist

from tests.conftest import log_records
from tests.test_eval_e2e import _data_opts, checkpoint, linear  # noqa: F401 (checkpoint: a fixture)
from tests.test_finetune import OPTS, _lists, finetune, released, teacher  # noqa: F401 (fixtures)
from utils import utils
from utils.checkpoint import IncompleteFileError

SCRIPTS = {"eval_linear": "checkpoint.pth.tar", "eval_finetune": "checkpoint.pth"}
RESULTS = {"eval_linear": "linear_results.json", "eval_finetune": "finetune_results.json"}


@pytest.fixture
def start(synthetic_root, checkpoint, released, tmp_path):
    """start(script, out, *flags): a tiny run of `script` (the names of SCRIPTS) in `out`, 2 epochs by default."""
    lists = _lists(synthetic_root, tmp_path, per_class=2)

    def run(script: str, out, *flags: str) -> dict:
        common = ["--arch", "vit_tiny", "--batch_size_per_gpu", "4", "--num_workers", "0", "--dataset", "ucf101",
                  "--output_dir", str(out)]
        if script == "eval_linear":
            results = linear(common + ["--pretrained_weights", checkpoint, "--n_last_blocks", "2", "--epochs", "2",
                                       *flags, "--opts"] + _data_opts(synthetic_root, "splits"))
            dist.destroy_process_group()
            return results
        return finetune(common + ["--pretrained_weights", released, "--epochs", "2", *flags, "--opts"] + lists + OPTS)

    return run


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_partial_last_log_line_is_dropped_not_glued_to_the_next(start, tmp_path, script, capsys):
    """log.txt cut in its last line (a kill while the test line was written): the resume's next line was glued to
    it, and log.txt no longer parsed."""
    out = tmp_path / "out"
    start(script, out, *(["--epochs", "1"] if script == "eval_finetune" else []))  # the finetune goes on to 2
    lines = (out / "log.txt").read_text().splitlines(keepends=True)
    (out / "log.txt").write_text("".join(lines[:-1]) + lines[-1][:20])
    capsys.readouterr()
    start(script, out)
    assert (f"Note: {out / 'log.txt'} ended with a partial line (the run was killed while writing it); dropped: "
            f"{lines[-1][:20]!r}") in capsys.readouterr().out
    assert [r.get("epoch") for r in log_records(out)] == [0, 1, None]


def _left_names(script: str) -> str:
    """What a finished run of `script` leaves that a new run there would append to, overwrite or mix with."""
    return f"log.txt, {RESULTS[script]}" + (", tb/" if script == "eval_finetune" else "")


def _delete(out, script: str) -> None:
    for name in _left_names(script).split(", "):
        shutil.rmtree(out / name) if name == "tb/" else (out / name).unlink()


def _left(out) -> dict:
    """Every file under `out` (tb/'s event files too) and its bytes, but the lock file every start takes."""
    return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_start_from_scratch_in_another_runs_folder_is_refused(start, tmp_path, script):
    """A finished run's checkpoint deleted (a new evaluation in a reused folder, e.g. after the advice to delete a
    checkpoint of another backbone): the new start moved the old log aside, overwrote its results at the end and
    (eval_finetune) added its curves to the old run's tb/. Now it stops before writing anything, naming the folder,
    what is there and the ways on, as train_ssl.py's check; deleting the named files lets it start."""
    out = tmp_path / "out"
    start(script, out)
    (out / SCRIPTS[script]).unlink()
    results = RESULTS[script]
    harm = (f"append to its log.txt, overwrite its {results} and add this run's curves to its tb/"
            if script == "eval_finetune" else f"append to its log.txt and overwrite its {results}")
    before = _left(out)
    with pytest.raises(FileExistsError, match=rf"^--output_dir {out} holds another run \(log.txt, {results}\) but no "
                                              rf"{re.escape(SCRIPTS[script])} to resume: starting from scratch there "
                                              rf"would {harm}\. Pass "
                                              r"another --output_dir for a new run, or delete its "
                                              rf"{_left_names(script)} to start a new run there\.$"):
        start(script, out)
    assert _left(out) == before
    _delete(out, script)
    start(script, out)
    assert [r.get("epoch") for r in log_records(out)] == [0, 1, None]


class Killed(BaseException):
    """The process killed at that point (no handler of ours catches a BaseException)."""


def test_a_finetune_killed_before_its_first_checkpoint_leaves_its_curves_apart_from_the_rerun(start, tmp_path,
                                                                                            monkeypatch, capsys):
    """Killed at its first checkpoint (nothing but tb/ and its config written), the rerun in the same folder added
    its event file to the killed start's tb/: TensorBoard showed the two starts' train/loss curves as one run. Now
    the rerun moves the killed start's event files, unchanged, to tb.<time>/ and tb/ holds its own alone."""
    import eval_finetune
    out = tmp_path / "out"

    def killed(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(eval_finetune, "atomic_save", killed)
    with pytest.raises(Killed):
        start("eval_finetune", out, "--epochs", "1", "--log_freq", "1")
    dist.destroy_process_group()
    monkeypatch.undo()
    killed_events = {p.name: p.read_bytes() for p in (out / "tb").iterdir()}
    assert len(killed_events) == 1 and not (out / "log.txt").exists()
    capsys.readouterr()
    start("eval_finetune", out, "--epochs", "1")
    aside = [p for p in out.iterdir() if p.name.startswith("tb.")]
    assert len(aside) == 1 and re.fullmatch(r"tb\.\d{8}T\d{6}Z", aside[0].name)
    assert {p.name: p.read_bytes() for p in aside[0].iterdir()} == killed_events
    own = list((out / "tb").iterdir())
    assert len(own) == 1 and own[0].name not in killed_events
    assert (f"Note: {out / 'tb'} held the tensorboard curves of an earlier start that stopped before its first "
            f"checkpoint: moved them to {aside[0]}") in capsys.readouterr().out
    # a resume of the run's own checkpoint keeps its curves where they are
    start("eval_finetune", out, "--epochs", "2")
    assert [p for p in out.iterdir() if p.name.startswith("tb.")] == aside and (out / "tb" / own[0].name).exists()


def test_a_probe_start_next_to_another_evaluations_results_is_refused_and_evaluate_is_not(start, tmp_path):
    """linear_results.json of an --evaluate of another classifier (--lc_pretrained_weights): a training there
    overwrote it at its end. Its refusal names it; --evaluate, which writes only its own results, is not refused
    (it tests the folder's checkpoint again, next to its log)."""
    trained = tmp_path / "trained"
    start("eval_linear", trained)
    out = tmp_path / "out"
    start("eval_linear", out, "--lc_pretrained_weights", str(trained / "checkpoint.pth.tar"))
    with pytest.raises(FileExistsError, match=rf"^--output_dir {out} holds another run \(linear_results.json\) .* "
                                              r"starting from scratch there would overwrite its linear_results.json\. "
                                              r".* or delete its linear_results.json to start a new run there\.$"):
        start("eval_linear", out)
    assert sorted(p.name for p in out.iterdir() if p.name != ".lock") == ["config_evaluate.json",
                                                                          "linear_results.json"]
    log = (trained / "log.txt").read_text()
    assert start("eval_linear", trained, "--evaluate")["acc1"] >= 0
    assert (trained / "log.txt").read_text() == log


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_advice_for_another_backbones_checkpoint_starts_a_new_run(start, checkpoint, released, tmp_path,
                                                                      script):
    """The same folder for another backbone (the launch scripts' default EXP_NAME): the refusal to resume the
    first run's checkpoint said to delete it, and the start that followed was refused for the first run's log and
    results. Now it names those too, and deleting what it names starts the new run."""
    out = tmp_path / "out"
    start(script, out)
    weights = torch.load(checkpoint if script == "eval_linear" else released, weights_only=False)
    flat = weights["teacher"] if script == "eval_linear" else weights
    flat["backbone.norm.bias"] = flat["backbone.norm.bias"] + 0.5
    other = tmp_path / "other.pth"
    torch.save(weights, other)
    own = out / SCRIPTS[script]
    with pytest.raises(ValueError, match=rf"or delete {own} and its {_left_names(script)} to (train|start) a new "
                                         r"one\.$"):
        start(script, out, "--pretrained_weights", str(other))
    if dist.is_initialized():
        dist.destroy_process_group()
    own.unlink()
    _delete(out, script)
    start(script, out, "--pretrained_weights", str(other))
    assert [r.get("epoch") for r in log_records(out)] == [0, 1, None]
    assert json.loads((out / RESULTS[script]).read_text())["pretrained_weights"] == str(other)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_damaged_own_checkpoint_says_so_and_names_a_restart_that_works(start, tmp_path, script):
    """A truncated checkpoint got the download advice ("re-download or re-copy it"), which cannot help: the file is
    the run's own, and these scripts keep no other. Now the error says it is damaged and names the restart: another
    --output_dir, or here once the file is moved aside and what the start from scratch would refuse to write next
    to is deleted; that rerun trains the run again, with log.txt holding each epoch once."""
    out = tmp_path / "out"
    start(script, out)
    own = out / SCRIPTS[script]
    data = own.read_bytes()
    own.write_bytes(data[:len(data) // 2])
    for flags in ([], ["--evaluate"]):  # a resume, a test of the trained model
        with pytest.raises(IncompleteFileError, match=rf"^{own} is damaged: it is not a complete torch.save file\. "
                                                      r".* This run keeps no other checkpoint, so its training is "
                                                      r"lost: start it again from epoch 0 in another --output_dir, or "
                                                      rf"move the damaged file aside \(mv {own} {own}.damaged\) and "
                                                      rf"delete its {_left_names(script)} and rerun to start it "
                                                      rf"again in {out}\.$"):
            start(script, out, *flags)
        if dist.is_initialized():
            dist.destroy_process_group()
    own.rename(out / f"{own.name}.damaged")
    _delete(out, script)
    start(script, out)
    assert [r.get("epoch") for r in log_records(out)] == [0, 1, None]
    assert own.is_file()


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_resume_with_other_flags_keeps_the_earlier_config(start, tmp_path, script, capsys):
    """A resume with other flags (eval_linear: --val_freq; eval_finetune: --lr for its second epoch) overwrote
    config.json: the record of how the first start trained was lost. Now it is kept beside this start's."""
    out = tmp_path / "out"
    start(script, out, *(["--epochs", "1"] if script == "eval_finetune" else []))
    first = json.loads((out / "config.json").read_text())
    capsys.readouterr()
    flag, value = ("lr", 0.1) if script == "eval_finetune" else ("val_freq", 2)
    start(script, out, f"--{flag}", str(value))
    (kept,) = out.glob("config.*.json")
    assert json.loads(kept.read_text()) == first
    assert f"Note: {out / 'config.json'} of an earlier start differs from this one's: kept as {kept.name}." \
        in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())[flag] == value != first[flag]
    assert not list(out.glob("config.*.yaml"))  # the same config.yaml (eval_finetune): nothing to keep


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_kill_between_an_epochs_checkpoint_and_its_log_line_loses_no_line(start, tmp_path, script, monkeypatch,
                                                                           capsys):
    """Killed after epoch 0's checkpoint, before its log.txt line: the rerun resumed at epoch 1 and log.txt never
    had epoch 0. The epoch-end checkpoint now carries the line, which the resume writes when log.txt lacks it."""
    out = tmp_path / "out"
    write_epoch_log = utils.write_epoch_log

    def killed_at_epoch_0(folder, stats, *args):
        if stats.get("epoch") == 0:
            raise Killed
        write_epoch_log(folder, stats, *args)

    monkeypatch.setattr(utils, "write_epoch_log", killed_at_epoch_0)
    with pytest.raises(Killed):
        start(script, out)
    dist.destroy_process_group()
    assert not (out / "log.txt").exists()
    monkeypatch.setattr(utils, "write_epoch_log", write_epoch_log)
    capsys.readouterr()
    start(script, out)
    assert "Wrote the log.txt line of epoch 0, missing after an interrupted end of epoch." in capsys.readouterr().out
    records = log_records(out)
    assert [r.get("epoch") for r in records] == [0, 1, None]
    other = tmp_path / "uninterrupted"
    start(script, other)
    assert records[0] == log_records(other)[0]
