"""Weights in and out: SVT/TimeSformer checkpoint layouts, ImageNet init, hub entry, save/resume."""
import argparse
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed as dist
from torch import nn

import hubconf
from models import DINOHead, MultiCropWrapper, VisionTransformer, build_backbone, vit_tiny_patch16_224
from utils.checkpoint import (atomic_save, load_imagenet_init, load_pretrained_weights, output_dir_lock,
                              restart_from_checkpoint, safe_torch_load)
from utils.utils import get_params_groups

TINY = dict(embed_dim=48, depth=2, num_heads=3, drop_path_rate=0.0, img_size=32)


def tiny(seed: int, **kw) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(**{**TINY, **kw})
    with torch.no_grad():  # make every tensor distinct from a fresh init
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def wrapper(seed: int) -> MultiCropWrapper:
    return MultiCropWrapper(tiny(seed), DINOHead(48, 32, hidden_dim=16, bottleneck_dim=8))


def assert_same_backbone(model: nn.Module, reference: nn.Module) -> None:
    ref = reference.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k


class NotAllowed:
    pass


@pytest.fixture
def training_checkpoint(tmp_path):
    """A checkpoint in the layout of the original train_ssl.py (spec 7.1)."""
    student, teacher = wrapper(1), wrapper(2)
    ddp_student_state = {f"module.{k}": v for k, v in student.state_dict().items()}
    optimizer = torch.optim.AdamW(student.parameters())
    ckpt = {
        "student": ddp_student_state, "teacher": teacher.state_dict(), "motion_student": 0,
        "motion_teacher": 0, "optimizer": optimizer.state_dict(), "epoch": 5,
        "args": argparse.Namespace(arch="vit_base", lr=5e-4, output_dir="out", global_crops_scale=(0.4, 1.0)),
        "dino_loss": {"center": torch.zeros(1, 32)}, "fp16_scaler": None,
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(ckpt, path)
    return path, student, teacher


@pytest.mark.parametrize("key", ["teacher", "student"])
def test_training_checkpoint_loads_without_missing_keys(training_checkpoint, key):
    path, student, teacher = training_checkpoint
    model = tiny(0)
    summary = load_pretrained_weights(model, path, checkpoint_key=key)
    assert summary.missing == [] and summary.unexpected == [] and len(summary.matched) == 47
    assert_same_backbone(model, (teacher if key == "teacher" else student).backbone)
    assert isinstance(safe_torch_load(path)["args"], argparse.Namespace)


def test_released_flat_teacher_file_loads(tmp_path, capsys):
    teacher = wrapper(3)
    path = tmp_path / "kinetics400_vitb_ssl.pth"
    torch.save(teacher.state_dict(), path)  # backbone.* + head.*, no 'teacher' key
    model = tiny(0)
    summary = load_pretrained_weights(model, path)  # default checkpoint_key="teacher" is absent
    assert summary.missing == [] and summary.unexpected == []
    assert_same_backbone(model, teacher.backbone)
    assert "loaded 47 tensors" in capsys.readouterr().out


def test_a_requested_entry_the_file_lacks_is_named_with_what_is_used(tmp_path, training_checkpoint, capsys):
    """--checkpoint_key student on the released flat file (the teacher's weights) or a TimeSformer file loads
    what the file has, with a note saying so; the default (teacher) on a flat file, and an entry the file has, get
    none."""
    flat = tmp_path / "kinetics400_vitb_ssl.pth"
    torch.save(wrapper(3).state_dict(), flat)
    timesformer = tmp_path / "timesformer.pyth"
    torch.save({"model_state": {f"model.{k}": v for k, v in tiny(4).state_dict().items()}}, timesformer)
    for path, key, note in ((flat, "student", f"Note: checkpoint key 'student': {flat} has no such entry; its top "
                             "level is used instead (a flat file such as the released kinetics400_vitb_ssl.pth is "
                             "the teacher's weights).\n"),
                            (timesformer, "student", f"Note: checkpoint key 'student': {timesformer} has no such "
                             "entry; its 'model_state' is used instead.\n"),
                            (flat, "teacher", None), (training_checkpoint[0], "student", None)):
        capsys.readouterr()
        load_pretrained_weights(tiny(0), path, checkpoint_key=key)
        out = capsys.readouterr().out
        assert (note in out) if note else "Note:" not in out


def test_timesformer_and_bare_state_dicts_load(tmp_path):
    source = tiny(4, num_classes=7)
    path = tmp_path / "TimeSformer_divST_8x32_224_K400.pyth"
    torch.save({"model_state": {f"model.{k}": v for k, v in source.state_dict().items()}, "epoch": 15}, path)
    model = tiny(0)
    summary = load_pretrained_weights(model, path)
    assert summary.missing == [] and sorted(summary.unexpected) == ["head.bias", "head.weight"]
    assert_same_backbone(model, source)
    bare = tmp_path / "bare.pth"
    torch.save(tiny(5).state_dict(), bare)
    model = tiny(0)
    assert load_pretrained_weights(model, bare, checkpoint_key=None).missing == []
    assert_same_backbone(model, tiny(5))


def test_time_embed_of_another_length_is_resized_nearest(tmp_path):
    source = tiny(6)  # 8 frames
    path = tmp_path / "ckpt.pth"
    torch.save(source.state_dict(), path)
    model = tiny(0, num_frames=16)
    summary = load_pretrained_weights(model, path)
    assert summary.resized == ["time_embed (1, 8, 48)->(1, 16, 48)"]
    assert torch.equal(model.time_embed, source.time_embed.repeat_interleave(2, dim=1))
    x = torch.randn(1, 3, 16, 32, 32)
    with torch.no_grad():  # the same values the 8-frame model uses on the fly for 16 frames
        assert torch.allclose(model(x), source(x), atol=1e-5)


def test_wrong_files_fail_loudly(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_pretrained_weights(tiny(0), tmp_path / "nowhere.pth")
    unrelated = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(3), "fc.bias": torch.zeros(2)}, unrelated)
    with pytest.raises(ValueError, match=r"no key of .*resnet.pth.*Pass an SVT checkpoint .*; an ImageNet/DINO ViT "
                                         r"is the spatial init, --opts TIMESFORMER\.PRETRAINED_MODEL"):
        load_pretrained_weights(tiny(0), unrelated)
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"obj": NotAllowed()}, unsafe)
    with pytest.raises(RuntimeError, match="weights_only"):
        safe_torch_load(unsafe)


