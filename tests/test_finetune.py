"""eval_finetune.py: initialisation from every checkpoint layout (backbone unchanged, head new), an
end-to-end run that resumes bit-identically, and a short run that fits a small training set while every
weight moves."""
import argparse
import builtins
import json
import shutil

import pytest
import torch
import torch.distributed as dist

import eval_finetune
from datasets import build_dataset
from models import build_backbone
from tests.conftest import HostReads, assert_stopped, log_records, signal_at_call
from utils import utils
from utils.checkpoint import output_dir_lock
from utils.parser import load_config_from

# Tiny clips (tests/conftest.py videos): 4 frames, 32 px, a 2-block vit_tiny.
OPTS = ["DATA.TRAIN_CROP_SIZE", "32", "DATA.LOCAL_CROP_SIZE", "16", "DATA.TEST_CROP_SIZE", "32",
        "DATA.TRAIN_JITTER_SCALES", "[36,40]", "DATA.NUM_FRAMES", "4", "DATA.SAMPLING_RATE", "2", "MODEL.DEPTH", "2"]


@pytest.fixture(scope="module")
def teacher():
    """A tiny teacher backbone's state (what the released file holds under `backbone.`). As in a trained
    teacher, `temporal_fc` and `time_embed` are not the zeros of a fresh init."""
    torch.manual_seed(1)
    state = build_backbone("vit_tiny", load_config_from(None, OPTS)).state_dict()
    for key in [k for k in state if "temporal_fc" in k or k == "time_embed"]:
        state[key] = torch.randn_like(state[key]) * 0.02
    return state


@pytest.fixture(scope="module")
def released(teacher, tmp_path_factory):
    """The released kinetics400_vitb_ssl.pth layout: a flat teacher dict, `backbone.*` + the DINO head."""
    state = {f"backbone.{k}": v for k, v in teacher.items()}
    state.update({"head.mlp.0.weight": torch.randn(16, 192), "head.mlp.0.bias": torch.zeros(16),
                  "head.last_layer.weight_g": torch.ones(64, 1), "head.last_layer.weight_v": torch.randn(64, 16)})
    path = tmp_path_factory.mktemp("released") / "kinetics400_vitb_ssl.pth"
    torch.save(state, path)
    return str(path)


def _args(weights: str, key: str = "teacher", grad_checkpointing: bool = False) -> argparse.Namespace:
    return argparse.Namespace(arch="vit_tiny", patch_size=16, pretrained_weights=weights, checkpoint_key=key,
                              grad_checkpointing=grad_checkpointing)


def _assert_backbone_then_new_head(model, backbone: dict, num_labels: int = 5) -> None:
    state = model.state_dict()
    assert set(state) == set(backbone) | {"head.weight", "head.bias"}
    for key, value in backbone.items():
        assert torch.equal(state[key], value), key
    assert state["head.weight"].shape == (num_labels, 192) and torch.equal(state["head.bias"], torch.zeros(num_labels))
    assert 0.01 < float(state["head.weight"].std()) < 0.03  # TimeSformer's trunc-normal(0.02) init


def test_every_checkpoint_layout_initialises_the_backbone_unchanged_with_a_new_head(teacher, released, tmp_path):
    cfg = load_config_from(None, OPTS)
    _assert_backbone_then_new_head(eval_finetune.build_model(_args(released), cfg, 5), teacher)

    # A full training checkpoint: teacher by default, the student (DDP `module.` keys) on request.
    student = {k: v + 1 for k, v in teacher.items()}
    full = tmp_path / "checkpoint.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in teacher.items()},
                "student": {f"module.backbone.{k}": v for k, v in student.items()}, "epoch": 3,
                "args": argparse.Namespace(arch="vit_tiny")}, full)
    _assert_backbone_then_new_head(eval_finetune.build_model(_args(str(full)), cfg, 5), teacher)
    _assert_backbone_then_new_head(eval_finetune.build_model(_args(str(full), "student"), cfg, 5), student)

    # A supervised TimeSformer checkpoint (`model_state`, `model.` prefix): its 400-class head is dropped.
    timesformer = tmp_path / "TimeSformer_divST_8x32_224_K400.pyth"
    torch.save({"model_state": {**{f"model.{k}": v for k, v in teacher.items()},
                                "model.head.weight": torch.ones(400, 192), "model.head.bias": torch.ones(400)}},
               timesformer)
    model = eval_finetune.build_model(_args(str(timesformer), grad_checkpointing=True), cfg, 5)
    _assert_backbone_then_new_head(model, teacher)
    assert model.grad_checkpointing and model(torch.zeros(2, 3, 4, 32, 32)).shape == (2, 5)

    # A backbone of another depth is an error, not a partly random model.
    deeper = tmp_path / "deeper.pth"
    torch.save({f"backbone.{k}": v for k, v in build_backbone("vit_tiny", cfg, depth=3).state_dict().items()}, deeper)
    with pytest.raises(ValueError, match="has 3 blocks but --arch vit_tiny builds 2 .*--opts MODEL.DEPTH 3"):
        eval_finetune.build_model(_args(str(deeper)), cfg, 5)


