"""visualize_attention.py: the CLS attention it reports is the model's own, checkpoints of every layout load
with their size read from the weights, and the CLI writes the PNG grid and the GIF."""
import argparse

import numpy as np
import pytest
import torch
from PIL import Image

import visualize_attention as va
from datasets import build_dataset
from datasets.synthetic import render_particles, write_video
from models import DINOHead, MultiCropWrapper, vit_tiny_patch16_224
from tests.conftest import build_cfg


def _model(**kwargs):
    torch.manual_seed(0)
    model = vit_tiny_patch16_224(depth=2, img_size=32, patch_size=16, num_frames=3, drop_path_rate=0.0, **kwargs)
    for p in model.parameters():  # make the temporal branch and every weight non-trivial
        p.data.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("attention_type", ["divided_space_time", "joint_space_time"])
def test_cls_attention_is_the_last_blocks_softmax_row(attention_type):
    model = _model(attention_type=attention_type)
    clip = torch.randn(1, 3, 3, 48, 32)  # 3 frames, a 3 x 2 patch grid (not square, not the stored size)
    got = va.cls_attention(model, clip)
    assert got.shape == (3, 3, 3, 2)  # heads, frames, h, w

    # Reference: the explicit attention path's full softmax matrix, read at the dropout of the last block's
    # spatial (divided) or joint attention.
    model.set_fused_attention(False)
    seen = []
    model.blocks[-1].attn.attn_drop.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    model.forward_features(clip)
    full = seen[0]  # divided: (T, heads, 1 + hw, 1 + hw); joint: (1, heads, 1 + hw*T, 1 + hw*T)
    if attention_type == "divided_space_time":
        want = full[:, :, 0, 1:].reshape(3, 3, 3, 2).transpose(0, 1)
    else:  # patch tokens are ordered (h w t)
        want = full[0, :, 0, 1:].reshape(3, 3, 2, 3).permute(0, 3, 1, 2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    total = got.sum(dim=(-2, -1))  # per head and frame: the share that did not go to the CLS token itself
    assert bool(((total > 0) & (total < 1)).all())


def _save_layouts(tmp_path, model):
    head = DINOHead(model.embed_dim, 16, use_bn=True)
    teacher = MultiCropWrapper(model, head).state_dict()
    released = tmp_path / "released.pth"
    torch.save(teacher, released)  # the flat backbone.* / head.* teacher dict
    training = tmp_path / "checkpoint.pth"
    torch.save({"teacher": teacher, "student": {f"module.{k}": torch.zeros_like(v) for k, v in teacher.items()},
                "epoch": 3}, training)
    return released, training


def test_checkpoints_load_with_their_size_read_from_the_weights(tmp_path):
    model = _model()
    released, training = _save_layouts(tmp_path, model)
    for path, key in ((released, "teacher"), (training, "teacher")):
        loaded = va.backbone_from_checkpoint(str(path), key)
        assert (len(loaded.blocks), loaded.patch_size, loaded.embed_dim) == (2, 16, 192)
        assert loaded.time_embed.shape[1] == 3 and loaded.pos_embed.shape[1] == 5 and not loaded.training
        for k, v in model.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)
    student = va.backbone_from_checkpoint(str(training), "student")
    assert all(float(v.abs().sum()) == 0 for v in student.state_dict().values())
    torch.save({"linear.weight": torch.zeros(3, 4), "linear.bias": torch.zeros(3)}, tmp_path / "lin.pth")
    with pytest.raises(ValueError, match="no backbone weights"):
        va.sized_like(str(tmp_path / "lin.pth"))


def test_cli_writes_grid_and_gif(tmp_path):
    released, _ = _save_layouts(tmp_path, _model())
    video = tmp_path / "dots.mp4"
    write_video(str(video), render_particles("rotate_cw", 20, 64, np.random.default_rng(0)))
    argv = ["--pretrained_weights", str(released), "--video", str(video), "--num_frames", "5", "--image_size",
            "48", "--output_dir", str(tmp_path / "out")]
    args = argparse.ArgumentParser(parents=[va.get_args_parser()]).parse_args(argv)
    png, gif = va.visualize(args)
    assert Image.open(png).format == "PNG"
    anim = Image.open(gif)
    assert anim.n_frames == 5  # one GIF frame per sampled video frame
    # each GIF frame: the video frame and 3 heads + their mean side by side, 48 px each, 2 px apart
    assert anim.size == (5 * 48 + 4 * 2, 48)

    frames, clip = va.read_clip(str(video), 5, 48)
    assert frames.shape == (5, 48, 48, 3) and frames.dtype == np.uint8 and clip.shape == (1, 3, 5, 48, 48)
    args.image_size = 40
    with pytest.raises(ValueError, match="not a multiple of the patch size 16"):
        va.visualize(args)


def test_the_clip_shown_is_the_evaluation_pipelines_val_clip_of_the_video(tmp_path):
    """read_clip cuts what an evaluation's val clip of the same frames is (short side 48, centre crop 48 of a 64 x 80
    video: bilinear without antialiasing, DATA.MEAN/STD), so the attention shown is that of the evaluated input."""
    rng = np.random.default_rng(0)
    write_video(str(tmp_path / "v.mp4"), rng.integers(0, 256, (25, 64, 80, 3), dtype=np.uint8))
    (tmp_path / "ucf101_val_split_1_videos.txt").write_text("v.mp4 0\n")
    # 5 frames x stride 5 at 30 fps span the 25 frames: the val clip's frames 0, 6, 12, 18, 24 are read_clip's
    cfg = build_cfg(tmp_path, tmp_path, tiny=False, **{"DATA.NUM_FRAMES": 5, "DATA.SAMPLING_RATE": 5,
                                                       "DATA.TRAIN_JITTER_SCALES": [48, 48], "DATA.TEST_CROP_SIZE": 48})
    val_clip = build_dataset("ucf101", cfg, "val")[0][0]
    shown, clip = va.read_clip(str(tmp_path / "v.mp4"), 5, 48)
    assert clip.shape == (1, 3, 5, 48, 48) and torch.equal(clip[0], val_clip)
    pixels = torch.from_numpy(shown).permute(3, 0, 1, 2).float() / 255  # the same pixels, de-normalised
    torch.testing.assert_close((pixels - 0.45) / 0.225, val_clip.clamp((0 - 0.45) / 0.225, (1 - 0.45) / 0.225),
                               rtol=0, atol=0.5 / 255 / 0.225 + 1e-6)


def test_a_bad_video_is_a_one_line_error_naming_the_flag(tmp_path, capsys):
    """A missing or undecodable --video: exit status 2 and one line on stderr naming --video, the path and the
    decoder's reason, no traceback (and no model loaded first)."""
    missing = tmp_path / "no_such.mp4"
    with pytest.raises(SystemExit) as exit_info:
        va.main(["--video", str(missing), "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.splitlines() == [f"Visualize the CLS attention of a video transformer: error: --video {missing}: "
                                "no such file."]
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00not a video" * 64)
    with pytest.raises(SystemExit) as exit_info:
        va.main(["--video", str(garbage), "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"error: --video {garbage}: cannot " in err  # the decoder's reason follows
    assert not (tmp_path / "out").exists()
    weights = tmp_path / "no_such.pth"
    with pytest.raises(SystemExit) as exit_info:
        va.main(["--video", str(garbage), "--pretrained_weights", str(weights), "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.splitlines()[-1] == ("Visualize the CLS attention of a video transformer: error: --pretrained_weights "
                                    f"{weights}: no such file.")