def test_shape_mismatch_names_the_key(tmp_path):
    state = tiny(7).state_dict()
    state["blocks.1.mlp.fc1.weight"] = torch.zeros(96, 48)
    path = tmp_path / "ckpt.pth"
    torch.save({f"backbone.{k}": v for k, v in state.items()}, path)
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc1\.weight.*\(96, 48\).*\(192, 48\)"):
        load_pretrained_weights(tiny(0), path)


def image_vit_state(seed: int, img_size: int = 32, num_classes: int = 10, embed_dim: int = 48) -> dict:
    torch.manual_seed(seed)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=img_size, patch_size=16, embed_dim=embed_dim, depth=2, num_heads=3, num_classes=num_classes)
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_(0, 0.1)
    return vit.state_dict()


@pytest.mark.parametrize("layout", ["timm", "dino_flat", "wrapped_module"])
def test_imagenet_init_mapping(tmp_path, layout):
    vit = image_vit_state(8)
    if layout == "dino_flat":
        obj = {k: v for k, v in vit.items() if not k.startswith("head.")}
    elif layout == "wrapped_module":
        obj = {"model": {f"module.{k}": v for k, v in vit.items()}, "epoch": 3}
    else:
        obj = vit
    path = tmp_path / "vit_b16.pth"
    torch.save(obj, path)
    model = VisionTransformer(**TINY)
    result = load_imagenet_init(model, path)
    sd = model.state_dict()
    for k, v in vit.items():
        if not k.startswith("head."):
            assert torch.equal(sd[k], v), k
    for i in range(2):
        for name in ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias"):
            assert torch.equal(sd[f"blocks.{i}.temporal_attn.{name}"], vit[f"blocks.{i}.attn.{name}"])
        for name in ("weight", "bias"):
            assert torch.equal(sd[f"blocks.{i}.temporal_norm1.{name}"], vit[f"blocks.{i}.norm1.{name}"])
            assert torch.count_nonzero(sd[f"blocks.{i}.temporal_fc.{name}"]) == 0
    assert torch.count_nonzero(model.time_embed) == 0
    assert sorted(result.missing) == sorted(
        ["time_embed"] + [f"blocks.{i}.temporal_fc.{n}" for i in range(2) for n in ("weight", "bias")])
    assert result.unexpected == []  # the classifier head is dropped
    assert result.image_model