def test_training_steps_never_read_a_value_back_to_the_host():
    # On CUDA each .item() / float(t) waits for the GPU: the per-batch top-1/top-5 and loss stay device tensors
    # until a progress line is printed, so the host reads of an epoch do not grow with its batches.
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", load_config_from(None, OPTS), num_classes=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    args = argparse.Namespace(accum_iter=1, epochs=1, log_freq=100, num_labels=5, saveckp_iters=0,
                              num_workers=0, output_dir=".", dataset="ucf101")

    def host_reads(batches: int) -> int:
        loader = [(torch.randn(2, 3, 4, 32, 32), torch.tensor([0, 2]), None, {"skipped": torch.tensor([0, 1])})
                  for _ in range(batches)]
        with HostReads() as reads:
            stats, _ = eval_finetune.train_one_epoch(model, loader, optimizer, None, 0, batches, args, None,
                                                     torch.device("cpu"))
        assert 0 <= stats["acc1"] <= stats["acc5"] == 100.0  # 3 classes: the top 5 hold every one
        assert stats["replaced_samples"] == batches and "skipped_videos" not in stats  # one replaced draw a batch
        return reads.count

    assert host_reads(6) == host_reads(2)


def test_training_top1_top5_means_are_the_exact_percentages_of_each_batch(capsys, device):
    # The per-batch accuracies stay on the device (no host sync), and still reach the meters as the percentages
    # the host computed before, hits * 100.0 / n in float64 (float32 made 1 hit of 3 read 33.333332; CUDA divides
    # by a host number as a product with its reciprocal, 1 ulp off).
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 2 * 2, 8)).to(device)
    torch.nn.init.zeros_(model[1].weight)
    with torch.no_grad():
        model[1].bias.copy_(torch.arange(8, 0, -1.0))  # every clip ranks the classes 0, 1, 2, ...
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    args = argparse.Namespace(accum_iter=1, epochs=1, log_freq=1, num_labels=8, saveckp_iters=0, num_workers=0,
                              output_dir=".", dataset="ucf101")
    # batches of 3 clips: class 0 (top-1), class 1 (top-5), class 7 (neither); then one of 7 clips
    targets = [torch.tensor([0, 1, 7])] * 2 + [torch.tensor([0, 0, 0, 4, 4, 5, 6])]
    loader = [(torch.zeros(len(t), 3, 4, 2, 2), t, None, {"skipped": torch.zeros(len(t), dtype=torch.long)})
              for t in targets]
    stats, _ = eval_finetune.train_one_epoch(model, loader, optimizer, None, 0, len(loader), args, None, device)
    top1 = [1 * 100.0 / 3, 1 * 100.0 / 3, 3 * 100.0 / 7]  # what the meters held when the host computed them
    top5 = [2 * 100.0 / 3, 2 * 100.0 / 3, 5 * 100.0 / 7]
    sizes = [3, 3, 7]
    assert stats["acc1"] == sum(v * n for v, n in zip(top1, sizes)) / 13
    assert stats["acc5"] == sum(v * n for v, n in zip(top5, sizes)) / 13
    assert "acc1: 33.333333 (33.333333)" in capsys.readouterr().out


def test_lr_is_timesformers_0_005_at_an_effective_batch_of_64_and_scales_linearly():
    """TimeSformer's lr 0.005 is for GLOBAL_BATCH_SIZE 64 (its train_net.py accumulates 8 iterations of 8 clips),
    not for the 8 clips of one iteration: 0.005 at 64 clips per step however they are made up, linear in between,
    x0.1 at epochs 11 and 14."""
    def lr(batch: int, accum: int, epoch: int = 0) -> float:
        args = argparse.Namespace(lr=0.005, lr_decay_epochs=[11, 14], lr_decay=0.1, batch_size_per_gpu=batch,
                                  accum_iter=accum)
        return eval_finetune.lr_at_epoch(args, epoch)

    assert lr(8, 8) == lr(1, 64) == lr(64, 1) == 0.005
    assert lr(8, 1) == pytest.approx(0.005 / 8) and lr(4, 8) == pytest.approx(0.0025)
    assert lr(16, 8) == pytest.approx(0.01)
    assert [lr(8, 8, e) for e in (10, 11, 13, 14)] == pytest.approx([0.005, 0.0005, 0.0005, 0.00005])


