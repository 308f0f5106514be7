"""The lifecycle of a pretraining run's --output_dir (train_ssl.py): what a start checks before it writes anything
(the checkpoint it resumes, the folder it starts in), how a resume keeps log.txt and the config files of the run
consistent, and the notes it prints for what changed since the checkpoint. Tiny runs on the synthetic videos."""
import shutil
from pathlib import Path

import pytest
import torch

from tests.test_train import _argv, _train
from utils.checkpoint import safe_torch_load


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
