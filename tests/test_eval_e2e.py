"""eval_knn.py and eval_linear.py end to end on the synthetic videos: a tiny backbone saved as a training
checkpoint, kNN with dumped/reloaded features, and a linear probe that trains, checkpoints, resumes and
evaluates (single view, multi-view, slow-fast; Kinetics lists too)."""
import argparse
import builtins
import functools
import json
import re
import shutil

import pytest
import torch
import torch.distributed as dist

import eval_knn
import eval_linear
from models import build_backbone
from tests.conftest import assert_stopped, log_records, on_free_port, signal_at_call
from tests.forked_runs import run_jobs
from utils.checkpoint import output_dir_lock
from utils.evaluation import OnlineKNN
from utils.parser import load_config, load_config_from

# The tiny clips of tests/conftest.py: 4 frames, 32 px crops (16 px local), short side 36-40; a ViT-Ti of 2 blocks
# (the checkpoint and every run read these).
OPTS = ["DATA.TRAIN_CROP_SIZE", "32", "DATA.LOCAL_CROP_SIZE", "16", "DATA.TEST_CROP_SIZE", "32",
        "DATA.TRAIN_JITTER_SCALES", "[36,40]", "DATA.NUM_FRAMES", "4", "DATA.SAMPLING_RATE", "2", "MODEL.DEPTH", "2"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A train_ssl-style checkpoint of a tiny vit_tiny backbone (teacher `backbone.*` + a head entry)."""
    torch.manual_seed(0)
    cfg = load_config_from(None, OPTS)
    teacher = {f"backbone.{k}": v for k, v in build_backbone("vit_tiny", cfg).state_dict().items()}
    teacher["head.mlp.0.weight"] = torch.zeros(4, 192)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pth"
    torch.save({"teacher": teacher, "epoch": 1, "args": argparse.Namespace(arch="vit_tiny")}, path)
    return str(path)


def _data_opts(root, list_dir: str) -> list[str]:
    return ["DATA.PATH_TO_DATA_DIR", str(root / list_dir), "DATA.PATH_PREFIX", str(root / "videos")] + OPTS


def knn(args: list[str]) -> dict:
    return eval_knn.main(argparse.ArgumentParser(parents=[eval_knn.get_args_parser()]).parse_args(args))


def linear(args: list[str]) -> dict:
    return eval_linear.eval_linear(
        argparse.ArgumentParser(parents=[eval_linear.get_args_parser()]).parse_args(args))


def test_knn_end_to_end_with_dump_and_load(synthetic_root, checkpoint, tmp_path):
    common = ["--arch", "vit_tiny", "--pretrained_weights", checkpoint, "--nb_knn", "1", "3",
              "--batch_size_per_gpu", "5", "--num_workers", "0", "--dataset", "ucf101", "--use_cuda", "False"]
    res = knn(common + ["--output_dir", str(tmp_path / "a"), "--dump_features", str(tmp_path / "feats"),
                        "--opts"] + _data_opts(synthetic_root, "knn_splits"))
    assert (res["num_train"], res["num_test"]) == (16, 8)
    assert set(res["results"]) == {"1", "3"}
    assert json.loads((tmp_path / "a" / "knn_results.json").read_text()) == res
    feats = torch.load(tmp_path / "feats" / "trainfeat.pth")
    assert feats.shape == (16, 192)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(16))
    torch.testing.assert_close(torch.load(tmp_path / "feats" / "testfeat.pth").norm(dim=1), torch.ones(8))
    assert torch.load(tmp_path / "feats" / "trainlabels.pth").tolist() == [c for c in range(4) for _ in range(4)]
    # Deterministic train bank (val-style clips): a second extraction gives the same features.
    dist.destroy_process_group()
    res2 = knn(common + ["--output_dir", str(tmp_path / "b"), "--dump_features", str(tmp_path / "feats2"),
                         "--opts"] + _data_opts(synthetic_root, "knn_splits"))
    torch.testing.assert_close(torch.load(tmp_path / "feats2" / "trainfeat.pth"), feats)
    assert res2["results"] == res["results"]
    dist.destroy_process_group()
    res3 = knn(common + ["--output_dir", str(tmp_path / "c"), "--load_features", str(tmp_path / "feats"),
                         "--opts"] + _data_opts(synthetic_root, "knn_splits"))
    assert res3["results"] == res["results"]
    # --train_aug True: the original's randomly augmented train clips (other features, same sizes).
    dist.destroy_process_group()
    knn(common + ["--train_aug", "True", "--output_dir", str(tmp_path / "d"), "--dump_features",
                  str(tmp_path / "feats_aug"), "--opts"] + _data_opts(synthetic_root, "knn_splits"))
    aug = torch.load(tmp_path / "feats_aug" / "trainfeat.pth")
    assert aug.shape == feats.shape and not torch.allclose(aug, feats)
    torch.testing.assert_close(torch.load(tmp_path / "feats_aug" / "testfeat.pth"),
                               torch.load(tmp_path / "feats" / "testfeat.pth"))


def test_a_backbone_pretrained_with_another_patch_size_is_evaluated_with_patch_size(synthetic_root, tmp_path,
                                                                                    capsys):
    from utils.evaluation import load_backbone
    import eval_finetune
    cfg = load_config_from(None, OPTS)
    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny", cfg, patch_size=8)  # train_ssl.py --patch_size 8
    path = tmp_path / "p8.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}}, path)
    loaded = load_backbone("vit_tiny", cfg, torch.device("cpu"), str(path), patch_size=8)
    assert loaded.patch_size == 8
    for k, v in backbone.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with pytest.raises(ValueError, match=r"another model size; pass the --arch \(width\), --patch_size"):
        load_backbone("vit_tiny", cfg, torch.device("cpu"), str(path))  # built with 16
    res = knn(["--arch", "vit_tiny", "--patch_size", "8", "--pretrained_weights", str(path), "--nb_knn", "1",
               "--batch_size_per_gpu", "8", "--num_workers", "0", "--dataset", "ucf101", "--output_dir",
               str(tmp_path), "--opts"] + _data_opts(synthetic_root, "knn_splits"))
    assert (res["num_train"], res["num_test"]) == (16, 8)
    # --use_cuda (default True): the args dump says True, this line where the k-NN ran
    ran = "cuda." if torch.cuda.is_available() else "cpu (--use_cuda: no GPU here)."
    assert f"k-NN classification on {ran}" in capsys.readouterr().out.splitlines()
    for script in (eval_linear, eval_finetune):  # the same flag, passed to the same loader
        assert script.get_args_parser().parse_args(["--patch_size", "8"]).patch_size == 8


def test_linear_probe_trains_checkpoints_resumes_and_evaluates(synthetic_root, checkpoint, tmp_path, capsys):
    out = tmp_path / "le"
    common = ["--arch", "vit_tiny", "--pretrained_weights", checkpoint, "--n_last_blocks", "2",
              "--avgpool_patchtokens", "True", "--lr", "0.5", "--batch_size_per_gpu", "4", "--num_workers", "0",
              "--dataset", "ucf101", "--output_dir", str(out)]
    opts = ["--opts"] + _data_opts(synthetic_root, "splits")
    stats = linear(common + ["--epochs", "2"] + opts)
    assert stats["num_videos"] == 8 and stats["num_clips_per_video"] == 3
    # the progress lines of the validations and the multi-view test say which runs (not "Extracting features:")
    out_lines = capsys.readouterr().out.splitlines()
    labels = {line.split("  [")[0] for line in out_lines if "  [" in line and "eta:" in line and "Epoch: [" not in line}
    assert labels == {"Val:", "Test:"}
    ckpt = torch.load(out / "checkpoint.pth.tar", weights_only=False)
    assert set(ckpt) == {"epoch", "state_dict", "optimizer", "scheduler", "best_acc", "backbone", "run",
                         "pretrained_weights", "sequential_videos", "skipped_videos", "epoch_log"}
    # A process group always exists (as in the original), so the classifier is DDP-wrapped: `module.` keys.
    assert ckpt["epoch"] == 2 and list(ckpt["state_dict"]) == ["module.linear.weight", "module.linear.bias"]
    assert ckpt["state_dict"]["module.linear.weight"].shape == (4, 192 * 3)
    lines = [json.loads(l) for l in (out / "log.txt").read_text().splitlines()]
    assert [l.get("epoch") for l in lines] == [0, 1, None]
    assert "test_acc1" in lines[0] and "train_loss" in lines[0] and "test_multiview_acc1" in lines[2]
    assert ckpt["scheduler"]["last_epoch"] == 2

    # The same --output_dir for another run (eval_linear.sh's default EXP_NAME for every dataset): refused,
    # naming what differs, before anything is trained or written.
    edited = tmp_path / "edited"
    edited.mkdir()
    for src in (synthetic_root / "splits").iterdir():
        lines = src.read_text().splitlines()
        (edited / src.name).write_text("\n".join(lines[:-1] if "train" in src.name else lines) + "\n")
    train_list = synthetic_root / "splits" / "ucf101_train_split_1_videos.txt"
    for other, differs in [
            (["--epochs", "3"], r"--epochs: checkpoint 2, this run 3"),
            (["--epochs", "2", "--lr", "5"], r"--lr: checkpoint 0.5, this run 5.0"),
            (["--epochs", "2", "--dataset", "hmdb51"], r"--dataset: checkpoint 'ucf101', this run 'hmdb51'"),
            (["--epochs", "2"] + opts + ["DATA.PATH_TO_DATA_DIR", str(edited)],
             rf"train list: checkpoint {train_list} \(sha1 \w{{12}}\), this run {edited}/\S+ \(sha1 \w{{12}}\)")]:
        dist.destroy_process_group()
        with pytest.raises(ValueError, match=rf"checkpoint.pth.tar holds another linear probe run: {differs}\. "
                                             r".*another --output_dir \(eval_linear.sh: EXP_NAME=.*or pass the "
                                             r"checkpoint's values to continue it\."):
            linear(common + other + ([] if "--opts" in other else opts))
    assert torch.load(out / "checkpoint.pth.tar", weights_only=False)["epoch"] == 2
    assert len((out / "log.txt").read_text().splitlines()) == 3
    assert json.loads((out / "config.json").read_text())["epochs"] == 2  # the record of the run that trained it

    # The same run with its lists moved resumes (here: nothing left but the test); so does a checkpoint written
    # before runs were recorded, unchecked.
    moved = tmp_path / "moved"
    moved.mkdir()
    for src in (synthetic_root / "splits").iterdir():
        (moved / src.name).write_bytes(src.read_bytes())
    dist.destroy_process_group()
    linear(common + ["--epochs", "2"] + opts + ["DATA.PATH_TO_DATA_DIR", str(moved)])
    legacy = torch.load(out / "checkpoint.pth.tar", weights_only=False)
    del legacy["run"]
    torch.save(legacy, out / "checkpoint.pth.tar")
    dist.destroy_process_group()
    capsys.readouterr()
    linear(common + ["--epochs", "2"] + opts)
    printed = capsys.readouterr().out
    assert "has no run record (dataset, lists, hyper-parameters): an original SVT file or an older svt one; " \
           "resuming it unchecked" in printed and f"Resumed from {out / 'checkpoint.pth.tar'}: epoch 2" in printed
    lines = [json.loads(l) for l in (out / "log.txt").read_text().splitlines()]
    assert [l.get("epoch") for l in lines] == [0, 1, None, None, None]
    resumed = torch.load(out / "checkpoint.pth.tar", weights_only=False)
    assert resumed["epoch"] == 2 and resumed["best_acc"] == ckpt["best_acc"]
    dist.destroy_process_group()
    with pytest.raises(ValueError, match=r"weight has shape \(4, 576\) but this run builds \(5, 576\) \(num_labels x "
                                         r"feature dim\): a classifier of another run .*rerun the command that "
                                         r"trained it; for this run, use another --output_dir"):
        linear(common + ["--epochs", "2", "--num_labels", "5"] + opts)  # unchecked: only the shape tells

    # --evaluate: the saved classifier, nothing trained; --ensemble softmax changes only the aggregation.
    dist.destroy_process_group()
    ev = linear(common + ["--evaluate", "--ensemble", "softmax"] + opts)
    assert torch.equal(torch.load(out / "checkpoint.pth.tar", weights_only=False)["state_dict"]["module.linear.weight"],
                       resumed["state_dict"]["module.linear.weight"])
    assert {"acc1", "multiview_acc1"} <= set(ev) and "multiview_acc5" not in set(ev)  # 4 classes: no top-5
    results = json.loads((out / "linear_results.json").read_text())
    assert results["ensemble"] == "softmax" and results["multiview_acc1"] == ev["multiview_acc1"]
    # the training's config.json stays; the evaluation's arguments go beside it
    assert not json.loads((out / "config.json").read_text())["evaluate"]
    assert json.loads((out / "config_evaluate.json").read_text())["ensemble"] == "softmax"

    # Slow-fast evaluation of the same classifier: NUM_FRAMES x 32 and 8*NUM_FRAMES x 16 clips per video.
    dist.destroy_process_group()
    sf = linear(common + ["--evaluate", "--slowfast_eval", "True"] + opts)
    assert sf["num_videos"] == 8 and 0 <= sf["multiview_acc1"] <= 100

    # Another checkpoint with the same --output_dir (eval_linear.sh's default EXP_NAME): neither resuming
    # the classifier trained on the first one's features nor testing it, whatever the file's name.
    other = tmp_path / "checkpoint.pth"
    state = torch.load(checkpoint, weights_only=False)
    state["teacher"]["backbone.norm.bias"] = state["teacher"]["backbone.norm.bias"] + 0.5
    torch.save(state, other)
    swapped = [other if a == checkpoint else a for a in common]
    for extra in (["--epochs", "4"], ["--evaluate"]):
        dist.destroy_process_group()
        with pytest.raises(ValueError, match=r"checkpoint.pth.tar is a linear classifier trained on the features "
                                             r"of another backbone.*EXP_NAME=.*or delete"):
            linear([str(a) for a in swapped] + extra + opts)
    assert torch.load(out / "checkpoint.pth.tar", weights_only=False)["epoch"] == 2


def test_linear_probe_with_feature_bn_trains_and_evaluates_again(synthetic_root, checkpoint, tmp_path):
    out = tmp_path / "bn"
    common = ["--arch", "vit_tiny", "--pretrained_weights", checkpoint, "--n_last_blocks", "1", "--lr", "0.5",
              "--batch_size_per_gpu", "5", "--num_workers", "0", "--dataset", "ucf101", "--output_dir", str(out)]
    opts = ["--opts"] + _data_opts(synthetic_root, "splits") + ["TEST.NUM_ENSEMBLE_VIEWS", "1"]
    stats = linear(common + ["--epochs", "1", "--feature_bn", "True"] + opts)
    state = torch.load(out / "checkpoint.pth.tar", weights_only=False)["state_dict"]
    assert list(state) == ["module.feature_bn.running_mean", "module.feature_bn.running_var",
                           "module.feature_bn.num_batches_tracked", "module.linear.weight", "module.linear.bias"]
    # 16 train clips in batches of 5: the last batch of one clip (no batch statistics) is dropped.
    assert state["module.feature_bn.num_batches_tracked"].item() == 3
    dist.destroy_process_group()
    ev = linear(common + ["--evaluate", "--feature_bn", "True"] + opts)
    assert ev["multiview_acc1"] == stats["multiview_acc1"] and ev["acc1"] == stats["best_acc"]
    dist.destroy_process_group()
    with pytest.raises(KeyError, match="--feature_bn True"):
        linear(common + ["--evaluate"] + opts)


def test_linear_probe_on_kinetics_lists_and_missing_classifier(synthetic_root, checkpoint, tmp_path):
    """Kinetics' train.csv and val.csv are all the probe reads: its multi-view test is on the val list (the
    original's multi_crop_val), test.csv is never opened (here: absent, and the val list cut to 6 videos)."""
    lists = tmp_path / "annotations"
    lists.mkdir()
    (lists / "train.csv").write_text((synthetic_root / "annotations" / "train.csv").read_text())
    val_lines = (synthetic_root / "annotations" / "val.csv").read_text().splitlines()[:6]
    (lists / "val.csv").write_text("\n".join(val_lines) + "\n")
    common = ["--arch", "vit_tiny", "--pretrained_weights", checkpoint, "--n_last_blocks", "1",
              "--batch_size_per_gpu", "8", "--num_workers", "0", "--dataset", "kinetics400"]
    opts = ["--opts"] + _data_opts(synthetic_root, "annotations") + ["TEST.NUM_SPATIAL_CROPS", "1",
                                                                     "TEST.NUM_ENSEMBLE_VIEWS", "2",
                                                                     "DATA.PATH_TO_DATA_DIR", str(lists)]
    stats = linear(common + ["--epochs", "1", "--num_labels", "4", "--output_dir", str(tmp_path / "k")] + opts)
    assert stats["num_videos"] == 6 and stats["num_clips_per_video"] == 2
    # --lc_pretrained_weights alone means: evaluate that classifier (num_labels read from it), train nothing.
    dist.destroy_process_group()
    ev = linear(common + ["--lc_pretrained_weights", str(tmp_path / "k" / "checkpoint.pth.tar"),
                          "--output_dir", str(tmp_path / "k_eval")] + opts)
    assert ev["multiview_acc1"] == stats["multiview_acc1"]
    assert not (tmp_path / "k_eval" / "checkpoint.pth.tar").exists()
    assert json.loads((tmp_path / "k_eval" / "linear_results.json").read_text())["split"] is None  # no splits
    dist.destroy_process_group()
    with pytest.raises(FileNotFoundError, match="no trained classifier"):
        linear(common + ["--evaluate", "--output_dir", str(tmp_path / "empty")] + opts)


def test_data_split_2_is_read_recorded_and_kept_apart_from_split_1(synthetic_root, checkpoint, tmp_path):
    """--opts DATA.SPLIT 2 reads the split-2 lists beside split 1's (here: other videos, fewer of them), the results
    record the split, and a kNN dump or a probe checkpoint of split 2 is not scored or resumed as split 1's."""
    lists = tmp_path / "lists"
    shutil.copytree(synthetic_root / "splits", lists)
    for mode, kept in (("train", slice(1, None, 2)), ("val", slice(2, None))):  # 8 of 16 train, 6 of 8 val videos
        lines = (lists / f"ucf101_{mode}_split_1_videos.txt").read_text().splitlines(keepends=True)
        (lists / f"ucf101_{mode}_split_2_videos.txt").write_text("".join(lines[kept]))
    common = ["--arch", "vit_tiny", "--pretrained_weights", checkpoint, "--batch_size_per_gpu", "8",
              "--num_workers", "0", "--dataset", "ucf101"]
    opts = ["--opts", "DATA.PATH_TO_DATA_DIR", str(lists), "DATA.PATH_PREFIX", str(synthetic_root / "videos")] + OPTS
    split_2 = ["DATA.SPLIT", "2"]

    res = knn(common + ["--nb_knn", "1", "--use_cuda", "False", "--output_dir", str(tmp_path / "knn"),
                        "--dump_features", str(tmp_path / "feats")] + opts + split_2)
    assert (res["split"], res["num_train"], res["num_test"]) == (2, 8, 6)
    assert json.loads((tmp_path / "knn" / "knn_results.json").read_text()) == res
    run = json.loads((tmp_path / "feats" / "dump_record.json").read_text())["run"]
    assert (run["train list"]["path"], run["val list"]["path"]) == (
        str(lists / "ucf101_train_split_2_videos.txt"), str(lists / "ucf101_val_split_2_videos.txt"))
    dist.destroy_process_group()
    with pytest.raises(ValueError, match=rf"not those of this run: train list: dump {lists}/ucf101_train_split_2_"
                                         rf"videos.txt \(sha1 \w{{12}}\), this run {lists}/ucf101_train_split_1_"):
        knn(common + ["--output_dir", str(tmp_path / "knn1"), "--load_features", str(tmp_path / "feats")] + opts)
    dist.destroy_process_group()

    probe = common + ["--n_last_blocks", "1", "--epochs", "1", "--output_dir", str(tmp_path / "le")]
    stats = linear(probe + opts + split_2)
    assert stats["num_videos"] == 6
    assert json.loads((tmp_path / "le" / "linear_results.json").read_text())["split"] == 2
    dist.destroy_process_group()
    with pytest.raises(ValueError, match=rf"holds another linear probe run: train list: checkpoint {lists}/ucf101_"
                                         rf"train_split_2_videos.txt \(sha1 \w{{12}}\), this run {lists}/ucf101_"
                                         rf"train_split_1_videos.txt"):
        linear(probe + opts)
    dist.destroy_process_group()
    # --evaluate of the split-2 probe on split 1, whose val videos it partly trained on: refused, naming the splits
    with pytest.raises(ValueError, match=rf"checkpoint.pth.tar was trained on split 2 of ucf101 \({lists}/ucf101_train_"
                                         rf"split_2_videos.txt\); this --evaluate tests split 1 \(DATA.SPLIT\), whose "
                                         rf"test videos .* Pass --opts DATA.SPLIT 2 to test it"):
        linear(probe + ["--evaluate"] + opts)
    dist.destroy_process_group()
    assert linear(probe + ["--evaluate"] + opts + split_2)["num_videos"] == 6


@pytest.mark.slow
def test_more_last_blocks_than_the_backbone_has_names_the_value_to_pass(synthetic_root, checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"--n_last_blocks 3: the backbone has 2 blocks; pass --n_last_blocks 2 "
                                         r"or less \(SVT's scripts pass 1\)"):
        linear(["--arch", "vit_tiny", "--pretrained_weights", checkpoint, "--n_last_blocks", "3", "--num_workers",
                "0", "--output_dir", str(tmp_path), "--opts"] + _data_opts(synthetic_root, "splits"))


def _odd_lists(synthetic_root, tmp_path, list_dir: str):
    """A copy of `list_dir`'s lists without their last line: 15 train and 7 val videos, sizes no process
    count divides (a padding sampler would score a video twice)."""
    out = tmp_path / f"odd_{list_dir}"
    out.mkdir()
    for src in (synthetic_root / list_dir).iterdir():
        (out / src.name).write_text("\n".join(src.read_text().splitlines()[:-1]) + "\n")
    return out


def test_scripts_with_two_cpu_processes(synthetic_root, checkpoint, tmp_path):
    """scripts/eval_{knn,linear}.sh and finetune.sh under torchrun with 2 gloo ranks, on 15 train and 7 val
    videos: the same kNN features and accuracies as one process; a DDP linear probe and fine-tuning whose
    single-view val and multi-view test (3 clips a video, split over the ranks) score every video once, as one
    process does on the classifier they saved."""
    import os
    import subprocess
    from pathlib import Path

    import eval_finetune
    repo = Path(eval_knn.__file__).resolve().parent
    import sys
    env = {**os.environ, "PYTHON": sys.executable, "DATA_PATH": str(synthetic_root), "CHECKPOINT": checkpoint,
           "GPUS": "2", "EXTRA_OPTS": " ".join(OPTS), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    small = ["--arch", "vit_tiny", "--num_workers", "0", "--batch_size_per_gpu", "3"]
    knn_lists, lists = _odd_lists(synthetic_root, tmp_path, "knn_splits"), _odd_lists(synthetic_root, tmp_path, "splits")

    def run(script, out, list_dir, *args, **env_vars):
        flags = small[:-2] if script == "finetune.sh" else small  # finetune.sh takes the batch from BATCH_SIZE
        proc = on_free_port(lambda port: subprocess.run(
            ["bash", str(repo / "scripts" / script), *flags, *args], capture_output=True, text=True, timeout=300,
            env={**env, "OUTPUT_DIR": str(tmp_path / out), "MASTER_PORT": str(port), "LIST_DIR": str(list_dir),
                 **env_vars}))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    def one_process(lists_dir) -> list[str]:
        return ["--opts", "DATA.PATH_TO_DATA_DIR", str(lists_dir), "DATA.PATH_PREFIX", str(synthetic_root / "videos")] + OPTS

    run("eval_knn.sh", "knn", knn_lists, "--nb_knn", "1", "3", "--dump_features", str(tmp_path / "f2"))
    res = json.loads((tmp_path / "knn" / "knn_results.json").read_text())
    single = knn(small + ["--pretrained_weights", checkpoint, "--nb_knn", "1", "3", "--use_cuda", "False",
                          "--output_dir", str(tmp_path / "k1"), "--dump_features", str(tmp_path / "f1")]
                 + one_process(knn_lists))
    dist.destroy_process_group()
    for name in ("trainfeat", "testfeat", "trainlabels", "testlabels"):
        torch.testing.assert_close(torch.load(tmp_path / "f2" / f"{name}.pth"),
                                   torch.load(tmp_path / "f1" / f"{name}.pth"), rtol=1e-4, atol=1e-5)
    assert (res["num_train"], res["num_test"]) == (15, 7)
    assert res["results"] == single["results"]

    run("eval_linear.sh", "linear", lists, "--epochs", "1", "--num_labels", "4")
    results = json.loads((tmp_path / "linear" / "linear_results.json").read_text())
    val = json.loads((tmp_path / "linear" / "log.txt").read_text().splitlines()[0])
    assert results["num_videos"] == 7 and results["num_clips_per_video"] == 3
    ckpt = torch.load(tmp_path / "linear" / "checkpoint.pth.tar", weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["optimizer"]["param_groups"][0]["initial_lr"] == pytest.approx(0.001 * 6 / 256)
    ev = linear(small + ["--pretrained_weights", checkpoint, "--n_last_blocks", "1", "--num_labels", "4",
                         "--lc_pretrained_weights", str(tmp_path / "linear" / "checkpoint.pth.tar"),
                         "--output_dir", str(tmp_path / "l1")] + one_process(lists))
    dist.destroy_process_group()
    assert val["test_loss"] == pytest.approx(ev["loss"], rel=1e-5) and val["test_acc1"] == ev["acc1"]
    assert (results["multiview_acc1"], results["num_videos"]) == (ev["multiview_acc1"], ev["num_videos"])

    # 2 batches of 3 per process: one optimizer step of 2 accumulated (the script's default, 8, needs 64 clips)
    run("finetune.sh", "ft", lists, "--epochs", "1", "--use_fp16", "false", "--num_labels", "4", BATCH_SIZE="3",
        ACCUM_ITER="2")
    ft = json.loads((tmp_path / "ft" / "log.txt").read_text().splitlines()[0])
    assert ft["train_lr"] == pytest.approx(0.005 * 12 / 64)  # the effective batch: 2 processes x 3 x 2
    (tmp_path / "ft1").mkdir()
    (tmp_path / "ft1" / "checkpoint.pth").write_bytes((tmp_path / "ft" / "checkpoint.pth").read_bytes())
    args = ["--arch", "vit_tiny", "--num_workers", "0", "--batch_size_per_gpu", "2", "--use_fp16", "false",
            "--output_dir", str(tmp_path / "ft1")] + one_process(lists)
    model_args = argparse.ArgumentParser(parents=[eval_finetune.get_args_parser()]).parse_args(args)
    model_args.num_labels = 4
    one = eval_finetune.eval_finetune(argparse.Namespace(**{**vars(model_args), "evaluate": True}))
    test = json.loads((tmp_path / "ft" / "finetune_results.json").read_text())
    assert (test["test_multiview_acc1"], test["test_num_videos"]) == (one["test_multiview_acc1"], 7)
    cfg = load_config(model_args)
    model = eval_finetune.build_model(model_args, cfg, 4)
    model.load_state_dict(torch.load(tmp_path / "ft1" / "checkpoint.pth", weights_only=False)["model_state"])
    val_set = eval_finetune.build_dataset("ucf101", eval_finetune.single_clip_config(cfg), "val")
    val_one = eval_finetune.evaluate(model, val_set, model_args, None, torch.device("cpu"))
    assert ft["val_loss"] == pytest.approx(val_one["loss"], rel=1e-5) and ft["val_acc1"] == val_one["acc1"]


class Killed(BaseException):
    """The process killed at that point (no handler of ours catches a BaseException)."""


def test_a_dump_cut_short_never_pairs_its_features_with_an_earlier_dumps(synthetic_root, checkpoint, tmp_path,
                                                                         monkeypatch):
    """A second backbone dumped into the folder of the first one's features, killed after its trainfeat.pth: the
    first backbone's testfeat / labels stayed beside it, and --load_features scored the mix without a word. Now
    an earlier dump's files go first: the cut dump is missing files, and --load_features names one."""
    common = ["--arch", "vit_tiny", "--nb_knn", "1", "--batch_size_per_gpu", "8", "--num_workers", "0",
              "--use_cuda", "False", "--dump_features", str(tmp_path / "feats"), "--opts"]
    common += _data_opts(synthetic_root, "knn_splits")
    knn(["--pretrained_weights", checkpoint, "--output_dir", str(tmp_path / "first")] + common)
    dist.destroy_process_group()
    save = eval_knn.atomic_save

    def killed_after_trainfeat(obj, path):
        if str(path).endswith("testfeat.pth"):
            raise Killed
        save(obj, path)

    monkeypatch.setattr(eval_knn, "atomic_save", killed_after_trainfeat)
    with pytest.raises(Killed):  # random init: other features
        knn(["--output_dir", str(tmp_path / "second")] + common)
    dist.destroy_process_group()
    assert sorted(p.name for p in (tmp_path / "feats").iterdir()) == ["dump_record.json", "trainfeat.pth"]
    with pytest.raises(FileNotFoundError, match=rf"^--load_features {tmp_path / 'feats'}: testfeat.pth is missing "
                                                r"\(written by --dump_features; a dump cut short leaves some of its "
                                                r"files out: extract the features again\)\.$"):
        eval_knn.load_dumped_features(str(tmp_path / "feats"))


def test_a_dump_records_what_made_it_and_load_features_refuses_other_weights_or_lists(synthetic_root, checkpoint,
                                                                                     tmp_path, capsys):
    """A dump of checkpoint.pth, then checkpoint.pth overwritten by the run that goes on: --load_features with it
    scored the old features as the new checkpoint's, and with another list or --train_aug as that run's, without a
    word. Now dump_record.json says what made the dump and a load that disagrees stops, naming the folder, the
    files and the fix; one without --pretrained_weights evaluates (and names) the dump's checkpoint; a dump of
    before the record loads with a warning; files of two dumps mixed are named."""
    weights = tmp_path / "run" / "checkpoint.pth"
    weights.parent.mkdir()
    shutil.copy(checkpoint, weights)
    feats = tmp_path / "feats"
    common = ["--arch", "vit_tiny", "--nb_knn", "1", "3", "--batch_size_per_gpu", "8", "--num_workers", "0",
              "--use_cuda", "False"]
    opts = ["--opts"] + _data_opts(synthetic_root, "knn_splits")
    dumped = knn(common + ["--pretrained_weights", str(weights), "--output_dir", str(tmp_path / "a"),
                           "--dump_features", str(feats)] + opts)
    dist.destroy_process_group()
    record = json.loads((feats / "dump_record.json").read_text())
    assert (record["pretrained_weights"], record["checkpoint_key"], record["num_train"], record["num_test"]) == (
        str(weights), "teacher", 16, 8)
    run = record["run"]
    assert re.fullmatch("[0-9a-f]{40}", record["backbone"]) and (run["--dataset"], run["--train_aug"]) == (
        "ucf101", False)
    assert {name: run[name]["path"] for name in ("train list", "val list")} == {
        "train list": str(synthetic_root / "knn_splits" / "ucf101_train_split_1_videos.txt"),
        "val list": str(synthetic_root / "knn_splits" / "ucf101_val_split_1_videos.txt")}
    assert run["DATA.NUM_FRAMES"] == 4 and run["DATA.TEST_CROP_SIZE"] == 32
    assert torch.load(feats / "trainfeat.pth", weights_only=True).shape == (16, 192)  # a plain tensor, as before
    # the same weights: loads; no --pretrained_weights: the dump's checkpoint, named in the results
    again = knn(common + ["--pretrained_weights", str(weights), "--output_dir", str(tmp_path / "b"),
                          "--load_features", str(feats)] + opts)
    assert again["results"] == dumped["results"]
    dist.destroy_process_group()
    alone = knn(common + ["--output_dir", str(tmp_path / "c"), "--load_features", str(feats)] + opts)
    assert (alone["pretrained_weights"], alone["results"]) == (str(weights), dumped["results"])
    assert f"the features are of {weights} ('teacher')" in capsys.readouterr().out
    dist.destroy_process_group()
    # the training run went on and overwrote checkpoint.pth: other weights under the same path
    ckpt = torch.load(weights, weights_only=False)
    ckpt["teacher"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in ckpt["teacher"].items()}
    torch.save(ckpt, weights)
    refused = (rf"^--load_features {re.escape(str(feats))}: its features \(trainfeat.pth, testfeat.pth, "
               r"trainlabels.pth, testlabels.pth, described by dump_record.json\) are not those of this run: {}\. "
               r"Scoring them would report them as this run's\. Pass the dump's values, or extract this run's "
               r"features: drop --load_features")
    with pytest.raises(ValueError, match=refused.format(
            rf"backbone: dump {re.escape(str(weights))} \('teacher'\), sha1 {record['backbone'][:12]}, this run "
            rf"{re.escape(str(weights))} \('teacher'\), sha1 [0-9a-f]{{12}} \(other weights, or the file changed "
            r"since\)")):
        knn(common + ["--pretrained_weights", str(weights), "--output_dir", str(tmp_path / "d"), "--load_features",
                      str(feats)] + opts)
    dist.destroy_process_group()
    # clips of another length than the dump's
    with pytest.raises(ValueError, match=refused.format("DATA.NUM_FRAMES: dump 4, this run 2")):
        knn(common + ["--output_dir", str(tmp_path / "d2"), "--load_features", str(feats)] + opts
            + ["DATA.NUM_FRAMES", "2"])
    dist.destroy_process_group()
    # another val list (a line fewer), and the augmented train bank
    lists = tmp_path / "lists"
    shutil.copytree(synthetic_root / "knn_splits", lists)
    val = lists / "ucf101_val_split_1_videos.txt"
    val.write_text("".join(val.read_text().splitlines(keepends=True)[:-1]))
    other = ["--opts", "DATA.PATH_TO_DATA_DIR", str(lists), "DATA.PATH_PREFIX", str(synthetic_root / "videos")] + OPTS
    with pytest.raises(ValueError, match=refused.format(
            rf"--train_aug: dump False, this run True; val list: dump {re.escape(str(synthetic_root))}/knn_splits/"
            rf"ucf101_val_split_1_videos.txt \(sha1 {run['val list']['sha1'][:12]}\), this run "
            rf"{re.escape(str(val))} \(sha1 [0-9a-f]{{12}}\)")):
        knn(common + ["--train_aug", "True", "--output_dir", str(tmp_path / "e"), "--load_features", str(feats)]
            + other)
    dist.destroy_process_group()
    # the 7-video list's testfeat copied over this dump's: files of two dumps
    knn(common + ["--output_dir", str(tmp_path / "f"), "--dump_features", str(tmp_path / "feats7")] + other)
    dist.destroy_process_group()
    mixed = tmp_path / "mixed"
    shutil.copytree(feats, mixed)
    shutil.copy(tmp_path / "feats7" / "testfeat.pth", mixed / "testfeat.pth")
    with pytest.raises(ValueError, match=rf"^--load_features {re.escape(str(mixed))}: its files are not of one dump "
                                         r"\(testfeat.pth has 7 rows, the record 8\): files of another dump were "
                                         r"copied in\."):
        knn(common + ["--output_dir", str(tmp_path / "g"), "--load_features", str(mixed)] + opts)
    dist.destroy_process_group()
    # a dump of an older svt (no record) still loads, with a warning
    (feats / "dump_record.json").unlink()
    old = knn(common + ["--pretrained_weights", str(weights), "--output_dir", str(tmp_path / "h"),
                        "--load_features", str(feats)] + opts)
    assert old["results"] == dumped["results"]
    assert (f"WARNING: --load_features {feats} has no dump_record.json (a dump of an older svt)"
            in capsys.readouterr().out)


def _lists_with_corrupt_videos(synthetic_root, tmp_path, list_dir: str, names: list[str]):
    """Copies of `list_dir`'s lists in tmp_path/with_corrupt, with an unreadable video (absolute path, so
    DATA.PATH_PREFIX leaves it as is) inserted in the middle of each list of `names`."""
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00not a video" * 64)
    out = tmp_path / "with_corrupt"
    out.mkdir()
    for src in (synthetic_root / list_dir).iterdir():
        lines = src.read_text().splitlines()
        if src.name in names:
            lines.insert(len(lines) // 2, f"{corrupt} 1")
        (out / src.name).write_text("\n".join(lines) + "\n")
    return out


def test_knn_skips_unreadable_train_and_val_videos(synthetic_root, checkpoint, tmp_path):
    lists = _lists_with_corrupt_videos(synthetic_root, tmp_path, "knn_splits",
                                       ["ucf101_train_split_1_videos.txt", "ucf101_val_split_1_videos.txt"])
    common = ["--arch", "vit_tiny", "--pretrained_weights", checkpoint, "--nb_knn", "1", "3",
              "--batch_size_per_gpu", "5", "--num_workers", "0", "--dataset", "ucf101", "--use_cuda", "False"]
    clean = knn(common + ["--output_dir", str(tmp_path / "clean"), "--opts"] + _data_opts(synthetic_root, "knn_splits"))
    dist.destroy_process_group()
    opts = ["DATA.PATH_TO_DATA_DIR", str(lists), "DATA.PATH_PREFIX", str(synthetic_root / "videos")] + OPTS
    res = knn(common + ["--output_dir", str(tmp_path / "skip"), "--dump_features", str(tmp_path / "feats"),
                        "--opts"] + opts)
    assert clean["skipped_videos"] == 0 and res["skipped_videos"] == 2
    assert (res["train_skipped_videos"], res["val_skipped_videos"]) == (1, 1)
    assert (res["num_train"], res["num_test"]) == (clean["num_train"], clean["num_test"]) == (16, 8)
    assert res["results"] == clean["results"]
    assert json.loads((tmp_path / "skip" / "knn_results.json").read_text())["skipped_videos"] == 2
    # The dump keeps one row per list line; the unreadable video's row has label -1 (dropped on reload).
    assert torch.load(tmp_path / "feats" / "trainlabels.pth").tolist().count(-1) == 1
    dist.destroy_process_group()
    reloaded = knn(common + ["--output_dir", str(tmp_path / "reload"), "--load_features", str(tmp_path / "feats"),
                             "--opts"] + opts)
    assert reloaded["results"] == clean["results"] and reloaded["skipped_videos"] == 2


def test_linear_probe_skips_unreadable_videos_once_per_split(synthetic_root, checkpoint, tmp_path, capsys):
    lists = _lists_with_corrupt_videos(synthetic_root, tmp_path, "splits",
                                       ["ucf101_train_split_1_videos.txt", "ucf101_val_split_1_videos.txt"])
    common = ["--arch", "vit_tiny", "--pretrained_weights", checkpoint, "--n_last_blocks", "1",
              "--batch_size_per_gpu", "8", "--num_workers", "0", "--dataset", "ucf101", "--num_labels", "4"]
    views = ["TEST.NUM_SPATIAL_CROPS", "1", "TEST.NUM_ENSEMBLE_VIEWS", "2"]  # 2 clips per test video
    opts = ["--opts", "DATA.PATH_TO_DATA_DIR", str(lists), "DATA.PATH_PREFIX", str(synthetic_root / "videos")] + OPTS + views
    out = tmp_path / "le"
    stats = linear(common + ["--epochs", "1", "--output_dir", str(out)] + opts)
    # The val list serves both the single-view val and the 2-clip test: the video is left out of each and
    # counted once; the unreadable train video's one draw of the epoch is replaced, and counted apart.
    assert stats["num_videos"] == 8 and stats["num_clips_per_video"] == 2
    assert (stats["val_skipped_videos"], stats["multiview_skipped_videos"], stats["multiview_skipped_clips"]) == (1, 1, 2)
    assert (stats["skipped_videos"], stats["train_replaced_samples"]) == (1, 1)
    # 1 of the 18 draws for the 17 train clips (6 %, past 5 %): a warning naming the command that lists them
    train_list = lists / "ucf101_train_split_1_videos.txt"
    assert [line for line in capsys.readouterr().out.splitlines() if "training draws" in line] == [
        "Epoch 0: 1 of the 18 training draws (6%) were unreadable videos, replaced by others: the epoch trained on "
        f"the readable rest of the list; list them with `python -m datasets.preprocessing.check_videos --list "
        f"{train_list} --prefix {synthetic_root / 'videos'}` and train on its cleaned list."]
    assert not {"train_skipped_videos", "eval_skipped_videos"} & stats.keys()
    assert json.loads((out / "linear_results.json").read_text())["skipped_videos"] == 1
    lines = [json.loads(l) for l in (out / "log.txt").read_text().splitlines()]
    assert (lines[0]["train_replaced_samples"], lines[0]["test_skipped_videos"]) == (1, 1)
    assert "train_skipped_videos" not in lines[0] and lines[-1]["test_skipped_videos"] == 1
    # --evaluate scores the same as on the list without the unreadable video.
    ckpt = ["--lc_pretrained_weights", str(out / "checkpoint.pth.tar")]
    dist.destroy_process_group()
    ev = linear(common + ckpt + ["--output_dir", str(tmp_path / "ev")] + opts)
    dist.destroy_process_group()
    ref = linear(common + ckpt + ["--output_dir", str(tmp_path / "ref"), "--opts"] + _data_opts(synthetic_root, "splits") + views)
    assert ev["skipped_videos"] == 1 and ref["skipped_videos"] == 0
    assert (ev["acc1"], ev["multiview_acc1"], ev["num_videos"]) == (ref["acc1"], ref["multiview_acc1"], 8)
    assert ev["loss"] == pytest.approx(ref["loss"], rel=1e-4)
    # Slow-fast clips (a list of two clips per sample): the placeholder has both shapes, the run finishes.
    dist.destroy_process_group()
    sf = linear(common + ckpt + ["--slowfast_eval", "True", "--output_dir", str(tmp_path / "sf")] + opts)
    assert sf["skipped_videos"] == 1 and sf["num_videos"] == 8


def test_unwritable_output_dir_fails_before_any_work(synthetic_root, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    missing = str(tmp_path / "no_such_checkpoint.pth")  # would fail later, at loading
    common = ["--arch", "vit_tiny", "--pretrained_weights", missing, "--num_workers", "0", "--output_dir",
              str(blocker / "out"), "--opts"] + _data_opts(synthetic_root, "splits")
    with pytest.raises(PermissionError, match=r"--output_dir .*a_file/out is not writable.*written there every epoch"):
        linear(common)
    dist.destroy_process_group()
    with pytest.raises(PermissionError, match=r"--output_dir .*a_file/out is not writable.*at the end of the run"):
        knn(common)


def test_a_folder_another_probe_trains_in_is_refused_but_evaluate_is_not(synthetic_root, tmp_path):
    common = ["--arch", "vit_tiny", "--num_workers", "0", "--output_dir", str(tmp_path), "--opts"]
    common += _data_opts(synthetic_root, "splits")
    with output_dir_lock(tmp_path):  # a run still writing there (README "Reliability")
        with pytest.raises(RuntimeError, match=rf"--output_dir {tmp_path} is in use by another run"):
            linear(common)
        dist.destroy_process_group()
        assert not (tmp_path / "config.json").exists()
        with pytest.raises(FileNotFoundError, match="--evaluate: no trained classifier"):  # past the lock
            linear(["--evaluate"] + common)


def test_ssl_view_keys_given_to_an_evaluation_are_noted_by_name(synthetic_root, tmp_path, capsys):
    """Keys that only shape train_ssl.py's SSL views do nothing in an evaluation: each script says so, naming
    them (a shared option list still runs), before its first check. So does DATA.NO_RGB_AUG True, which the
    original's Kinetics probe needed and which changes nothing here."""
    import eval_finetune

    def finetune(args: list[str]) -> dict:
        return eval_finetune.eval_finetune(
            argparse.ArgumentParser(parents=[eval_finetune.get_args_parser()]).parse_args(args))

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    common = ["--arch", "vit_tiny", "--num_workers", "0", "--output_dir", str(blocker / "out"), "--opts",
              *_data_opts(synthetic_root, "splits"), "DATA.RAND_FR", "True", "DATA.DECODE_DEVICE", "cuda",
              "DATA.NO_RGB_AUG", "True"]
    for run in (linear, knn, finetune):
        with pytest.raises(PermissionError):
            run(common)
        out = capsys.readouterr().out
        assert "Note: DATA.RAND_FR, DATA.DECODE_DEVICE are set, but only train_ssl.py's SSL views read them" in out
        assert "Note: DATA.NO_RGB_AUG is set, but the evaluation scripts train on one plain clip per sample" in out
        dist.destroy_process_group()


def test_no_readable_val_video_is_an_error(synthetic_root, checkpoint, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00not a video" * 64)
    lists = tmp_path / "lists"
    lists.mkdir()
    for src in (synthetic_root / "splits").iterdir():
        text = src.read_text() if "train" in src.name else f"{corrupt} 0\n{corrupt} 1\n"
        (lists / src.name).write_text(text)
    opts = ["--opts", "DATA.PATH_TO_DATA_DIR", str(lists), "DATA.PATH_PREFIX", str(synthetic_root / "videos")] + OPTS
    common = ["--arch", "vit_tiny", "--pretrained_weights", checkpoint, "--num_workers", "0", "--dataset", "ucf101",
              "--batch_size_per_gpu", "8", "--output_dir", str(tmp_path / "out")]
    error = r"none of the 2 videos of .*ucf101_val_split_1_videos.txt \(DATA.PATH_PREFIX=.*\) could be read"
    probe = common + ["--epochs", "1", "--num_labels", "4", "--n_last_blocks", "1"] + opts
    with pytest.raises(RuntimeError, match=error + r".* The training of epoch 0 is kept in .*checkpoint.pth.tar"):
        linear(probe)
    dist.destroy_process_group()
    # the epoch's training was saved before the error: once the video reads, the rerun only validates it
    kept = torch.load(tmp_path / "out" / "checkpoint.pth.tar", weights_only=False)
    assert (kept["epoch"], kept["iteration"]) == (0, kept["epoch_iterations"]) and kept["iteration"] > 0
    shutil.copy(next((synthetic_root / "videos").rglob("*.mp4")), corrupt)
    capsys.readouterr()
    results = linear(probe)
    dist.destroy_process_group()
    assert f"epoch 0 from iteration {kept['iteration']}" in capsys.readouterr().out
    assert torch.equal(torch.load(tmp_path / "out" / "checkpoint.pth.tar", weights_only=False)["state_dict"]
                       ["module.linear.weight"], kept["state_dict"]["module.linear.weight"])
    assert 0 <= results["multiview_acc1"] <= 100
    corrupt.write_bytes(b"\x00not a video" * 64)
    with pytest.raises(RuntimeError, match=error):
        knn(common + ["--nb_knn", "1", "--use_cuda", "False"] + opts)


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_knn_split_without_a_readable_video_is_an_error_naming_its_list(synthetic_root, checkpoint, tmp_path, split):
    """eval_knn.py and train_ssl.py's online kNN alike: an empty bank once divided by zero in the kNN vote, and no
    query scored top-1 0.0 (log.txt's knn_top1); both are the error naming the list and the prefix."""
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00not a video" * 64)
    lists = tmp_path / "lists"
    lists.mkdir()
    for src in (synthetic_root / "knn_splits").iterdir():
        (lists / src.name).write_text(f"{corrupt} 0\n{corrupt} 1\n" if split in src.name else src.read_text())
    prefix = synthetic_root / "videos"
    error = (rf"none of the 2 videos of .*ucf101_{split}_split_1_videos.txt "
             + re.escape(f"(DATA.PATH_PREFIX='{prefix}') could be read"))
    with pytest.raises(RuntimeError, match=error):
        knn(["--arch", "vit_tiny", "--pretrained_weights", checkpoint, "--num_workers", "0", "--dataset", "ucf101",
             "--nb_knn", "1", "--use_cuda", "False", "--output_dir", str(tmp_path / "out"), "--opts",
             "DATA.PATH_TO_DATA_DIR", str(lists), "DATA.PATH_PREFIX", str(prefix)] + OPTS)
    cfg = load_config_from(None, OPTS)
    online = OnlineKNN(cfg, torch.device("cpu"), "ucf101", str(lists), str(prefix), k=1, temperature=0.07,
                       batch_size=8, num_workers=0, decode_timeout=0)
    flags = "of the online kNN are train_ssl.py's --knn_data_path and --knn_path_prefix"
    with pytest.raises(RuntimeError, match=error + ".*" + flags):
        online.evaluate(build_backbone("vit_tiny", cfg))


@pytest.mark.parametrize("wrong", ["lists", "prefix"])
def test_online_knn_lists_or_videos_not_found_name_its_flags(synthetic_root, wrong, tmp_path):
    """train_ssl.py's online kNN reads its lists from --knn_data_path and joins --knn_path_prefix to them: the error
    of a wrong one (which names DATA.PATH_TO_DATA_DIR / DATA.PATH_PREFIX, the keys they set) names the flag too;
    it used to say only 'Set DATA.PATH_PREFIX', which the user had set, for the training lists."""
    lists, prefix = synthetic_root / "knn_splits", synthetic_root / "videos"
    if wrong == "lists":
        lists = tmp_path / "nowhere"
    else:
        prefix = tmp_path / "nowhere"
    key = "DATA.PATH_TO_DATA_DIR" if wrong == "lists" else "DATA.PATH_PREFIX"
    flags = re.escape(f"DATA.PATH_TO_DATA_DIR and DATA.PATH_PREFIX of the online kNN are train_ssl.py's "
                      f"--knn_data_path and --knn_path_prefix, here '{lists}' and '{prefix}'. ")
    with pytest.raises(FileNotFoundError, match=f"{flags}.*{key}"):
        OnlineKNN(load_config_from(None, OPTS), torch.device("cpu"), "ucf101", str(lists), str(prefix), k=1,
                  temperature=0.07, batch_size=8, num_workers=0, decode_timeout=0)


# ---------------------------------------------------------------------------------------------
# eval_linear.py on a stop signal: exit 3 with a checkpoint that a rerun continues exactly
# ---------------------------------------------------------------------------------------------
def _linear_state(out) -> dict:
    return torch.load(out / "checkpoint.pth.tar", weights_only=False)


def _assert_same_trained_state(a: dict, b: dict) -> None:
    """Two epoch-end checkpoint.pth.tar (no mid-epoch keys left) with the same classifier, SGD momentum,
    scheduler, epoch and best accuracy, bit for bit."""
    assert set(b) == set(a)
    for key in ("state_dict", "scheduler"):
        assert a[key].keys() == b[key].keys()
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]) if torch.is_tensor(value) else value == b[key][name], name
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]  # a momentum buffer for each classifier parameter
    assert sa.keys() == sb.keys() and len(sa) == sum(len(g["params"]) for g in a["optimizer"]["param_groups"])
    for index in sa:
        assert sa[index].keys() == sb[index].keys() == {"momentum_buffer"}
        assert torch.equal(sa[index]["momentum_buffer"], sb[index]["momentum_buffer"]), index
    assert (b["epoch"], b["best_acc"]) == (a["epoch"], a["best_acc"])


@pytest.fixture(scope="module")
def stop_lists(synthetic_root, tmp_path_factory):
    """17 train videos (one unreadable, replaced) in batches of 2: 9 iterations an epoch; 9 val videos (one
    unreadable, left out): 5 validation batches, 14 test batches (3 clips a video)."""
    return _lists_with_corrupt_videos(synthetic_root, tmp_path_factory.mktemp("stop_lists"), "splits",
                                      ["ucf101_train_split_1_videos.txt", "ucf101_val_split_1_videos.txt"])


def _stop_args(synthetic_root, checkpoint, lists, out) -> list[str]:
    return ["--arch", "vit_tiny", "--pretrained_weights", checkpoint, "--n_last_blocks", "1", "--lr", "0.5",
            "--batch_size_per_gpu", "2", "--num_workers", "0", "--epochs", "2", "--num_labels", "4",
            "--output_dir", str(out), "--opts", "DATA.PATH_TO_DATA_DIR", str(lists), "DATA.PATH_PREFIX",
            str(synthetic_root / "videos")] + OPTS


@pytest.fixture(scope="module")
def linear_reference(synthetic_root, checkpoint, stop_lists, tmp_path_factory):
    """The uninterrupted 2-epoch run of `_stop_args`: (its output folder, its returned stats)."""
    out = tmp_path_factory.mktemp("linear_reference")
    print_ = builtins.print
    stats = linear(_stop_args(synthetic_root, checkpoint, stop_lists, out))
    dist.destroy_process_group()
    builtins.print = print_
    return out, stats


# (where, the clip_features call that signals, the calls made when the run stops, the checkpoint's epoch and
# iteration, log.txt lines, what the message says). Calls 1-9: epoch 0's training, 10-14 its validation, 15-28
# epoch 1, 29-42 the test; the checks come every 5 batches of a pass and at its last.
STOPS = [
    ("training", 16, 19, (1, 5), 1, "after iteration 5/9 of epoch 1 and"),
    ("validation", 11, 14, (0, 9), 0, "after iteration 9/9 of epoch 0 (in the validation of epoch 0, which a "
                                      "resume runs again) and"),
    ("test", 30, 33, (2, None), 2, "after iteration 9/9 of epoch 1 (in the multi-view test, which a resume runs "
                                   "again) and"),
]


@pytest.mark.parametrize("where, nth, calls_made, saved, log_lines, message", STOPS, ids=[s[0] for s in STOPS])
def test_linear_probe_stops_on_sigterm_exits_3_and_resumes_as_an_uninterrupted_run(
        synthetic_root, checkpoint, stop_lists, linear_reference, tmp_path, monkeypatch, capsys, where, nth,
        calls_made, saved, log_lines, message):
    """A real SIGTERM in training, in a validation or in the final test: every rank stops at the next check
    (within 5 batches), the checkpoint holds the training done (a validation's epoch is saved as its last
    iteration; the test's run has its epoch-end checkpoint), the handlers are restored and the run exits with
    status 3. The rerun of the same command ends with the weights, optimizer and scheduler state, log.txt and
    results of the uninterrupted run (the abandoned pass runs again)."""
    reference, reference_stats = linear_reference
    args = _stop_args(synthetic_root, checkpoint, stop_lists, tmp_path)
    calls = signal_at_call(monkeypatch, eval_linear, "clip_features", nth)
    with pytest.raises(SystemExit) as stopped:
        linear(args)
    dist.destroy_process_group()
    monkeypatch.undo()
    assert len(calls) == calls_made
    assert_stopped(stopped, capsys.readouterr().out, message, tmp_path / "checkpoint.pth.tar")
    ckpt = _linear_state(tmp_path)
    assert (ckpt["epoch"], ckpt.get("iteration")) == saved
    assert (len(log_records(tmp_path)) == log_lines) if log_lines else not (tmp_path / "log.txt").exists()
    assert not (tmp_path / "linear_results.json").exists()
    if where == "validation":  # --evaluate of that checkpoint names what it holds
        linear(["--lc_pretrained_weights", str(tmp_path / "checkpoint.pth.tar")]
               + _stop_args(synthetic_root, checkpoint, stop_lists, tmp_path / "evaluated"))
        dist.destroy_process_group()
        assert "holds 9 of 9 iterations of epoch 0 (of 2, counted from 0)" in capsys.readouterr().out

    stats = linear(args)
    _assert_same_trained_state(_linear_state(reference), _linear_state(tmp_path))
    assert log_records(tmp_path) == log_records(reference)
    assert log_records(tmp_path)[0]["train_replaced_samples"] >= 1
    assert stats == reference_stats
    assert (tmp_path / "linear_results.json").read_text() == (reference / "linear_results.json").read_text()


def test_linear_probe_stops_cleanly_when_slurm_signals_its_loader_workers_too(
        synthetic_root, checkpoint, stop_lists, linear_reference, tmp_path, monkeypatch):
    """slurmstepd sends the time limit's or a preemption's SIGTERM to every process of the job step, DataLoader
    workers included (and srun passes the USR1 warning on the same way). With loader workers the run still stops
    at its next check with exit status 3 (no 'DataLoader worker killed by signal'), and resumes to the
    uninterrupted run."""
    import os
    import subprocess
    from utils import utils
    workers, real_seed_worker, real_features, calls = tmp_path / "workers", utils.seed_worker, \
        eval_linear.clip_features, []
    workers.mkdir()

    def recording_seed_worker(worker_id):
        (workers / str(os.getpid())).touch()
        real_seed_worker(worker_id)

    def signalled(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # epoch 0's training: its loader's workers are the only ones alive
            pids = [str(os.getpid())] + [p.name for p in workers.iterdir()]
            subprocess.run(["kill", "-TERM", *pids])  # a sender that is no worker's parent, as slurmstepd
        return real_features(*args, **kwargs)

    monkeypatch.setattr(utils, "seed_worker", recording_seed_worker)
    monkeypatch.setattr(eval_linear, "clip_features", signalled)
    args = _stop_args(synthetic_root, checkpoint, stop_lists, tmp_path / "out")
    args[args.index("--num_workers") + 1] = "2"
    with pytest.raises(SystemExit) as stopped:
        linear(args)
    dist.destroy_process_group()
    monkeypatch.undo()
    assert stopped.value.code == 3 and any(workers.iterdir())
    ckpt = _linear_state(tmp_path / "out")
    assert (ckpt["epoch"], ckpt["iteration"]) == (0, 5)
    linear(args)
    a, b = _linear_state(linear_reference[0]), _linear_state(tmp_path / "out")
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), name
    assert log_records(tmp_path / "out") == log_records(linear_reference[0])


def test_linear_probe_mid_epoch_resume_with_another_global_batch_continues_after_the_videos_done(
        synthetic_root, checkpoint, tmp_path, monkeypatch, capsys):
    """Stopped after 5 batches of 2 (10 of the 16 training videos), resumed with batches of 4: the epoch goes on
    at iteration 2 of 4 (videos 8-9 of the epoch's order seen again, none left out), not at iteration 5."""
    from datasets.seeding import SeededDataset
    common = ["--arch", "vit_tiny", "--pretrained_weights", checkpoint, "--n_last_blocks", "1", "--num_workers", "0",
              "--epochs", "1", "--output_dir", str(tmp_path), "--opts"] + _data_opts(synthetic_root, "splits")
    seen, real_getitem, real_features = [], SeededDataset.__getitem__, eval_linear.clip_features

    def recording(self, item):
        seen.append(item[0])
        return real_getitem(self, item)

    monkeypatch.setattr(SeededDataset, "__getitem__", recording)
    signal_at_call(monkeypatch, eval_linear, "clip_features", 2)
    with pytest.raises(SystemExit):
        linear(["--batch_size_per_gpu", "2"] + common)
    dist.destroy_process_group()
    assert _linear_state(tmp_path)["iteration"] == 5
    done, seen[:] = seen[:], []
    monkeypatch.setattr(eval_linear, "clip_features", real_features)
    capsys.readouterr()
    linear(["--batch_size_per_gpu", "4"] + common)
    assert len(done) == 10 and len(seen) == 8
    assert set(done) | set(seen) == set(range(16)) and len(set(done) & set(seen)) == 2
    assert ("global batch of 2 videos (1 process x 2), this run 4: 10 videos of epoch 0 were done; continuing at "
            "iteration 2 (2 videos are seen again)") in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# eval_linear.py --saveckp_iters: a kill -9 (no signal first) loses at most N iterations
# ---------------------------------------------------------------------------------------------
# Runs eval_linear.eval_linear once per job (tests/forked_runs.py), the child killed by SIGKILL at the N-th call of
# clip_features ("batch:N", before that batch's step) or of torch.save ("save:N": the temporary file is complete,
# the rename never happens). Each child logs its saves and its batch count; test code, no hook in eval_linear.py.
# argv[1]: a JSON list of [kill_at, log file, eval_linear argv]; prints the exit statuses (-9: killed) as JSON.
KILL_RUNNER = """
import json, os, signal, sys
sys.path.insert(0, {root!r})
import torch
import eval_linear
from tests.forked_runs import run_forked

def child(kill_at, argv):
    target, nth = kill_at.split(":") if kill_at else ("", 0)
    real_features, real_save, batches, saves = eval_linear.clip_features, torch.save, [], []

    def features(*args, **kwargs):
        batches.append(1)
        if target == "batch" and len(batches) == int(nth):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_features(*args, **kwargs)

    def save(obj, f, *args, **kwargs):
        saves.append(1)
        real_save(obj, f, *args, **kwargs)
        if target == "save" and len(saves) == int(nth):
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        print("saved", obj["epoch"], obj.get("iteration"), flush=True)

    eval_linear.clip_features, torch.save = features, save
    eval_linear.eval_linear(eval_linear.get_args_parser().parse_args(argv))
    print("batches:", len(batches))

print(json.dumps(run_forked(json.loads(sys.argv[1]), child)))
"""


def _saves(log: str) -> list[tuple]:
    """The (epoch, iteration) of each checkpoint a KILL_RUNNER child wrote (None: an epoch-end one)."""
    return [(int(e), None if i == "None" else int(i)) for e, i in
            (line.split()[1:] for line in log.splitlines() if line.startswith("saved "))]


def test_linear_probe_killed_without_a_signal_resumes_from_its_last_saveckp_iters_checkpoint(
        synthetic_root, checkpoint, stop_lists, tmp_path):
    """--saveckp_iters 3, 9 iterations an epoch: checkpoint.pth.tar after iterations 3 and 6 of each epoch (not
    9: the epoch-end save follows). A kill -9 in iteration 7 of epoch 1 keeps iteration 6: the rerun does only
    iterations 7-9 of epoch 1, then validation and test. Killed again mid-save (the epoch-end save: a complete
    temporary file, no rename), the iteration-6 checkpoint is intact, and the next rerun deletes the temporary
    file and resumes it again. The result is the uninterrupted run's, bit for bit: classifier, SGD state,
    scheduler, log.txt (whole-epoch means, skipped videos) and linear_results.json. Without --saveckp_iters only
    the epoch-end checkpoints are written (a kill loses the epoch in progress) and the run ends the same."""
    every, off, killed = tmp_path / "every3", tmp_path / "off", tmp_path / "killed"
    args = functools.partial(_stop_args, synthetic_root, checkpoint, stop_lists)
    jobs = [("", "every3", ["--saveckp_iters", "3"] + args(every)),
            ("batch:21", "kill_step", ["--saveckp_iters", "3"] + args(killed)),  # epoch 1's 7th training batch
            ("save:1", "kill_save", ["--saveckp_iters", "3"] + args(killed)),  # epoch 1's end
            ("", "resume", ["--saveckp_iters", "3"] + args(killed)),
            ("", "off", args(off))]
    statuses = run_jobs(KILL_RUNNER, tmp_path, [(kill_at, tmp_path / f"{name}.log", a) for kill_at, name, a in jobs])
    logs = [(tmp_path / f"{name}.log").read_text() for _, name, _ in jobs]
    assert statuses == [0, -9, -9, 0, 0], logs
    every_log, kill_step, kill_save, resume, off_log = logs
    assert _saves(every_log) == [(0, 3), (0, 6), (1, None), (1, 3), (1, 6), (2, None)]
    assert "batches: 42" in every_log  # 9 + 5 validation, 9 + 5, 14 test
    assert _saves(kill_step) == [(0, 3), (0, 6), (1, None), (1, 3), (1, 6)]
    resumed = f"Resumed from {killed / 'checkpoint.pth.tar'}: epoch 1 from iteration 6"
    assert resumed in kill_save and _saves(kill_save) == []
    assert resumed in resume and "Removed 1 temporary file(s)" in resume
    assert _saves(resume) == [(2, None)] and "batches: 22" in resume  # 3 training, 5 validation, 14 test
    assert _saves(off_log) == [(1, None), (2, None)] and "batches: 42" in off_log
    assert not list(killed.glob(".*.tmp"))

    for out in (killed, off):
        _assert_same_trained_state(_linear_state(every), _linear_state(out))
        assert _linear_state(out)["skipped_videos"] == _linear_state(every)["skipped_videos"]
        assert log_records(out) == log_records(every)
        assert (out / "linear_results.json").read_text() == (every / "linear_results.json").read_text()
    assert log_records(every)[0]["train_replaced_samples"] >= 1


# eval_linear.py's command line under torchrun, SIGTERM sent by rank `rank` to itself at its `nth` batch (training,
# validation or test: utils.evaluation.clip_features); test code, no hook in eval_linear.py.
SIGNAL_LAUNCHER = """
import atexit, os, runpy, signal, sys
sys.path.insert(0, {root!r})
from utils import evaluation
real, calls = evaluation.clip_features, []
atexit.register(lambda: sys.stderr.write(f"rank {{os.environ['RANK']}}: {{len(calls)}} batches\\n"))

def signalled(*args, **kwargs):
    calls.append(1)
    if len(calls) == {nth} and os.environ["RANK"] == "{rank}":
        os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)

evaluation.clip_features = signalled
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as stop:
    sys.stderr.write(f"rank {{os.environ['RANK']}} exits with {{stop.code}}\\n")
    raise
"""


def test_a_signal_on_one_rank_during_validation_stops_both_and_one_process_resumes(synthetic_root, checkpoint,
                                                                                  tmp_path):
    """2 processes, batches of 1: 8 training iterations each, then a validation of 7 videos (shards of 4 and 3,
    so rank 0 has a batch that rank 1 has not). Only rank 1 gets SIGTERM, at its first validation batch: both
    stop at the validation's check after batch 3 (the last one both have), rank 0 saves epoch 0 at iteration 8
    with both ranks' meters, and both exit with status 3. One process with batches of 2 (the same global batch)
    resumes it: it validates and tests, and ends as a one-process run of batches of 2 (up to float rounding:
    DDP averages the two ranks' gradients)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    lists = tmp_path / "lists"  # 16 train videos (no padding over 2 ranks), 7 val videos
    lists.mkdir()
    for src in (synthetic_root / "splits").iterdir():
        lines = src.read_text().splitlines()
        (lists / src.name).write_text("\n".join(lines[:-1] if "val" in src.name else lines) + "\n")
    common = ["--arch", "vit_tiny", "--pretrained_weights", checkpoint, "--n_last_blocks", "1", "--num_workers", "0",
              "--epochs", "1", "--num_labels", "4", "--lr", "0.5"]
    opts = ["--opts", "DATA.PATH_TO_DATA_DIR", str(lists), "DATA.PATH_PREFIX", str(synthetic_root / "videos")] + OPTS
    root = Path(eval_linear.__file__).resolve().parent
    launcher = tmp_path / "signal_launcher.py"
    launcher.write_text(SIGNAL_LAUNCHER.format(root=str(root), nth=9, rank=1))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    stopped = tmp_path / "stopped"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(launcher), str(root / "eval_linear.py"), *common, "--batch_size_per_gpu", "1",
                           "--dist_timeout", "1", "--output_dir", str(stopped), *opts],
                          env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    # each rank's own exit status: torchrun 2.5 reports only the first rank to exit, having stopped the other
    assert proc.returncode != 0 and "exitcode  : 3" in out, out[-3000:]
    assert "rank 0 exits with 3" in out and "rank 1 exits with 3" in out, out[-3000:]
    assert out.count("Stop signal SIGTERM: every rank stopped after iteration 8/8 of epoch 0 (in the validation of "
                     "epoch 0, which a resume runs again)") == 2, out[-3000:]
    assert "rank 0: 11 batches" in out and "rank 1: 11 batches" in out  # not rank 0's 4th validation batch
    ckpt = _linear_state(stopped)
    assert (ckpt["epoch"], ckpt["iteration"], ckpt["args"].world_size) == (0, 8, 2)
    assert len(ckpt["epoch_meters"]) == 2 and not (stopped / "log.txt").exists()

    res = linear(common + ["--batch_size_per_gpu", "2", "--output_dir", str(stopped)] + opts)
    dist.destroy_process_group()
    ref = linear(common + ["--batch_size_per_gpu", "2", "--output_dir", str(tmp_path / "one")] + opts)
    a, b = _linear_state(tmp_path / "one"), _linear_state(stopped)
    for name, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], value, rtol=1e-5, atol=1e-6)
    (got,), (want,) = log_records(stopped)[:1], log_records(tmp_path / "one")[:1]
    assert got.keys() == want.keys() and got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-5)
    assert (got["test_acc1"], res["multiview_acc1"], res["num_videos"]) == (want["test_acc1"], ref["multiview_acc1"], 7)