def test_a_resume_with_another_effective_batch_or_lr_says_so(capsys):
    """The lr and the effective batch are not part of a fine-tuning's identity (a resume applies new ones), but a
    resume that changes them says so, once, naming both: e.g. a checkpoint of a version whose lr 0.005 was for 8
    clips, resumed with today's 8 clips x 8 accumulated. The checkpoint's lr is its optimizer's at the epoch it
    trained last (an epoch-end checkpoint's `epoch` is the next one): unchanged settings across a decay say nothing."""
    def args(lr: float = 0.005, accum: int = 8) -> argparse.Namespace:
        return argparse.Namespace(lr=lr, lr_decay_epochs=[11, 14], lr_decay=0.1, batch_size_per_gpu=8, accum_iter=accum)

    def resume(saved: argparse.Namespace, epoch: int, lr: float, this_run: argparse.Namespace, iteration: int = 0):
        ckpt = {"args": saved, "epoch": epoch, "iteration": iteration,
                "optimizer_state": {"state": {}, "param_groups": [{"lr": lr, "params": [0]}]}}
        eval_finetune.note_another_step(ckpt, "out/checkpoint.pth", this_run)
        return capsys.readouterr().out

    older = argparse.Namespace(lr=0.005, batch_size_per_gpu=8, world_size=1)  # no --accum_iter then
    assert resume(older, 3, 0.005, args()) == (
        "Note: out/checkpoint.pth's run trained epoch 2 with an effective batch of 8 (8 clips x 1 process x 1 "
        "accumulated) at lr 0.005; this run has an effective batch of 64 (8 clips x 1 process x 8 accumulated) and lr "
        "0.005 for that epoch (--lr 0.005 x 64 / 64, with its decay steps) and goes on with them from epoch 3.\n")
    same = argparse.Namespace(**vars(args()), world_size=1)
    assert resume(same, 12, 0.005 * 0.1, args()) == ""  # trained epoch 11, decayed once
    assert resume(same, 11, 0.005, args()) == ""  # trained epoch 10, before the decay
    assert resume(same, 11, 0.005 * 0.1, args(), iteration=5) == ""  # mid-epoch: epoch 11 itself
    assert resume(same, 11, 0.005, args(), iteration=5).startswith(
        "Note: out/checkpoint.pth's run trained epoch 11 with an effective batch of 64 ")
    assert resume(same, 3, 0.005, args(lr=0.01)).endswith(
        "at lr 0.005; this run has an effective batch of 64 (8 clips x 1 process x 8 accumulated) and lr 0.01 for that "
        "epoch (--lr 0.01 x 64 / 64, with its decay steps) and goes on with them from epoch 3.\n")


def finetune(args: list[str]) -> dict:
    parser = argparse.ArgumentParser(parents=[eval_finetune.get_args_parser()])
    results = eval_finetune.eval_finetune(parser.parse_args(args))
    dist.destroy_process_group()
    return results


def test_unwritable_output_dir_fails_before_any_work(synthetic_root, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match=r"--output_dir .*a_file/out is not writable.*written there every epoch"):
        finetune(["--arch", "vit_tiny", "--num_workers", "0", "--output_dir", str(blocker / "out"), "--opts"]
                 + _lists(synthetic_root, tmp_path))


def test_a_folder_another_run_trains_in_is_refused_but_evaluate_is_not(synthetic_root, tmp_path):
    argv = ["--arch", "vit_tiny", "--num_workers", "0", "--output_dir", str(tmp_path / "out"), "--opts"]
    argv += _lists(synthetic_root, tmp_path)
    with output_dir_lock(tmp_path / "out"):  # a run still writing there (README "Reliability")
        with pytest.raises(RuntimeError, match=rf"--output_dir {tmp_path / 'out'} is in use by another run"):
            finetune(argv)
        dist.destroy_process_group()
        assert not (tmp_path / "out" / "config.json").exists()
        with pytest.raises(FileNotFoundError, match="--evaluate: no fine-tuned model"):  # past the lock
            finetune(["--evaluate"] + argv)


