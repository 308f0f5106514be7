"""What a user sees for common set-up mistakes: each error names the file or key and the fix."""
import logging
import os
import subprocess
from pathlib import Path

import pytest
import torch

from datasets import build_dataset, video_dataset
from models import vit_tiny_patch16_224
from tests.conftest import build_cfg
from utils.checkpoint import load_pretrained_weights
from utils.parser import DEFAULT_CFG, load_config_from

ROOT = Path(__file__).resolve().parents[1]


def test_wrong_path_prefix_fails_at_construction_naming_the_key(synthetic_root, tmp_path):
    cfg = build_cfg(synthetic_root / "annotations", tmp_path / "not_the_videos")
    with pytest.raises(FileNotFoundError, match=r"train\.csv: none of \d+ checked videos exists.*DATA\.PATH_PREFIX"):
        build_dataset("kinetics400", cfg, "train")


def _list_with_a_missing_video(synthetic_root, tmp_path, split):
    lines = (synthetic_root / "annotations" / f"{split}.csv").read_text().splitlines()
    (tmp_path / f"{split}.csv").write_text("\n".join(["gone/absent.mp4 0"] + lines) + "\n")
    return build_cfg(tmp_path, synthetic_root / "videos"), len(lines) + 1


def test_a_missing_training_video_is_replaced_and_counted(synthetic_root, tmp_path):
    cfg, n = _list_with_a_missing_video(synthetic_root, tmp_path, "train")
    ds = build_dataset("kinetics400", cfg, "train")
    assert len(ds) == n
    _, label, index, meta = ds[0]
    assert meta["skipped"] == 1 and index != 0 and label == ds.video_labels[index]


@pytest.mark.parametrize("slowfast", [False, True])
@pytest.mark.parametrize("mode", ["val", "test"])
def test_an_unreadable_evaluation_video_is_a_label_minus_one_placeholder(synthetic_root, tmp_path, mode, slowfast,
                                                                        caplog):
    cfg, _ = _list_with_a_missing_video(synthetic_root, tmp_path, "test" if mode == "test" else "val")
    ds = build_dataset("kinetics400", cfg, mode, slowfast=slowfast)
    video_dataset._LOGGED_FAILURES.discard(ds.video_paths[0])
    good_frames, good_label, _, good_meta = ds[ds.num_clips_per_video]
    assert good_label >= 0 and good_meta["skipped"] == 0
    with caplog.at_level(logging.WARNING, logger="datasets.video_dataset"):
        samples = [ds[i] for i in range(ds.num_clips_per_video)]  # every clip of the unreadable video
    for i, (frames, label, index, meta) in enumerate(samples):
        assert label == -1 and index == i and meta == {"skipped": 1}
        if slowfast:
            assert isinstance(frames, list) and len(frames) == 2
            assert [f.shape for f in frames] == [g.shape for g in good_frames]
            assert frames[1].shape == (3, 32, 16, 16) and all(not f.any() for f in frames)
        else:
            assert frames.shape == good_frames.shape == (3, 4, 32, 32) and not frames.any()
    assert ds.num_skipped == 1  # one video, however many clips
    logged = [r for r in caplog.records if "gone/absent.mp4" in r.getMessage()]
    assert len(logged) == 1 and "label -1" in logged[0].getMessage()  # once, with the path


def test_linear_probe_checkpoint_is_named_as_such(tmp_path):
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 1, "state_dict": {"module.linear.weight": torch.zeros(3, 48),
                                           "module.linear.bias": torch.zeros(3)}}, path)
    model = vit_tiny_patch16_224(embed_dim=48, depth=1, num_heads=2, img_size=32)
    with pytest.raises(ValueError, match=r"checkpoint\.pth\.tar.*linear classifier saved by eval_linear\.py"):
        load_pretrained_weights(model, path)


def test_a_file_that_is_not_a_checkpoint_says_so(tmp_path):
    path = tmp_path / "weights.pth"
    path.write_text("<html>404</html>")
    model = vit_tiny_patch16_224(embed_dim=48, depth=1, num_heads=2, img_size=32)
    with pytest.raises(RuntimeError, match=r"weights\.pth.*not a complete file written by torch\.save"):
        load_pretrained_weights(model, path)


def test_non_dict_entry_points_to_checkpoint_key(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"teacher": 0, "student": {}}, path)
    model = vit_tiny_patch16_224(embed_dim=48, depth=1, num_heads=2, img_size=32)
    with pytest.raises(ValueError, match="'teacher' is a int.*--checkpoint_key"):
        load_pretrained_weights(model, path)


def test_opts_typo_in_case_suggests_the_real_key():
    with pytest.raises(KeyError, match=r"'data\.num_frames'.*Did you mean DATA\.NUM_FRAMES"):
        load_config_from(DEFAULT_CFG, ["data.num_frames", "16"])


def test_opts_key_that_became_a_flag_names_the_flag():
    with pytest.raises(KeyError, match=r"TRAIN\.BATCH_SIZE.*--batch_size_per_gpu"):
        load_config_from(DEFAULT_CFG, ["TRAIN.BATCH_SIZE", "8"])


@pytest.mark.parametrize("script", ["train.sh", "slurm_train.sh"])
def test_train_script_without_data_path_stops_before_launch(tmp_path, script):
    env = {k: v for k, v in os.environ.items() if k != "DATA_PATH"}
    env.update(GPUS="1", PROJECT_PATH=str(ROOT), EXP_NAME=f"review_{tmp_path.name}")
    run = subprocess.run(["bash", str(ROOT / "scripts" / script), "--data_path", str(tmp_path / "nowhere")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert f"{tmp_path / 'nowhere'}/train.csv not found" in run.stderr and "DATA_PATH" in run.stderr
    assert not (ROOT / "checkpoints" / env["EXP_NAME"]).exists()