def test_an_image_vit_where_a_video_checkpoint_is_expected_points_to_the_spatial_init(tmp_path):
    """An ImageNet/DINO ViT as --pretrained_weights, --pretrained_rgb or the hub's pretrained_path: an error saying
    what the file is and that TIMESFORMER.PRETRAINED_MODEL takes it, not advice to change the model size."""
    from train_ssl import load_pretrained_rgb
    from utils.evaluation import load_backbone
    from utils.parser import load_config_from
    path = tmp_path / "vit_tiny_patch16_224.pth"
    torch.save(image_vit_state(13, img_size=224, embed_dim=192), path)  # timm's vit_tiny_patch16_224, 2 blocks
    image = rf"{path} is an image model \(an ImageNet/DINO ViT.*no time_embed or temporal_fc\), not a video checkpoint"
    spatial_init = rf"--opts TIMESFORMER\.PRETRAINED_MODEL {path} \(scripts/train_paper\.sh: PRETRAINED={path}\)"
    space_only = (r" \(if it is a space-only TimeSformer, build that model: --opts TIMESFORMER\.ATTENTION_TYPE "
                  r"space_only\)")
    with pytest.raises(ValueError, match=rf"{image}, so pretrained_path cannot take it{space_only}\. .*{spatial_init}.*"
                                         r"Through torch\.hub: .*load_imagenet_init"):
        hubconf.svt_vitb_k400(pretrained_path=str(path), embed_dim=192, depth=2, num_heads=3)
    cfg = load_config_from(None, ["DATA.TRAIN_CROP_SIZE", "32", "MODEL.DEPTH", "2"])
    with pytest.raises(ValueError,
                       match=rf"{image}, so --pretrained_weights cannot take it{space_only}\. .*{spatial_init}"):
        load_backbone("vit_tiny", cfg, torch.device("cpu"), str(path))
    with pytest.raises(ValueError, match=rf"{image}, so --pretrained_rgb cannot take it"):
        load_pretrained_rgb(VisionTransformer(**{**TINY, "embed_dim": 192}), str(path))
    with pytest.raises(ValueError, match=r"another model size.*It is an image ViT: pass it as the spatial init"):
        load_backbone("vit_small", cfg, torch.device("cpu"), str(path))
    # the way the error points to works, with nothing temporal trained
    model = load_backbone("vit_tiny", load_config_from(None, ["DATA.TRAIN_CROP_SIZE", "32", "MODEL.DEPTH", "2",
                                                              "TIMESFORMER.PRETRAINED_MODEL", str(path)]),
                          torch.device("cpu"))
    vit = image_vit_state(13, img_size=224, embed_dim=192)
    assert torch.equal(model.blocks[1].attn.qkv.weight, vit["blocks.1.attn.qkv.weight"])
    assert torch.count_nonzero(model.time_embed) == 0
    # a space-only TimeSformer has no temporal weights either: into a space-only model it loads, whole
    space_cfg = load_config_from(None, ["DATA.TRAIN_CROP_SIZE", "32", "MODEL.DEPTH", "2",
                                        "TIMESFORMER.ATTENTION_TYPE", "space_only"])
    space_path = tmp_path / "space_only.pth"
    space_state = build_backbone("vit_tiny", space_cfg).state_dict()
    torch.save({"teacher": {f"backbone.{k}": v for k, v in space_state.items()}}, space_path)
    model = load_backbone("vit_tiny", space_cfg, torch.device("cpu"), str(space_path))
    assert model.attention_type == "space_only" and not hasattr(model, "time_embed")
    hub = hubconf.svt_vitb_k400(pretrained_path=str(space_path), embed_dim=192, depth=2, num_heads=3, img_size=32,
                                attention_type="space_only")
    assert torch.equal(hub.blocks[1].attn.qkv.weight, space_state["blocks.1.attn.qkv.weight"])


def test_frozen_evaluations_keep_the_stored_embeddings_and_compute_the_trained_models_features(tmp_path, capsys):
    """A model trained at 64 px (a 4x4 patch grid) and 4 frames, evaluated with the default DATA.TRAIN_CROP_SIZE
    224 and DATA.NUM_FRAMES 8: eval_knn / eval_linear (load_backbone) and the hub keep its pos_embed and time_embed
    as stored, so their features are the trained model's, at its input size and, resized once, at another. (Resized
    at load to 14x14, then back to 4x4 for a 64-px clip, nearest would keep the grid's rows 0, 0, 2, 2.)"""
    from utils.evaluation import load_backbone
    from utils.parser import load_config_from
    trained = tiny(21, embed_dim=192, img_size=64, num_frames=4).eval()
    path = tmp_path / "checkpoint.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in trained.state_dict().items()}}, path)
    cfg = load_config_from(None, ["MODEL.DEPTH", "2"])
    assert (cfg.DATA.TRAIN_CROP_SIZE, cfg.DATA.NUM_FRAMES) == (224, 8)
    frozen = [load_backbone("vit_tiny", cfg, torch.device("cpu"), str(path)),
              hubconf.svt_vitb_k400(pretrained_path=str(path), embed_dim=192, depth=2, num_heads=3)]
    torch.manual_seed(0)
    clips = [torch.randn(2, 3, 4, 64, 64), torch.randn(2, 3, 2, 96, 96)]
    with torch.no_grad():
        for model in frozen:
            for x in clips:
                assert torch.equal(model(x), trained(x))
            assert model.patch_embed.grid_size == (4, 4) and model.time_embed.shape == (1, 4, 192)
            assert_same_backbone(model, trained)
    assert capsys.readouterr().out.count("kept at the stored size (the model's -> the file's; resized to each input "
                                         "as it runs): ['pos_embed (1, 197, 192)->(1, 17, 192)', 'time_embed (1, 8, "
                                         "192)->(1, 4, 192)']") == 2