def _lists(synthetic_root, tmp_path, corrupt: bool = False, per_class: int | None = None, val_is_train=False):
    """UCF-101 lists from the synthetic set: optionally the first `per_class` train videos of each class,
    val = train, and an unreadable video (absolute path) in the middle of both lists."""
    out = tmp_path / "lists"
    out.mkdir()
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(b"\x00not a video" * 64)
    train = (synthetic_root / "splits" / "ucf101_train_split_1_videos.txt").read_text().splitlines()
    val = (synthetic_root / "splits" / "ucf101_val_split_1_videos.txt").read_text().splitlines()
    if per_class:
        train = [l for l in train if int(l.split("_")[-1][:3]) < per_class]
    if val_is_train:
        val = list(train)
    for name, lines in (("train", train), ("val", val)):
        if corrupt:
            lines.insert(len(lines) // 2, f"{bad} 1")
        (out / f"ucf101_{name}_split_1_videos.txt").write_text("\n".join(lines) + "\n")
    return ["DATA.PATH_TO_DATA_DIR", str(out), "DATA.PATH_PREFIX", str(synthetic_root / "videos")]


@pytest.mark.parametrize("mode", ["val", "test"])
def test_a_split_without_a_readable_video_is_an_error_not_top1_0(synthetic_root, released, tmp_path, mode):
    """As in eval_linear.py: the validation or test of a list none of whose videos can be read stops, naming it."""
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(b"\x00not a video" * 64)
    (tmp_path / "ucf101_val_split_1_videos.txt").write_text(f"{bad} 0\n{bad} 1\n")
    cfg = load_config_from(None, OPTS + ["DATA.PATH_TO_DATA_DIR", str(tmp_path), "TEST.NUM_SPATIAL_CROPS", "1"])
    dataset = build_dataset("ucf101", cfg, mode)
    args = argparse.Namespace(batch_size_per_gpu=4, num_workers=0, num_labels=4, ensemble="sum", decode_timeout=0)
    with pytest.raises(RuntimeError, match=r"none of the 2 videos of .*ucf101_val_split_1_videos.txt .*could be read"):
        eval_finetune.evaluate(eval_finetune.build_model(_args(released), cfg, 4), dataset, args, None,
                               torch.device("cpu"))


def test_an_unreadable_val_split_keeps_the_epochs_training(synthetic_root, released, tmp_path):
    """No val video readable after an epoch's training: the error comes after a checkpoint at the epoch's last
    iteration, so the rerun after the fix validates that epoch instead of training it again."""
    data = _lists(synthetic_root, tmp_path, per_class=2)
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(b"\x00not a video" * 64)
    (tmp_path / "lists" / "ucf101_val_split_1_videos.txt").write_text(f"{bad} 0\n{bad} 1\n")
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match=r"none of the 2 videos of .*ucf101_val_split_1_videos.txt .*could be read"
                                           rf".* The training of epoch 0 is kept in {out / 'checkpoint.pth'}"):
        finetune(["--arch", "vit_tiny", "--pretrained_weights", released, "--batch_size_per_gpu", "4",
                  "--num_workers", "0", "--epochs", "1", "--output_dir", str(out), "--opts"] + data + OPTS)
    kept = torch.load(out / "checkpoint.pth", weights_only=False)
    assert kept["epoch"] == 0 and kept["iteration"] == 2  # 8 train videos (2 per class) in batches of 4


def test_finetune_end_to_end_resumes_bit_identically(synthetic_root, released, tmp_path, capsys):
    """2 epochs in one go vs 1 epoch + resume: identical weights and optimizer state. The lists hold an
    unreadable video: replaced (and counted) in training, left out (and counted) in val and test."""
    data = _lists(synthetic_root, tmp_path, corrupt=True)
    common = ["--arch", "vit_tiny", "--pretrained_weights", released, "--batch_size_per_gpu", "4",
              "--accum_iter", "2", "--num_workers", "0", "--lr", "0.08", "--log_freq", "2"]
    once, resumed = tmp_path / "once", tmp_path / "resumed"
    res = finetune(common + ["--epochs", "2", "--output_dir", str(once), "--opts"] + data + OPTS)
    out = capsys.readouterr().out.splitlines()
    warnings = [line for line in out if "training draws" in line]
    # the progress lines of the validations and the test say which runs (not the kNN's "Extracting features:")
    labels = [line.split("  [")[0] for line in out if "  [" in line and "eta:" in line and "Epoch: [" not in line]
    assert sorted(set(labels)) == ["Test:", "Val (epoch 0):", "Val (epoch 1):"]
    finetune(common + ["--epochs", "1", "--output_dir", str(resumed), "--opts"] + data + OPTS)
    assert torch.load(resumed / "checkpoint.pth", weights_only=False)["epoch"] == 1
    killed_save = resumed / ".checkpoint.pth.123.abcd.tmp"  # what a save killed mid-write leaves
    killed_save.write_bytes(b"partial")
    res_resumed = finetune(common + ["--epochs", "2", "--output_dir", str(resumed), "--opts"] + data + OPTS)
    assert not killed_save.exists()  # the next training run deletes it

    a = torch.load(once / "checkpoint.pth", weights_only=False)
    b = torch.load(resumed / "checkpoint.pth", weights_only=False)
    assert a["epoch"] == b["epoch"] == 2
    assert a["model_state"].keys() == b["model_state"].keys()
    for key in a["model_state"]:
        assert torch.equal(a["model_state"][key], b["model_state"][key]), key
    for pa, pb in zip(a["optimizer_state"]["state"].values(), b["optimizer_state"]["state"].values()):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])
    # lr 0.08 x effective batch (4 x 1 process x 2 accumulated) / 64; the recipe's SGD settings.
    group = a["optimizer_state"]["param_groups"][0]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (0.01, 0.9, 1e-4, True)
    assert res_resumed == res

    # log.txt: one line per epoch (train + val), then the test; the resumed run appends to its log.
    once_log, resumed_log = log_records(once), log_records(resumed)
    assert [l.get("epoch") for l in once_log] == [0, 1, None]
    assert [l.get("epoch") for l in resumed_log] == [0, None, 1, None]
    assert once_log[1] == resumed_log[2]
    epoch = once_log[0]
    assert {"train_loss", "train_acc1", "train_lr", "val_acc1", "val_loss"} <= set(epoch)
    assert 0 <= json.loads((once / "log.txt").read_text().splitlines()[0])["train_data_wait"] < 1
    assert "val_acc5" not in epoch  # top-5 only with at least 5 classes
    assert epoch["train_replaced_samples"] >= 1 and epoch["val_skipped_videos"] == 1
    # each epoch trains on 16 of the 17 train clips (4 whole batches of 4); past 5 % of the draws replaced, a
    # warning at the epoch's end
    replaced = [line["train_replaced_samples"] for line in once_log[:2]]
    assert warnings == [f"Epoch {e}: {n} of the {16 + n} training draws ({n / (16 + n):.0%}) were unreadable videos, "
                        "replaced by others: the epoch trained on the readable rest of the list; list them with "
                        "`python -m datasets.preprocessing.check_videos --list "
                        f"{tmp_path / 'lists' / 'ucf101_train_split_1_videos.txt'} --prefix "
                        f"{synthetic_root / 'videos'}` and train on its cleaned list." for e, n in enumerate(replaced)
                        if n / (16 + n) > 0.05]
    assert warnings
    assert epoch["sequential_decodes"] == 0  # generated H.264 mp4s are decoded by random access
    # The multi-view test: 1 x 3 clips of the 8 readable val videos; the unreadable one is counted.
    results = json.loads((once / "finetune_results.json").read_text())
    assert results == res
    assert (res["split"], res["test_num_videos"], res["test_num_clips_per_video"]) == (1, 8, 3)
    assert (res["test_multiview_skipped_videos"], res["test_multiview_skipped_clips"]) == (1, 3)
    assert 0 <= res["test_multiview_acc1"] <= 100 and res["epoch"] == 2 and res["sequential_decodes"] == 0
    assert any(p.name.startswith("events.out.tfevents") for p in (once / "tb").iterdir())

    # --evaluate with slow-fast clips: the saved model, nothing trained.
    ev = finetune(common + ["--evaluate", "--slowfast_eval", "True", "--output_dir", str(once), "--opts"]
                  + data + OPTS)
    assert ev["slowfast_eval"] and ev["test_num_videos"] == 8 and ev["epoch"] == 2 and ev["sequential_decodes"] == 0
    # the training's config files stay; the evaluation's arguments go beside them
    assert not json.loads((once / "config.json").read_text())["evaluate"]
    assert json.loads((once / "config_evaluate.json").read_text())["evaluate"]
    assert (once / "config_evaluate.yaml").exists()
    assert torch.equal(torch.load(once / "checkpoint.pth", weights_only=False)["model_state"]["head.weight"],
                       a["model_state"]["head.weight"])

    # Another initialisation with the same --output_dir (finetune.sh's default EXP_NAME ft_$DATASET): an
    # error, not the first run's model resumed under the new checkpoint's name.
    state = torch.load(released, weights_only=True)
    state["backbone.norm.bias"] = state["backbone.norm.bias"] + 0.5
    torch.save(state, tmp_path / "other.pth")
    other = [str(tmp_path / "other.pth") if a == released else a for a in common]
    with pytest.raises(ValueError, match=r"checkpoint.pth is a fine-tuning of another initialisation than "
                                         r"--pretrained_weights .*other.pth.*EXP_NAME="):
        finetune(other + ["--epochs", "3", "--output_dir", str(once), "--opts"] + data + OPTS)
    dist.destroy_process_group()
    # --evaluate tests the checkpoint, which holds every weight: no --pretrained_weights is needed, another one
    # gets a note (and no advice to delete the checkpoint); both score the model as the training's own test did.
    capsys.readouterr()
    noted = finetune(other + ["--evaluate", "--output_dir", str(once), "--opts"] + data + OPTS)
    out = capsys.readouterr().out
    assert f"Note: {once / 'checkpoint.pth'} is a fine-tuning of another initialisation than --pretrained_weights " \
           f"{tmp_path / 'other.pth'}; --evaluate tests the weights" in out and "delete" not in out
    bare = [a for a in common if a not in ("--pretrained_weights", released)]
    alone = finetune(bare + ["--evaluate", "--output_dir", str(once), "--opts"] + data + OPTS)
    assert "Note:" not in capsys.readouterr().out
    # the results name the tested model's own initialisation and best val, not this command's unused flag
    for scored in (noted, alone):
        assert (scored["pretrained_weights"], scored["checkpoint_key"]) == (released, "teacher")
        assert scored["best_val_acc1"] == res["best_val_acc1"]
    tested = {k: v for k, v in res.items() if k.startswith("test_")}
    assert {k: v for k, v in noted.items() if k.startswith("test_")} == tested
    assert {k: v for k, v in alone.items() if k.startswith("test_")} == tested
    # Another run's lists (one train line less, or another split's) or seed: an error naming what differs (a new
    # --epochs does not).
    edited = tmp_path / "edited"
    shutil.copytree(data[1], edited)
    train_list = edited / "ucf101_train_split_1_videos.txt"
    train_list.write_text("".join(train_list.read_text().splitlines(keepends=True)[:-1]))
    for mode in ("train", "val"):  # those lists as split 2's: DATA.SPLIT 2 reads them
        name = f"ucf101_{mode}_split_{{}}_videos.txt"
        shutil.copy(edited / name.format(1), tmp_path / "lists" / name.format(2))
    for extra, lists, differs in ((["--seed", "1"], data, r"--seed: checkpoint 0, this run 1\."),
                                  ([], ["DATA.PATH_TO_DATA_DIR", str(edited)] + data[2:],
                                   r"train list: checkpoint \S*lists/ucf101_train\S* \(sha1 \w+\), this run "
                                   r"\S*edited/ucf101_train\S* \(sha1 \w+\)\."),
                                  ([], data + ["DATA.SPLIT", "2"],
                                   r"train list: checkpoint \S*lists/ucf101_train_split_1_videos.txt \(sha1 \w+\), "
                                   r"this run \S*lists/ucf101_train_split_2_videos.txt \(sha1 \w+\)\.")):
        with pytest.raises(ValueError, match=rf"checkpoint.pth holds another fine-tuning run: {differs} .*EXP_NAME="):
            finetune(common + ["--epochs", "3"] + extra + ["--output_dir", str(once), "--opts"] + lists + OPTS)
        dist.destroy_process_group()
    # --evaluate on split 2, whose test videos a split-1 model largely trained on: refused, naming both splits
    with pytest.raises(ValueError, match=r"checkpoint.pth was trained on split 1 of ucf101 \(\S*lists/ucf101_train_split_"
                                         r"1_videos.txt\); this --evaluate tests split 2 \(DATA.SPLIT\).* Pass --opts "
                                         r"DATA.SPLIT 1 to test it, or train a model on split 2 in another --output_dir"):
        finetune(common + ["--evaluate", "--output_dir", str(once), "--opts"] + data + ["DATA.SPLIT", "2"] + OPTS)
    dist.destroy_process_group()
    assert json.loads((once / "config.json").read_text())["epochs"] == 2  # the record of the run that trained it
    assert torch.load(once / "checkpoint.pth", weights_only=False)["epoch"] == 2