def test_finetuning_resizes_the_stored_embeddings_at_load(tmp_path):
    """eval_finetune.py follows TimeSformer: pos_embed / time_embed are resized (nearest) to the model's size at
    load, and that parameter is what gets trained."""
    from eval_finetune import build_model
    from models.timesformer import resample_pos_embed, resample_time_embed
    from utils.parser import load_config_from
    trained = tiny(22, embed_dim=192, img_size=64, num_frames=4)
    path = tmp_path / "checkpoint.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in trained.state_dict().items()}}, path)
    args = argparse.Namespace(arch="vit_tiny", patch_size=16, pretrained_weights=str(path), checkpoint_key="teacher",
                              grad_checkpointing=False)
    model = build_model(args, load_config_from(None, ["MODEL.DEPTH", "2"]), num_labels=5)
    assert model.patch_embed.grid_size == (14, 14)
    assert torch.equal(model.pos_embed, resample_pos_embed(trained.pos_embed, (4, 4), (14, 14)))
    assert torch.equal(model.time_embed, resample_time_embed(trained.time_embed, 8))


def test_imagenet_init_resizes_pos_embed_and_reports_errors(tmp_path):
    vit = image_vit_state(9, img_size=64, num_classes=0)  # 4x4 grid
    path = tmp_path / "vit64.pth"
    torch.save(vit, path)
    model = VisionTransformer(**TINY)  # 2x2 grid
    load_imagenet_init(model, path)
    grid = vit["pos_embed"][0, 1:].reshape(4, 4, 48)
    assert torch.equal(model.pos_embed[0, 0], vit["pos_embed"][0, 0])
    assert torch.equal(model.pos_embed[0, 1:].reshape(2, 2, 48), grid[0::2][:, 0::2])
    with pytest.raises(FileNotFoundError, match="missing.pth.*put them at that path"):
        load_imagenet_init(model, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="local file"):
        load_imagenet_init(model, "https://example.com/vit.pth")
    other = tmp_path / "other.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match=r"no key of .*other.pth.*Pass an image ViT \(DINO or timm ImageNet"):
        load_imagenet_init(model, other)


def test_pretrained_model_log_says_whether_an_image_vit_or_a_video_backbone_was_loaded(training_checkpoint, capsys):
    """TIMESFORMER.PRETRAINED_MODEL also takes a video backbone (the released file, a train_ssl.py checkpoint),
    loaded whole as the original does (spec 6.3): the log calls that a video backbone, an image ViT an ImageNet
    init, each with its tensor counts."""
    path, _, teacher = training_checkpoint
    released = path.parent / "released.pth"
    torch.save(teacher.state_dict(), released)  # the flat backbone.* / head.* teacher dict
    for video in (path, released):
        capsys.readouterr()
        model = VisionTransformer(**TINY)
        summary = load_imagenet_init(model, video)
        assert_same_backbone(model, teacher.backbone)  # every weight, temporal ones included
        out = capsys.readouterr().out
        assert out.splitlines()[0] == (
            f"Video backbone init from {video} (TIMESFORMER.PRETRAINED_MODEL; a video model's weights, not an "
            "ImageNet image ViT's): 47 tensors, 17 of them temporal, all from the file:")  # time_embed + 8 a block
        assert str(summary) in out and "ImageNet init" not in out
    image = path.parent / "vit.pth"
    torch.save(image_vit_state(8), image)
    load_imagenet_init(VisionTransformer(**TINY), image)
    assert capsys.readouterr().out.splitlines()[0] == (
        f"ImageNet init from {image}: an image ViT's spatial weights, 30 tensors; temporal_attn / temporal_norm1 "
        "start as copies of the spatial ones (12 tensors), time_embed and temporal_fc at their zero init:")


def test_deit_distilled_weights_are_named_as_the_cause(tmp_path):
    """A DeiT-distilled ImageNet file: its pos_embed holds a distillation token besides the class token, so its
    grid is not square; the error names the file, that cause and the weights to use instead."""
    torch.manual_seed(0)
    deit = timm.models.deit.VisionTransformerDistilled(img_size=32, patch_size=16, embed_dim=48, depth=2, num_heads=3)
    path = tmp_path / "deit_tiny_distilled_patch16_224.pth"
    torch.save({"model": deit.state_dict()}, path)
    with pytest.raises(ValueError, match=rf"{path} \('model'\): pos_embed with 6 tokens cannot be resized to 5: only "
                                         r"square patch grids are supported; 6 tokens are a class token, a "
                                         r"distillation token and 2x2 patches: DeiT-distilled weights are not "
                                         r"supported, use the non-distilled DeiT or ViT weights"):
        load_imagenet_init(VisionTransformer(**TINY), path)
    state = image_vit_state(9)  # a grid that is not square, no distillation token: no such advice
    state["pos_embed"] = state["pos_embed"][:, :4]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"4 tokens cannot be resized to 5: only square patch grids are supported$"):
        load_imagenet_init(VisionTransformer(**TINY), path)