def test_short_finetune_fits_a_small_training_set_and_moves_every_weight(synthetic_root, released, teacher, tmp_path):
    """8 videos (2 per class), val = train, no weight decay (so a weight that moves had a gradient), no
    flip or scale jitter: the recipe's schedule over 14 epochs reaches 100 % on the training videos. At
    --lr 0.04 it does for every --seed 0-7 on torch 2.5.1 and 2.14.1; at 0.16 it ended at 75-87.5 % for some
    (torch 2.5.1 at seed 0: its drop-path masks are other draws than 2.14's)."""
    data = _lists(synthetic_root, tmp_path, per_class=2, val_is_train=True)
    easy = ["DATA.TRAIN_JITTER_SCALES", "[32,32]", "DATA.RANDOM_FLIP", "False", "TEST.NUM_SPATIAL_CROPS", "1"]
    out = tmp_path / "fit"
    args = ["--arch", "vit_tiny", "--pretrained_weights", released, "--batch_size_per_gpu", "4", "--num_workers",
            "0", "--lr", "0.04", "--weight_decay", "0", "--epochs", "14", "--val_freq", "100",
            "--output_dir", str(out), "--opts"] + data + OPTS + easy
    res = finetune(args)
    log = log_records(out)
    assert log[-2]["epoch"] == 13 and log[-2]["train_acc1"] == 100.0 and log[-2]["train_loss"] < 0.1
    assert log[0]["train_acc1"] < 100.0 and log[-2]["val_acc1"] == 100.0 and res["test_multiview_acc1"] == 100.0

    # Every tensor moved away from its initialisation: the backbone from the released weights, the head
    # from its random init (rebuilt with the run's seed).
    final = torch.load(out / "checkpoint.pth", weights_only=False)["model_state"]
    utils.fix_random_seeds(0)
    cfg = load_config_from(None, data + OPTS + easy)
    init = eval_finetune.build_model(_args(released), cfg, 4).state_dict()
    assert all(torch.equal(init[k], v) for k, v in teacher.items())
    still = [k for k in final if (final[k] - init[k]).abs().max() < 1e-6]
    assert not still, still


class Preempted(Exception):
    """Stands for the job's end right after a mid-epoch checkpoint (the file on disk is all a resume sees)."""