def test_hub_entry_loads_local_file(tmp_path):
    teacher = MultiCropWrapper(tiny(10, img_size=224), DINOHead(48, 32, hidden_dim=16, bottleneck_dim=8))
    path = tmp_path / "kinetics400_vitb_ssl.pth"
    torch.save(teacher.state_dict(), path)
    kw = dict(embed_dim=48, depth=2, num_heads=3)
    model = hubconf.svt_vitb_k400(pretrained_path=str(path), **kw)
    assert_same_backbone(model, teacher.backbone)
    assert not model.training
    repo = os.path.dirname(os.path.abspath(hubconf.__file__))
    hub_model = torch.hub.load(repo, "svt_vitb_k400", source="local", pretrained_path=str(path), **kw)
    assert_same_backbone(hub_model, teacher.backbone)
    with pytest.raises(ValueError, match="another model size.*through torch.hub, pass the model size as keyword "
                                         "arguments: embed_dim, depth, num_heads"):
        hubconf.svt_vitb_k400(pretrained_path=str(path), embed_dim=64, depth=2, num_heads=4)  # another width
    # Another depth matches every shape it has: an error (part of the model would stay random), never a
    # partly loaded model; the message says what the file holds.
    holds = r"The file holds a 48-wide, 2-block model with 16-px patches \(torch.hub: embed_dim=48, depth=2, patch_size=16"
    with pytest.raises(ValueError, match=r"20 weights of the model are not in the file.*" + holds):
        hubconf.svt_vitb_k400(pretrained_path=str(path), embed_dim=48, depth=3, num_heads=3)
    with pytest.raises(ValueError, match=r"20 block weights of the file are not in the model.*" + holds):
        hubconf.svt_vitb_k400(pretrained_path=str(path), embed_dim=48, depth=1, num_heads=3)


def test_hub_entry_loads_a_finetuning_checkpoint_with_or_without_its_head(tmp_path):
    """README "The fine-tuned model": eval_finetune's checkpoint.pth (model_state, keys without a prefix) through
    torch.hub: with num_classes its classifier, whose logits are the fine-tuned model's; without, the CLS feature."""
    finetuned = tiny(11, img_size=224, num_classes=5).eval()
    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 15, "model_state": finetuned.state_dict(), "optimizer_state": {}, "best_acc1": 50.0}, path)
    kw = dict(embed_dim=48, depth=2, num_heads=3)
    x = torch.randn(1, 3, 8, 224, 224)
    with torch.no_grad():
        assert torch.equal(hubconf.svt_vitb_k400(pretrained_path=str(path), num_classes=5, **kw)(x), finetuned(x))
        features = hubconf.svt_vitb_k400(pretrained_path=str(path), **kw)(x)
        assert torch.equal(features, finetuned.forward_features(x)[:, 0])


def test_hub_load_beside_a_projects_own_utils_and_models(tmp_path):
    """A project with its own `utils` (imported) and `models` (imported after): torch.hub.load works, twice, and
    leaves the project's modules in place, none of svt's in sys.modules to hide the project's `models` later."""
    teacher = MultiCropWrapper(tiny(10, img_size=224), DINOHead(48, 32, hidden_dim=16, bottleneck_dim=8))
    weights = tmp_path / "kinetics400_vitb_ssl.pth"
    torch.save(teacher.state_dict(), weights)
    project = tmp_path / "project"
    (project / "utils").mkdir(parents=True)
    (project / "utils" / "__init__.py").write_text("WHOSE = 'project'\n")
    (project / "models.py").write_text("WHOSE = 'project'\n")
    repo = os.path.dirname(os.path.abspath(hubconf.__file__))
    script = f"""
import sys
import torch
import utils
for _ in range(2):
    model = torch.hub.load({repo!r}, "svt_vitb_k400", source="local", pretrained_path={str(weights)!r},
                           embed_dim=48, depth=2, num_heads=3)
import models
assert sys.modules["utils"] is utils and utils.WHOSE == models.WHOSE == "project", (utils, models)
assert not [name for name in sys.modules if name.startswith(("utils.", "models."))]
torch.save(model.state_dict(), {str(tmp_path / "hub.pth")!r})
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=project, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(project)})
    assert run.returncode == 0, run.stderr
    loaded = torch.load(tmp_path / "hub.pth", weights_only=True)
    for key, value in teacher.backbone.state_dict().items():
        assert torch.equal(loaded[key], value), key


def test_hub_load_without_a_projects_own_utils_or_models_keeps_svts_registered(tmp_path):
    """A process with no `utils` or `models` of its own: svt's stay imported after torch.hub.load, so the model
    pickles whole (torch.save(model), torch.load(weights_only=False)) and two loads share one class; a process that
    imported svt's `models` itself gets that class, and keeps the `utils` the load imported."""
    repo = os.path.dirname(os.path.abspath(hubconf.__file__))
    hub = f"torch.hub.load({repo!r}, 'svt_vitb_k400', source='local', embed_dim=48, depth=1, num_heads=3, img_size=32)"
    script = f"""
import inspect, io
import torch
first, second = {hub}, {hub}
assert type(first) is type(second), (type(first), type(second))
buffer = io.BytesIO()
torch.save(first, buffer)
buffer.seek(0)
copy = torch.load(buffer, weights_only=False)
assert type(copy) is type(first)
assert all(torch.equal(value, first.state_dict()[key]) for key, value in copy.state_dict().items())
assert "class VisionTransformer" in inspect.getsource(type(first))
"""
    own_models = f"""
import sys
import torch
sys.path.insert(0, {repo!r})
import models.timesformer
model = {hub}
assert type(model) is models.timesformer.VisionTransformer
assert "utils.checkpoint" in sys.modules and sys.modules["utils"].__file__.startswith({repo!r})
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for code in (script, own_models):
        run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                             env=env)
        assert run.returncode == 0, run.stderr


def test_atomic_save_and_restart_round_trip(tmp_path):
    model = tiny(11)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(1, 3, 2, 32, 32)).sum().backward()
    optimizer.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    loss = nn.Module()
    loss.register_buffer("center", torch.randn(1, 32))
    path = tmp_path / "run" / "checkpoint.pth"
    atomic_save({"student": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 4,
                 "fp16_scaler": scaler.state_dict(), "dino_loss": loss.state_dict(),
                 "args": argparse.Namespace(epochs=10)}, path)
    assert os.listdir(path.parent) == ["checkpoint.pth"]  # no temporary file left behind

    model2 = tiny(12)
    optimizer2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    scaler2 = torch.amp.GradScaler("cpu")
    loss2 = nn.Module()
    loss2.register_buffer("center", torch.zeros(1, 32))
    run_variables = {"epoch": 0}
    restart_from_checkpoint(path, run_variables=run_variables, student=model2, optimizer=optimizer2,
                            fp16_scaler=scaler2, dino_loss=loss2, teacher=None)
    assert run_variables["epoch"] == 4
    assert_same_backbone(model2, model)
    assert torch.equal(loss2.center, loss.center)
    assert scaler2.get_scale() == 1024.0
    s1, s2 = optimizer.state_dict()["state"], optimizer2.state_dict()["state"]
    assert s1.keys() == s2.keys() and all(torch.equal(s1[i]["exp_avg"], s2[i]["exp_avg"]) for i in s1)

    fresh = {"epoch": 0}
    restart_from_checkpoint(tmp_path / "none.pth", run_variables=fresh, student=model2)
    assert fresh == {"epoch": 0}


@pytest.mark.parametrize("fused", [True, False])
def test_resume_keeps_the_runs_fused_or_foreach_adamw(tmp_path, fused):
    # An AdamW checkpoint of the original code (torch 1.x): param groups without fused / foreach, integer steps.
    # load_state_dict alone would take their absence as None, leaving this run's fused AdamW (build_optimizer's
    # choice on CPU and CUDA) or its foreach one on the default kernels.
    import train_ssl
    model, model2 = tiny(5), tiny(5)
    groups = [{**g, "lr": 1e-2, "weight_decay": 0.04 * i} for i, g in enumerate(get_params_groups(model))]
    writer = torch.optim.AdamW(groups, foreach=False)
    for _ in range(2):
        model(torch.randn(1, 3, 2, 32, 32)).square().mean().backward()
        writer.step()
    saved = writer.state_dict()
    old_keys = ("params", "lr", "betas", "eps", "weight_decay", "amsgrad")
    saved["param_groups"] = [{k: g[k] for k in old_keys} for g in saved["param_groups"]]
    saved["state"] = {i: {**s, "step": int(s["step"])} for i, s in saved["state"].items()}
    atomic_save({"optimizer": saved}, tmp_path / "checkpoint.pth")

    model2.load_state_dict(model.state_dict())
    optimizer = train_ssl.build_optimizer(argparse.Namespace(optimizer="adamw"), model2, torch.device("cpu"),
                                          fused=None if fused else False)
    kernels = [(g["fused"], g["foreach"]) for g in optimizer.param_groups]
    assert kernels == [(True, None) if fused else (None, True)] * 2
    restart_from_checkpoint(tmp_path / "checkpoint.pth", optimizer=optimizer)
    assert [(g["fused"], g["foreach"]) for g in optimizer.param_groups] == kernels
    assert [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [(1e-2, 0.0), (1e-2, 0.04)]
    for state in optimizer.state.values():
        assert state["step"].dtype == torch.float32 and state["step"].item() == 2.0
    # the next step continues the written one, on this run's kernel
    grads = [torch.randn_like(p) for p in model.parameters()]
    for m in (model, model2):
        for p, g in zip(m.parameters(), grads):
            p.grad = g.clone()
    writer.step()
    optimizer.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)

    # a checkpoint of other param groups is still refused, not loaded group by group
    saved["param_groups"] = [{**saved["param_groups"][0], "params": list(saved["state"])}]
    atomic_save({"optimizer": saved}, tmp_path / "checkpoint.pth")
    with pytest.raises(ValueError, match="checkpoint.pth: its 'optimizer' does not fit this run .*parameter groups"):
        restart_from_checkpoint(tmp_path / "checkpoint.pth", optimizer=optimizer)


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


def test_safetensors_weights_load_as_the_imagenet_init_and_as_pretrained_weights(tmp_path):
    """timm >= 0.9 and the Hugging Face Hub ship weights as model.safetensors: the ImageNet init and
    --pretrained_weights take them (told by the suffix or by the header: its 8-byte length, then its JSON), and a
    truncated one is an error saying so, not advice about torch.save."""
    from safetensors.torch import save_file
    vit = image_vit_state(8)
    path = tmp_path / "model.safetensors"
    save_file(vit, path)
    model = VisionTransformer(**TINY)
    assert load_imagenet_init(model, path).image_model
    assert torch.equal(model.blocks[1].temporal_attn.qkv.weight, vit["blocks.1.attn.qkv.weight"])
    video = tiny(9)
    unnamed = tmp_path / "svt_weights.bin"  # no suffix: the header tells
    save_file({f"backbone.{k}": v for k, v in video.state_dict().items()}, unnamed)
    model = tiny(0)
    assert load_pretrained_weights(model, unnamed).missing == []
    assert_same_backbone(model, video)
    data = path.read_bytes()
    for name, size in (("cut.safetensors", len(data) // 2), ("cut.safetensors", 5), ("cut_unnamed", len(data) - 4)):
        (tmp_path / name).write_bytes(data[:size])
        with pytest.raises(RuntimeError, match=rf"could not read safetensors file .*{name} .*not complete or is "
                                               r"damaged: re-download"):
            load_imagenet_init(VisionTransformer(**TINY), tmp_path / name)


def test_non_dict_entry_points_to_checkpoint_key(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"teacher": 0, "student": {}}, path)
    model = vit_tiny_patch16_224(embed_dim=48, depth=1, num_heads=2, img_size=32)
    with pytest.raises(ValueError, match="'teacher' is a int.*--checkpoint_key"):
        load_pretrained_weights(model, path)


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_how_to_go_on(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    atomic_save({"epoch": 3}, path)

    def disk_full(obj, f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")  # torch's ENOSPC

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match=r"checkpoint.pth: could not be written \(.*unexpected pos.*\); the previous "
                                      r"checkpoint.pth is intact\. If the disk is full, free space in .*df -h"):
        atomic_save({"epoch": 4}, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["checkpoint.pth"]                     # no temporary file left behind
    assert torch.load(path, weights_only=True) == {"epoch": 3}
    with pytest.raises(OSError, match="nothing was written"):
        monkeypatch.setattr(torch, "save", disk_full)
        atomic_save({"epoch": 1}, tmp_path / "new.pth")


# A process that holds an output-folder lock and has forked a child (a DataLoader worker), both asleep.
LOCK_HOLDER = """
import os, sys, time
sys.path.insert(0, {root!r})
from utils.checkpoint import output_dir_lock
with output_dir_lock(sys.argv[1]):
    child = os.fork()
    if child == 0:
        time.sleep(120)
        os._exit(0)
    print(child, flush=True)
    time.sleep(120)