@pytest.mark.parametrize("accum_iter, stop_at", [(1, 3), (2, 4)])
def test_mid_epoch_checkpoint_resumes_as_an_uninterrupted_run(synthetic_root, released, tmp_path, monkeypatch,
                                                              accum_iter, stop_at):
    """--saveckp_iters 3: 2 epochs in one go vs a run stopped right after its first mid-epoch save of epoch 1
    and resumed with the same command: the same clips, augmentation and drop-path draws, hence identical weights,
    optimizer state and log.txt (whole-epoch means, skipped videos). With --accum_iter 2 the save waits for the
    optimizer step: after batch 4, not 3. Drop path 0.1 and an unreadable training video are on."""
    data = _lists(synthetic_root, tmp_path, corrupt=True)
    common = ["--arch", "vit_tiny", "--pretrained_weights", released, "--batch_size_per_gpu", "2",
              "--accum_iter", str(accum_iter), "--saveckp_iters", "3", "--num_workers", "0", "--lr", "0.08",
              "--epochs", "2", "--opts"] + data + OPTS
    once, stopped = tmp_path / "once", tmp_path / "stopped"
    finetune(["--output_dir", str(once)] + common)

    real_save, mid_saves = eval_finetune.atomic_save, []

    def save_then_stop(state, path):
        real_save(state, path)
        if "iteration" in state:
            mid_saves.append((state["epoch"], state["iteration"]))
            if state["epoch"] == 1:
                raise Preempted

    monkeypatch.setattr(eval_finetune, "atomic_save", save_then_stop)
    with pytest.raises(Preempted):
        finetune(["--output_dir", str(stopped)] + common)
    dist.destroy_process_group()
    monkeypatch.undo()
    assert mid_saves == [(0, stop_at), (0, 6), (1, stop_at)]
    ckpt = torch.load(stopped / "checkpoint.pth", weights_only=False)
    assert (ckpt["epoch"], ckpt["iteration"]) == (1, stop_at) and len(log_records(stopped)) == 1
    finetune(["--output_dir", str(stopped)] + common)

    a = torch.load(once / "checkpoint.pth", weights_only=False)
    b = torch.load(stopped / "checkpoint.pth", weights_only=False)
    assert set(a) == set(b) == {"epoch", "model_state", "optimizer_state", "scaler", "best_acc1", "args", "cfg",
                                "init_backbone", "run", "epoch_log"}
    for key in a["model_state"]:
        assert torch.equal(a["model_state"][key], b["model_state"][key]), key
    for pa, pb in zip(a["optimizer_state"]["state"].values(), b["optimizer_state"]["state"].values()):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])
    once_log, stopped_log = log_records(once), log_records(stopped)
    assert [l.get("epoch") for l in once_log] == [0, 1, None]
    assert once_log == stopped_log
    assert once_log[1]["train_replaced_samples"] >= 1


def test_sigterm_saves_the_step_reached_exits_3_and_resumes_as_an_uninterrupted_run(synthetic_root, released,
                                                                                   tmp_path, monkeypatch):
    """A real SIGTERM during batch 2 of epoch 1 (8 batches, no --saveckp_iters): training goes on to the first
    stop check (optimizer step 5), writes the mid-epoch checkpoint there and exits with status 3, handlers
    restored; the rerun ends with the weights and log.txt of an uninterrupted run."""
    import signal
    data = _lists(synthetic_root, tmp_path, corrupt=True)
    common = ["--arch", "vit_tiny", "--pretrained_weights", released, "--batch_size_per_gpu", "2",
              "--num_workers", "0", "--lr", "0.08", "--epochs", "2", "--opts"] + data + OPTS
    once, stopped = tmp_path / "once", tmp_path / "stopped"
    finetune(["--output_dir", str(once)] + common)

    real_top, calls = eval_finetune.topk_hits, []

    def signalled(*args):  # called once per batch, after its backward
        calls.append(1)
        if len(calls) == 8 + 2:
            signal.raise_signal(signal.SIGTERM)
        return real_top(*args)

    monkeypatch.setattr(eval_finetune, "topk_hits", signalled)
    with pytest.raises(SystemExit) as stop:
        finetune(["--output_dir", str(stopped)] + common)
    dist.destroy_process_group()
    monkeypatch.undo()
    assert stop.value.code == 3 and len(calls) == 8 + 5
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    ckpt = torch.load(stopped / "checkpoint.pth", weights_only=False)
    assert (ckpt["epoch"], ckpt["iteration"]) == (1, 5) and len(log_records(stopped)) == 1
    finetune(["--output_dir", str(stopped)] + common)

    a = torch.load(once / "checkpoint.pth", weights_only=False)
    b = torch.load(stopped / "checkpoint.pth", weights_only=False)
    for key in a["model_state"]:
        assert torch.equal(a["model_state"][key], b["model_state"][key]), key
    assert log_records(once) == log_records(stopped)


@pytest.fixture(scope="module")
def stop_reference(synthetic_root, released, tmp_path_factory):
    """The command of the evaluation-stop tests and its uninterrupted run: (argv without --output_dir, the run's
    folder, its results). One unreadable video in each list: 8 training batches of 2 an epoch, 5 validation
    batches, 14 test batches (3 clips of 9 videos), 2 epochs."""
    root = tmp_path_factory.mktemp("finetune_stop")
    argv = ["--arch", "vit_tiny", "--pretrained_weights", released, "--batch_size_per_gpu", "2", "--num_workers",
            "0", "--lr", "0.08", "--epochs", "2", "--opts"] + _lists(synthetic_root, root, corrupt=True) + OPTS
    print_ = builtins.print
    try:
        results = finetune(["--output_dir", str(root / "reference")] + argv)
    finally:
        builtins.print = print_
    return argv, root / "reference", results


# (the pass, the epoch whose training it follows, the `predict` call that signals (one per validation / test batch),
# the calls made when the run stops, the checkpoint's epoch and iteration, log.txt lines). Calls 1-5: epoch 0's
# validation, 6-10 epoch 1's, 11-24 the test; the checks come every 5 batches of a pass and at its last.
@pytest.mark.parametrize("interrupted, epoch, nth, calls_made, saved, log_lines", [
    ("the validation of epoch 0", 0, 2, 5, (0, 8), 0),
    ("the multi-view test", 1, 12, 15, (2, None), 2)], ids=["validation", "test"])
def test_sigterm_in_a_validation_or_the_test_exits_3_and_the_rerun_ends_as_an_uninterrupted_run(
        stop_reference, tmp_path, monkeypatch, capsys, interrupted, epoch, nth, calls_made, saved, log_lines):
    """A real SIGTERM in the validation of epoch 0 or in the final test: the pass is abandoned at its next check
    (the test's after 5 of its 14 batches), the handlers are restored and the run exits with status 3. A stopped
    validation leaves epoch 0 saved as trained to its last step (the rerun trains nothing of it and validates
    again), a stopped test the epoch-end checkpoint (the rerun only tests). The rerun ends with the weights,
    optimizer, log.txt and results of the uninterrupted run."""
    argv, reference, reference_results = stop_reference
    calls = signal_at_call(monkeypatch, eval_finetune, "predict", nth)  # once per validation / test batch
    with pytest.raises(SystemExit) as stopped:
        finetune(["--output_dir", str(tmp_path)] + argv)
    dist.destroy_process_group()
    monkeypatch.undo()
    assert len(calls) == calls_made
    assert_stopped(stopped, capsys.readouterr().out, f"after iteration 8/8 of epoch {epoch} (in {interrupted}, which "
                   "a resume runs again) and", tmp_path / "checkpoint.pth")
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=False)
    assert (ckpt["epoch"], ckpt.get("iteration")) == saved
    assert (len(log_records(tmp_path)) == log_lines) if log_lines else not (tmp_path / "log.txt").exists()
    assert not (tmp_path / eval_finetune.RESULTS_NAME).exists()

    results = finetune(["--output_dir", str(tmp_path)] + argv)
    a = torch.load(reference / "checkpoint.pth", weights_only=False)
    b = torch.load(tmp_path / "checkpoint.pth", weights_only=False)
    assert set(b) == set(a) and (b["epoch"], b["best_acc1"]) == (a["epoch"], a["best_acc1"])
    for key in a["model_state"]:
        assert torch.equal(a["model_state"][key], b["model_state"][key]), key
    for pa, pb in zip(a["optimizer_state"]["state"].values(), b["optimizer_state"]["state"].values()):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])
    assert log_records(tmp_path) == log_records(reference)
    assert results == reference_results
    assert (tmp_path / eval_finetune.RESULTS_NAME).read_text() == (reference / eval_finetune.RESULTS_NAME).read_text()


def test_mid_epoch_resume_with_another_global_batch_continues_after_the_videos_done(synthetic_root, released,
                                                                                   tmp_path, monkeypatch, capsys):
    """Stopped after 3 batches of 2 (6 of the 16 training videos), resumed with batches of 4: the epoch goes on
    at batch 1 of 4 (videos 4-5 of the epoch's order seen again, none left out), not at batch 3."""
    common = ["--arch", "vit_tiny", "--pretrained_weights", released, "--saveckp_iters", "3", "--num_workers", "0",
              "--epochs", "1", "--output_dir", str(tmp_path / "out"), "--opts"] + _lists(synthetic_root, tmp_path) + OPTS
    seen, real_getitem = [], eval_finetune.SeededDataset.__getitem__

    def recording(self, item):
        seen.append(item[0])
        return real_getitem(self, item)

    def save_then_stop(state, path):
        real_save(state, path)
        if "iteration" in state:
            raise Preempted

    real_save = eval_finetune.atomic_save
    monkeypatch.setattr(eval_finetune.SeededDataset, "__getitem__", recording)
    monkeypatch.setattr(eval_finetune, "atomic_save", save_then_stop)
    with pytest.raises(Preempted):
        finetune(["--batch_size_per_gpu", "2"] + common)
    dist.destroy_process_group()
    done, seen[:] = seen[:6], []
    monkeypatch.setattr(eval_finetune, "atomic_save", real_save)
    capsys.readouterr()
    finetune(["--batch_size_per_gpu", "4"] + common)
    assert len(seen) == 12 and set(done) | set(seen) == set(range(16)) and len(set(done) & set(seen)) == 2
    assert (f"Note: {tmp_path / 'out' / 'checkpoint.pth'}'s run trained epoch 0 with an effective batch of 2 (2 clips "
            "x 1 process x 1 accumulated) at lr 0.00015625; this run has an effective batch of 4 (4 clips x 1 process "
            "x 1 accumulated) and lr 0.0003125 for that epoch") in capsys.readouterr().out