"""


def test_a_locked_output_dir_stops_a_second_run_until_its_holder_is_killed(tmp_path):
    """The holder's pid and host are named; a second lock in the same process conflicts too (flock is per open
    file), an evaluate-only run (enabled=False) takes none; the kernel frees the lock when the holder dies by
    SIGKILL, although its forked child (which closed its copy of the descriptor) still lives."""
    root = Path(__file__).resolve().parents[1]
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER.format(root=str(root)), str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        busy = (rf"--output_dir {tmp_path} is in use by another run \(pid {holder.pid} on {socket.gethostname()}, "
                rf"since .*; lock: {tmp_path / '.lock'}\)\..*Wait for that run to end, stop it .*or pass another "
                r"--output_dir\.")
        with pytest.raises(RuntimeError, match=busy):
            with output_dir_lock(tmp_path):
                pass
        with output_dir_lock(tmp_path, enabled=False):
            pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        os.kill(child, 0)  # alive
        with output_dir_lock(tmp_path):
            assert (tmp_path / ".lock").read_text().startswith(f"pid {os.getpid()} on ")
            with pytest.raises(RuntimeError, match=f"in use by another run \\(pid {os.getpid()} "):
                with output_dir_lock(tmp_path):
                    pass
        with output_dir_lock(tmp_path):  # released at the end of the block
            pass
    finally:
        holder.kill()
        os.kill(child, signal.SIGKILL)


def test_a_lock_held_from_another_host_says_how_to_clear_it(tmp_path, monkeypatch):
    """A network file system can keep the lock of a crashed node: when the holder is another host, the error
    also says to delete the lock file if that host is down."""
    with monkeypatch.context() as patch:
        patch.setattr(socket, "gethostname", lambda: "deadnode")
        held = output_dir_lock(tmp_path)
        held.__enter__()
    try:
        with pytest.raises(RuntimeError, match=rf"\(pid {os.getpid()} on deadnode, .*If deadnode is down \(a network "
                                               rf"file system can keep a crashed node's lock\), delete "
                                               rf"{tmp_path / '.lock'} and rerun\."):
            with output_dir_lock(tmp_path):
                pass
    finally:
        held.__exit__(None, None, None)


def _lock_worker(rank: int, init_file: str, folder: str) -> None:
    # No destroy_process_group: the forked child ends with os._exit, which needs none, and before torch 2.8 the
    # Gloo group's destructor holds the GIL while it joins its threads, one of which may still be freeing the
    # all-reduce's tensor and wait for the GIL: a deadlock (pytorch PR 154976; 1 run in 10 hung on torch 2.5.1).
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        with output_dir_lock(folder):
            result = "locked"
    except RuntimeError as err:
        result = str(err)
    (Path(folder) / f"rank{rank}.txt").write_text(result)


def test_every_rank_stops_when_the_main_process_cannot_lock(tmp_path):
    """Two gloo ranks on a folder this process holds: the main process raises the holder's error and the other
    rank raises too (one all-reduce), instead of waiting at its first collective until --dist_timeout."""
    folder = tmp_path / "out"
    with output_dir_lock(folder):
        # forked, not spawned: a spawned child imports this module (torch, ...) again, seconds each under load
        torch.multiprocessing.start_processes(_lock_worker, args=(str(tmp_path / "init"), str(folder)), nprocs=2,
                                              join=True, start_method="fork")
    assert (folder / "rank0.txt").read_text().startswith(f"--output_dir {folder} is in use by another run "
                                                         f"(pid {os.getpid()} on ")
    assert (folder / "rank1.txt").read_text() == (f"--output_dir {folder} is in use by another run: the main process "
                                                  "could not lock it (its error).")
