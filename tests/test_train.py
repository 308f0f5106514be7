"""Training: the DINO loss, EMA, frozen last layer, train_step on the speed paths (fused AdamW, bf16, gradient
checkpointing), and end-to-end CPU runs of a tiny TimeSformer (2 epochs, resume, non-finite loss, 2-process
torchrun)."""
import functools
import json
import logging
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import models
import train_ssl
from datasets.seeding import SeededDataset
from models import DINOLoss
from tests.conftest import HostReads, assert_stopped, log_records, signal_at_call
from utils import evaluation, utils
from utils.checkpoint import output_dir_lock, safe_torch_load
from utils.defaults import get_cfg

ROOT = Path(__file__).resolve().parents[1]
TINY_BACKBONE = dict(depth=2, embed_dim=48, num_heads=2)
ORIGINAL_KEYS = {"student", "teacher", "optimizer", "epoch", "args", "dino_loss"}  # + fp16_scaler with fp16


# ---------------------------------------------------------------------------------------------
# Loss, schedules, EMA
# ---------------------------------------------------------------------------------------------
def reference_dino_loss(student_output, teacher_output, center, ncrops, temp, student_temp=0.1):
    """The original loop: mean over the 2 * (ncrops - 1) pairs of sum(-q * log p).mean() over the batch.
    Returns the loss and the number of terms."""
    logp = F.log_softmax(student_output / student_temp, dim=-1).chunk(ncrops)
    q = F.softmax((teacher_output - center) / temp, dim=-1).detach().chunk(2)
    total, n = 0, 0
    for iq, qi in enumerate(q):
        for v, lp in enumerate(logp):
            if v != iq:
                total = total + torch.sum(-qi * lp, dim=-1).mean()
                n += 1
    return total / n, n


def test_dino_loss_hand_computed_tiny_logits():
    # 2 globals + 1 local, batch 1, K = 2: every number can be checked by hand.
    loss_fn = DINOLoss(out_dim=2, ncrops=3, warmup_teacher_temp=0.5, teacher_temp=0.5,
                       warmup_teacher_temp_epochs=0, nepochs=1)
    student = torch.tensor([[0.1, 0.0], [0.0, 0.1], [0.0, 0.0]])
    teacher = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    loss = loss_fn(student, teacher, epoch=0)
    # teacher g1: softmax([2, 0]); g2: [0.5, 0.5]. student: g1 softmax([1, 0]), g2 softmax([0, 1]), l1 uniform.
    q1 = np.array([np.exp(2), 1]) / (np.exp(2) + 1)
    logp_g1 = np.log(np.array([np.e, 1]) / (np.e + 1))
    logp_g2 = logp_g1[::-1]
    log_half = np.log([0.5, 0.5])
    terms = [-(q1 * logp_g2).sum(), -(q1 * log_half).sum(), -(0.5 * logp_g1).sum(), -(0.5 * log_half).sum()]
    assert loss.item() == pytest.approx(np.mean(terms), rel=1e-6)


@pytest.mark.parametrize("ncrops", [2, 3, 10])
def test_dino_loss_and_grad_match_pairwise_reference(ncrops):
    torch.manual_seed(0)
    b, k = 3, 64
    student = torch.randn(ncrops * b, k, requires_grad=True)
    teacher = torch.randn(2 * b, k)
    loss_fn = DINOLoss(k, ncrops, 0.04, 0.04, 0, 2)
    loss_fn.center.normal_()
    center = loss_fn.center.clone()
    loss = loss_fn(student, teacher, epoch=1)
    (grad,) = torch.autograd.grad(loss, student)
    ref, n_terms = reference_dino_loss(student, teacher, center, ncrops, 0.04)
    (ref_grad,) = torch.autograd.grad(ref, student)
    assert n_terms == 2 * (ncrops - 1)  # 18 with SVT's 10 views
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # in float64: the batched loss is the pairwise mean, not an approximation of it
        ref64, _ = reference_dino_loss(student.double(), teacher.double(), center.double(), ncrops, 0.04)
    assert loss.item() == pytest.approx(ref64.item(), rel=1e-5)
    # the centre update is unchanged: 0.9 * c + 0.1 * mean(teacher)
    torch.testing.assert_close(loss_fn.center, 0.9 * center + 0.1 * teacher.mean(0, keepdim=True))


def test_center_update_and_state():
    loss_fn = DINOLoss(4, ncrops=4, warmup_teacher_temp=0.04, teacher_temp=0.04,
                                 warmup_teacher_temp_epochs=0, nepochs=1)
    t1, t2 = torch.randn(6, 4), torch.randn(6, 4)
    loss_fn(torch.randn(12, 4), t1.half(), 0)  # fp16 logits (autocast) still give an fp32 centre
    c1 = 0.1 * t1.half().float().mean(0, keepdim=True)
    torch.testing.assert_close(loss_fn.center, c1)
    loss_fn(torch.randn(12, 4), t2, 0)
    torch.testing.assert_close(loss_fn.center, 0.9 * c1 + 0.1 * t2.mean(0, keepdim=True))
    state = loss_fn.state_dict()
    assert list(state) == ["center"] and state["center"].dtype == torch.float32


def test_teacher_temp_schedule_per_epoch():
    loss_fn = DINOLoss(4, 4, warmup_teacher_temp=0.04, teacher_temp=0.07,
                                 warmup_teacher_temp_epochs=3, nepochs=5)
    np.testing.assert_allclose(loss_fn.teacher_temp_schedule, [0.04, 0.055, 0.07, 0.07, 0.07])


def test_dino_loss_sharpens_the_teacher_with_the_temperature_of_its_epoch():
    # The forward of epoch e uses teacher_temp_schedule[e]: 0.04, 0.055, then 0.07 after the 3-epoch warm-up.
    # Teacher logits of the temperatures' scale, so that the targets (and the loss) depend on the temperature.
    torch.manual_seed(0)
    student, teacher = torch.randn(3 * 2, 16), 0.05 * torch.randn(2 * 2, 16)
    loss_fn = DINOLoss(16, 3, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3, nepochs=5)
    for epoch, temp in [(0, 0.04), (1, 0.055), (4, 0.07)]:
        loss_fn.center.zero_()
        ref, _ = reference_dino_loss(student, teacher, torch.zeros(1, 16), 3, temp)
        torch.testing.assert_close(loss_fn(student, teacher, epoch), ref, rtol=1e-5, atol=1e-6)


def test_dino_loss_teacher_targets_are_a_stop_gradient():
    # DINO's sg(teacher): the loss has a gradient for the student only, even for teacher logits that carry one.
    torch.manual_seed(0)
    student, teacher = torch.randn(3 * 2, 8, requires_grad=True), torch.randn(2 * 2, 8, requires_grad=True)
    loss = DINOLoss(8, 3, 0.04, 0.04, 0, 1)(student, teacher, 0)
    grad_student, grad_teacher = torch.autograd.grad(loss, [student, teacher], allow_unused=True)
    assert grad_teacher is None and grad_student.abs().sum() > 0


def test_ema_update():
    teacher, student = [torch.ones(3), torch.zeros(2, 2)], [torch.full((3,), 3.0), torch.ones(2, 2)]
    train_ssl.ema_update(teacher, student, 0.75)
    torch.testing.assert_close(teacher[0], torch.full((3,), 1.5))
    torch.testing.assert_close(teacher[1], torch.full((2, 2), 0.25))


def test_parser_accepts_legacy_local_rank_and_opts():
    parser = train_ssl.get_args_parser()
    args = parser.parse_args(["--local-rank", "3", "--opts", "DATA.RAND_FR", "True"])
    assert args.local_rank == 3 and args.opts == ["DATA.RAND_FR", "True"]
    assert parser.parse_args(["--local_rank=1"]).local_rank == 1


def test_frozen_last_layer_has_no_grad_in_epoch_0(synthetic_cfg):
    cfg = synthetic_cfg()
    student = models.MultiCropWrapper(models.build_backbone("vit_tiny", cfg, **TINY_BACKBONE),
                                      models.DINOHead(48, 32, hidden_dim=64, bottleneck_dim=16))
    loss_fn = DINOLoss(32, 3, 0.04, 0.04, 0, 2)
    views = [torch.randn(2, 3, 4, 32, 32), torch.randn(2, 3, 4, 32, 32), torch.randn(2, 3, 2, 16, 16)]
    for epoch in (0, 1):
        student.zero_grad(set_to_none=True)
        loss_fn(student(views), student(views[:2]).detach(), epoch).backward()
        utils.cancel_gradients_last_layer(epoch, student, freeze_last_layer=1)
        grad = student.head.last_layer.weight_v.grad
        assert (grad is None) == (epoch == 0)
        assert student.backbone.blocks[0].attn.qkv.weight.grad is not None


# ---------------------------------------------------------------------------------------------
# train_step on the speed paths (the state comes from train_ssl.build_train_state, as in training)
# ---------------------------------------------------------------------------------------------
def step_state(monkeypatch, fused: bool, *extra: str, device: torch.device = torch.device("cpu")):
    """A tiny student/teacher (depth 2, width 48, 2 frames of 32 px) with constant lr 1e-3, wd 0.04, momentum
    0.9 (at the first iteration), 2 local views."""
    monkeypatch.setattr(train_ssl, "build_backbone", functools.partial(models.build_backbone, **TINY_BACKBONE))
    args = train_ssl.get_args_parser().parse_args([
        "--arch", "vit_tiny", "--out_dim", "64", "--local_crops_number", "2", "--epochs", "1", "--warmup_epochs",
        "0", "--lr", "1e-3", "--min_lr", "1e-3", "--batch_size_per_gpu", "256", "--weight_decay_end", "0.04",
        "--momentum_teacher", "0.9", "--freeze_last_layer", "0", *extra])
    cfg = get_cfg()
    cfg.DATA.TRAIN_CROP_SIZE, cfg.DATA.NUM_FRAMES, cfg.MODEL.DROP_PATH_RATE = 32, 2, 0.0
    torch.manual_seed(0)
    return train_ssl.build_train_state(args, cfg, device, niter=4, fused=fused), args


def step_views(b=2, device=torch.device("cpu")):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(b, 3, 2, 32, 32, generator=g).to(device) for _ in range(2)] + \
           [torch.randn(b, 3, 2, 16, 16, generator=g).to(device) for _ in range(2)]


def run_steps(state, args, steps=3):
    views = step_views(device=state.device)
    losses = [train_ssl.train_step(state, views, 0, it, args)[0] for it in range(steps)]
    return torch.stack(losses).cpu(), {k: v.cpu() for k, v in state.teacher.state_dict().items()}


@pytest.fixture(scope="module")
def fp32_steps():
    """`run_steps` of `step_state(fused, "--use_fp16", "false", *extra, device=device)`, each computed once per
    module: several tests compare with the same fp32 reference. The results are shared: read them only."""
    runs = {}

    def get(fused: bool, *extra: str, device: torch.device = torch.device("cpu")):
        key = (fused, extra, str(device))
        if key not in runs:
            with pytest.MonkeyPatch.context() as mp:
                runs[key] = run_steps(*step_state(mp, fused, "--use_fp16", "false", *extra, device=device))
        return runs[key]

    return get


def test_fused_adamw_matches_foreach(fp32_steps, device):
    # in fp32: under bf16 autocast the two optimizers' last-bit differences reach the loss through bf16 rounding
    # (6e-4 of a 0.04 loss at the third step on an H200)
    losses_f, teacher_f = fp32_steps(True, device=device)
    losses_r, teacher_r = fp32_steps(False, device=device)
    torch.testing.assert_close(losses_f, losses_r, rtol=1e-5, atol=1e-6)
    for k in teacher_r:
        torch.testing.assert_close(teacher_f[k], teacher_r[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_loss_scaled_step_clips_the_true_gradients_and_skips_overflows(monkeypatch, fp32_steps, fused):
    # The fp16 path (V100 / T4, --amp_dtype fp16) on the CPU: a GradScaler in fp32 isolates the scaler's part.
    # The gradients are unscaled before the per-parameter clipping (clip 0.01: every tensor is clipped, so
    # clipping the scaled ones would give other weights), the frozen last layer stays put, and a step whose
    # scaled gradients overflow changes no student weight and halves the scale. The reference is the foreach
    # run without a scaler for both (fused equals foreach: test_fused_adamw_matches_foreach).
    extra = ("--clip_grad", "0.01", "--freeze_last_layer", "1")
    losses_ref, teacher_ref = fp32_steps(False, *extra)
    state, args = step_state(monkeypatch, fused, "--use_fp16", "false", *extra)
    state.fp16_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    last_layer = state.student_without_ddp.head.last_layer.weight_v.detach().clone()
    losses, teacher = run_steps(state, args)
    torch.testing.assert_close(losses, losses_ref, rtol=1e-5, atol=1e-6)
    for k in teacher_ref:
        torch.testing.assert_close(teacher[k], teacher_ref[k], rtol=1e-5, atol=1e-6)
    assert torch.equal(state.student_without_ddp.head.last_layer.weight_v, last_layer)
    assert state.fp16_scaler.get_scale() == 2.0 ** 12
    # an overflow in one scaled gradient (as fp16 gets when the scale is too high)
    hook = state.student_without_ddp.backbone.cls_token.register_hook(lambda g: torch.full_like(g, math.inf))
    before = {k: v.clone() for k, v in state.student_without_ddp.state_dict().items()}
    loss, _ = train_ssl.train_step(state, step_views(), 0, 3, args)
    hook.remove()
    assert torch.isfinite(loss)
    for k, v in state.student_without_ddp.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert state.fp16_scaler.get_scale() == 2.0 ** 11


def test_fp16_scaler_is_saved_only_with_fp16_and_resumes(monkeypatch, tmp_path):
    # The original writes `fp16_scaler` only when it has one: its resume would load a None and crash.
    for with_scaler in (False, True):
        out = tmp_path / str(with_scaler)
        out.mkdir()
        state, args = step_state(monkeypatch, True, "--output_dir", str(out))
        if with_scaler:
            state.fp16_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 7)
        train_ssl.save_checkpoint(state, args, 1, 0, dataset=None)
        ckpt = torch.load(out / "checkpoint.pth", weights_only=False)
        assert ("fp16_scaler" in ckpt) == with_scaler
        fresh, _ = step_state(monkeypatch, True)
        fresh.fp16_scaler = torch.amp.GradScaler("cpu") if with_scaler else None
        path = out / "checkpoint.pth"
        train_ssl.resume_checkpoint(fresh, path, train_ssl.read_resume_checkpoint(path, True, args), {"epoch": 0})
        if with_scaler:
            assert fresh.fp16_scaler.get_scale() == 2.0 ** 7


def test_center_momentum_flag_reaches_the_loss(monkeypatch):
    # The centre starts at zero: after one step it is (1 - m) x the same batch mean of the teacher outputs.
    centers = {}
    for m in ("0.9", "0.99"):
        state, args = step_state(monkeypatch, False, "--use_fp16", "false", "--center_momentum", m)
        run_steps(state, args, steps=1)
        centers[m] = state.dino_loss.center.clone()
    assert centers["0.9"].abs().sum() > 0
    torch.testing.assert_close(centers["0.99"], centers["0.9"] * 0.1, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("drop_path", [True, False])
def test_teacher_head_batchnorm_uses_batch_statistics_with_or_without_teacher_drop_path(monkeypatch, drop_path):
    """--use_bn_in_head: the teacher's head BatchNorm normalises with the batch statistics, as DINO's (its running
    ones are never trained); --teacher_drop_path false only puts the backbone in eval mode."""
    state, args = step_state(monkeypatch, False, "--use_fp16", "false", "--use_bn_in_head", "true",
                             "--teacher_drop_path", str(drop_path))
    teacher = state.teacher_without_ddp
    assert teacher.training and teacher.head.training and teacher.backbone.training == drop_path
    seen = []
    bn = next(m for m in teacher.head.modules() if isinstance(m, torch.nn.BatchNorm1d))
    bn.register_forward_hook(lambda m, inp, out: seen.append((inp[0].detach(), out.detach())))
    train_ssl.train_step(state, step_views(b=4), 0, 0, args)
    # 2 global views x batch 4 through the BatchNorm (weight 1, bias 0): (x - batch mean) / sqrt(batch var + eps),
    # not x / sqrt(1 + eps) (the running statistics at their initial 0 and 1)
    x, out = seen[0]
    expected = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + bn.eps)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_recipe_schedules_param_groups_and_teacher_match_the_original(monkeypatch):
    # DINO's recipe as train_ssl builds it (spec 4.3): batch 8 x 1 process, 3 epochs of 4 iterations, 1 warm-up.
    state, args = step_state(monkeypatch, False, "--use_fp16", "false", "--lr", "5e-4", "--min_lr", "1e-6",
                             "--batch_size_per_gpu", "8", "--epochs", "3", "--warmup_epochs", "1",
                             "--weight_decay_end", "0.4", "--momentum_teacher", "0.996", "--norm_last_layer", "false")
    peak = 5e-4 * 8 / 256  # lr x global batch / 256
    cos = lambda base, final, i, n: final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n))
    lr, wd, mom = state.lr_schedule, state.wd_schedule, state.momentum_schedule
    assert len(lr) == len(wd) == len(mom) == 12
    np.testing.assert_allclose(lr[:4], [0, peak / 3, 2 * peak / 3, peak])  # linear warm-up from 0, inclusive
    np.testing.assert_allclose(lr[4:], [cos(peak, 1e-6, i, 8) for i in range(8)])
    np.testing.assert_allclose(wd, [cos(0.04, 0.4, i, 12) for i in range(12)])  # no warm-up
    np.testing.assert_allclose(mom, [cos(0.996, 1.0, i, 12) for i in range(12)])

    # AdamW with torch's defaults; decay on every >1-D weight (cls/pos/time embeddings included, and the head's
    # gain when it is trainable), none on biases and norms; the teacher's frozen gain is in no group.
    opt = state.optimizer
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8
    names = {id(p): n for n, p in state.student_without_ddp.named_parameters()}
    decayed, plain = ({names[id(p)] for p in g["params"]} for g in opt.param_groups)
    assert {"backbone.cls_token", "backbone.pos_embed", "backbone.time_embed", "backbone.patch_embed.proj.weight",
            "head.last_layer.weight_g", "head.last_layer.weight_v", "head.mlp.0.weight"} <= decayed
    assert all(n.endswith(".bias") or "norm" in n for n in plain)
    assert {"backbone.norm.weight", "backbone.blocks.0.temporal_norm1.weight", "head.mlp.0.bias"} <= plain
    assert decayed | plain == set(names.values()) and not decayed & plain

    # The teacher starts as the student, gets no gradients, and its head's gain stays frozen at 1.
    teacher = state.teacher_without_ddp
    for (name, t), s in zip(teacher.state_dict().items(), state.student_without_ddp.state_dict().values()):
        assert torch.equal(t, s), name
    assert not any(p.requires_grad for p in teacher.parameters())
    assert state.student_without_ddp.head.last_layer.weight_g.requires_grad

    # A step at iteration 5 writes lr[5] to both groups and wd[5] to the decayed group only. The teacher sees
    # the 2 global views (one pass), the student all 4 (one pass per view shape).
    calls = {"teacher": [], "student": []}
    for name, net in (("teacher", teacher), ("student", state.student_without_ddp)):
        net.backbone.register_forward_hook(lambda m, inp, out, name=name: calls[name].append(tuple(inp[0].shape)))
    train_ssl.train_step(state, step_views(), 1, 5, args)
    assert calls == {"teacher": [(4, 3, 2, 32, 32)], "student": [(4, 3, 2, 32, 32), (4, 3, 2, 16, 16)]}
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(lr[5])] * 2
    assert (opt.param_groups[0]["weight_decay"], opt.param_groups[1]["weight_decay"]) == (pytest.approx(wd[5]), 0)


def test_train_step_auto_precision_and_grad_checkpointing(monkeypatch, fp32_steps, device):
    # auto: bf16 on CUDA and on CPUs with native bf16, fp32 on other CPUs (then the first check is exact)
    losses_32, _ = fp32_steps(False, device=device)
    state, args = step_state(monkeypatch, False, "--amp_dtype", "auto", device=device)
    assert state.precision == (torch.bfloat16 if device.type == "cuda" or utils.cpu_has_native_bf16() else None)
    losses_bf, _ = run_steps(state, args)
    assert torch.isfinite(losses_bf).all()
    torch.testing.assert_close(losses_bf, losses_32, rtol=2e-2, atol=2e-2)
    state, args = step_state(monkeypatch, False, "--grad_checkpointing", "true", "--use_fp16", "false",
                             device=device)
    losses_ck, _ = run_steps(state, args)
    torch.testing.assert_close(losses_ck, losses_32, rtol=1e-5, atol=1e-6)


def test_train_step_returns_without_host_sync_value(monkeypatch, device):
    state, args = step_state(monkeypatch, fused=False, device=device)
    loss, momentum = train_ssl.train_step(state, step_views(device=device), 0, 0, args)
    assert isinstance(loss, torch.Tensor) and not loss.requires_grad and momentum == pytest.approx(0.9)
    assert loss.device.type == device.type


def test_training_loop_never_reads_a_value_back_to_the_host(monkeypatch):
    # The CUDA test above checks one step; this checks the loop around it (meters, replaced-sample count, the
    # non-finite and stop checks) on the CPU: .item() / float(t) reads, each a host sync on CUDA, do not grow
    # with the number of iterations.
    # fused AdamW, the CUDA default, keeps its step counts on the device (the foreach one reads its CPU ones)
    state, args = step_state(monkeypatch, True, "--use_fp16", "false", "--log_freq", "100")

    def host_reads(batches: int) -> int:
        loader = [(step_views(), None, None, {"skipped": torch.tensor([0, 1])}) for _ in range(batches)]
        with HostReads() as reads:
            stats = train_ssl.train_one_epoch(state, loader, 0, batches, args)
        assert stats["replaced_samples"] == batches and math.isfinite(stats["loss"])
        return reads.count

    assert host_reads(3) == host_reads(1)


def test_an_epoch_with_many_replaced_draws_ends_with_a_warning(monkeypatch, capsys):
    # train_one_epoch counts the draws replaced because their video could not be read (log.txt's
    # train_replaced_samples) and, past 5 % of the epoch's draws, says so in one line that names what to do.
    state, args = step_state(monkeypatch, False, "--use_fp16", "false", "--batch_size_per_gpu", "2")
    for skipped, warned in (([0, 0], False), ([0, 1], True)):
        loader = [(step_views(), None, None, {"skipped": torch.tensor(skipped)}) for _ in range(3)]
        assert train_ssl.train_one_epoch(state, loader, 0, 3, args)["replaced_samples"] == 3 * sum(skipped)
        lines = [line for line in capsys.readouterr().out.splitlines() if "unreadable" in line]
        assert lines == (["Epoch 0: 3 of the 9 training draws (33%) were unreadable videos, replaced by others: the "
                          "epoch trained on the readable rest of the list; check DATA.PATH_PREFIX and the files of "
                          "the list (datasets/DATASET.md)."] if warned else [])


def test_compile_keeps_every_view_of_the_paper_layout_compiled(monkeypatch, caplog):
    # --compile (static shapes) makes a graph per view shape and grad mode; student and teacher backbones share
    # dynamo's cache. The paper's views (globals of 8 and 16 frames, locals of 2/4/8/16) need 8 graphs and
    # einops invalidates the first once: past torch's default limit of 8, dynamo would run the rest eagerly for
    # the whole run. The eager backend stands in for inductor (same graphs and guards, no code generation).
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    monkeypatch.setitem(TINY_BACKBONE, "depth", 1)  # tracing time grows with the depth
    torch._dynamo.reset()
    # Dynamo logs each limit it hits ("torch._dynamo hit config.recompile_limit (8)"; torch < 2.7:
    # cache_size_limit, with no switch to raise instead); torch's loggers stop short of the root logger, caplog's.
    dynamo_log = logging.getLogger("torch._dynamo.convert_frame")
    dynamo_log.addHandler(caplog.handler)
    # dynamo's own patch (pytest's monkeypatch would delete, i.e. hide, a config entry on undo): torch's default
    # limit, restored afterwards, under its old name (an alias of recompile_limit from torch 2.7 on)
    with torch._dynamo.config.patch(cache_size_limit=8):
        try:
            state, args = step_state(monkeypatch, False, "--compile", "true", "--local_crops_number", "8",
                                     "--use_fp16", "false")
            views = [torch.randn(1, 3, t, 32, 32) for t in (8, 16)] + \
                    [torch.randn(1, 3, t, 16, 16) for t in (2, 2, 4, 4, 8, 8, 16, 16)]
            for it in range(2):
                loss, _ = train_ssl.train_step(state, views, 0, it, args)
            assert torch.isfinite(loss)
        finally:
            dynamo_log.removeHandler(caplog.handler)
            torch._dynamo.reset()
    assert "torch._dynamo hit config." not in caplog.text


def test_compile_raises_the_recompile_limit_under_its_old_name_on_torch_before_2_7(monkeypatch):
    # requirements.txt allows torch >= 2.5; torch 2.5 and 2.6 name the limit cache_size_limit (recompile_limit
    # came in 2.7 and keeps the old name as an alias): --compile must not fail there on an attribute.
    real = torch._dynamo.config

    class OldConfig:  # torch 2.6's names: the rest is this torch's
        cache_size_limit = 8

        def __getattr__(self, name):
            if name == "recompile_limit":
                raise AttributeError(name)
            return getattr(real, name)

    old = OldConfig()
    monkeypatch.setattr(torch._dynamo, "config", old)
    limit = real.cache_size_limit  # the name every torch has (an alias of recompile_limit from 2.7 on)
    step_state(monkeypatch, False, "--compile", "true", "--use_fp16", "false")
    assert vars(old) == {"cache_size_limit": train_ssl.COMPILE_GRAPH_LIMIT} and real.cache_size_limit == limit


class CPUOpAudit(TorchDispatchMode):
    """Records every aten op that touches a CPU tensor of more than one element (0-dim CPU tensors are
    scalars that PyTorch passes to CUDA kernels by value)."""

    def __init__(self):
        super().__init__()
        self.cpu_ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        if any(t.device.type == "cpu" and t.numel() > 1 for t in tensors):
            self.cpu_ops.append(str(func))
        return out


@pytest.mark.gpu
def test_cuda_train_step_keeps_every_tensor_on_the_gpu_and_never_syncs(monkeypatch):
    cuda = torch.device("cuda")
    state, args = step_state(monkeypatch, True, "--amp_dtype", "bf16", device=cuda)
    views = step_views(device=cuda)
    train_ssl.train_step(state, views, 0, 0, args)  # first step: lazy initialisation may synchronise
    torch.cuda.synchronize()
    audit = CPUOpAudit()
    torch.cuda.set_sync_debug_mode("error")  # any host sync in the step raises
    try:
        with audit:
            loss, _ = train_ssl.train_step(state, views, 0, 1, args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert audit.cpu_ops == [], f"ops on CPU tensors in the CUDA step: {sorted(set(audit.cpu_ops))}"
    assert loss.is_cuda and all(p.is_cuda for p in state.student.parameters())
    assert all(t.is_cuda for st in state.optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor))


@pytest.mark.gpu
def test_a_sample_drawn_in_the_training_process_leaves_the_cuda_rng_alone():
    # --num_workers 0: SeededDataset seeds torch for each sample in this process, and torch.manual_seed also
    # reseeds the GPU; the GPU's stream (drop path, dropout) must continue as if no sample had been drawn.
    from datasets.seeding import SeededDataset

    class DrawsOnTheGPU(torch.utils.data.Dataset):
        def __getitem__(self, index):
            return torch.rand(1, device="cuda")

    torch.cuda.init()
    torch.cuda.manual_seed(5)
    expected = torch.rand(4, device="cuda")
    torch.cuda.manual_seed(5)
    draws = [SeededDataset(DrawsOnTheGPU())[(0, seed)] for seed in (123, 123, 7)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])  # the sample's seed rules
    torch.testing.assert_close(torch.rand(4, device="cuda"), expected, rtol=0, atol=0)


def test_pretrained_rgb_loads_the_teacher_backbone_into_both_and_every_key(monkeypatch, tmp_path):
    # --pretrained_rgb (spec 2.1 / 3.6): the `teacher` entry of an SVT checkpoint, backbone only, strictly into
    # the student and (through it) the teacher; the head stays freshly initialised.
    monkeypatch.setattr(train_ssl, "build_backbone", functools.partial(models.build_backbone, **TINY_BACKBONE))
    cfg = get_cfg()
    cfg.DATA.TRAIN_CROP_SIZE, cfg.DATA.NUM_FRAMES = 32, 2
    torch.manual_seed(1)
    source = models.MultiCropWrapper(models.build_backbone("vit_tiny", cfg, **TINY_BACKBONE),
                                     models.DINOHead(48, 64, hidden_dim=32, bottleneck_dim=16))
    path = tmp_path / "checkpoint.pth"
    torch.save({"teacher": source.state_dict(), "student": {}}, path)
    args = train_ssl.get_args_parser().parse_args(["--arch", "vit_tiny", "--out_dim", "64", "--pretrained_rgb", str(path)])
    torch.manual_seed(2)
    _, _, student, teacher = train_ssl.build_networks(args, cfg, torch.device("cpu"))
    for net in (student, teacher):
        for k, v in source.backbone.state_dict().items():
            assert torch.equal(net.backbone.state_dict()[k], v), k
    assert not torch.equal(student.head.mlp[0].weight, source.head.mlp[0].weight)
    # The original loads strictly: a file without every backbone weight (here an image ViT: no time_embed or
    # temporal_fc) is an error, not a half-random start.
    image_vit = {k: v for k, v in source.backbone.state_dict().items() if "temporal" not in k and k != "time_embed"}
    torch.save(image_vit, path)
    with pytest.raises(ValueError, match="time_embed"):
        train_ssl.build_networks(args, cfg, torch.device("cpu"))


def test_imagenet_init_key_is_applied_to_the_student(tmp_path):
    args = train_ssl.get_args_parser().parse_args(["--arch", "vit_tiny", "--out_dim", "64"])
    cfg = get_cfg()
    cfg.TIMESFORMER.PRETRAINED_MODEL = str(tmp_path / "dino_vitbase16_pretrain.pth")
    with pytest.raises(FileNotFoundError, match="dino_vitbase16_pretrain.pth"):
        train_ssl.build_networks(args, cfg, torch.device("cpu"))


# ---------------------------------------------------------------------------------------------
# End-to-end runs (in-process; the backbone is shrunk to depth 2, width 48)
# ---------------------------------------------------------------------------------------------
def _argv(root: Path, out: Path, *extra: str, opts=()) -> list[str]:
    return ["--arch", "vit_tiny", "--out_dim", "256", "--batch_size_per_gpu", "4", "--epochs", "2",
            "--warmup_epochs", "1", "--local_crops_number", "2", "--num_workers", "0", "--log_freq", "2",
            "--lr", "0.05", "--data_path", str(root / "annotations"), "--output_dir", str(out), *extra,
            "--opts", "DATA.PATH_PREFIX", str(root / "videos"), "DATA.NUM_FRAMES", "4", "DATA.SAMPLING_RATE", "2",
            "DATA.TRAIN_CROP_SIZE", "32", "DATA.LOCAL_CROP_SIZE", "16", "DATA.LOCAL_NUM_FRAMES", "[2, 4]", *opts]


def _train(monkeypatch, argv):
    monkeypatch.setattr(train_ssl, "build_backbone", functools.partial(models.build_backbone, **TINY_BACKBONE))
    parser = train_ssl.get_args_parser()
    train_ssl.train_svt(parser.parse_args(argv))


@pytest.fixture(scope="module")
def full_run(synthetic_root, tmp_path_factory):
    """An uninterrupted 2-epoch run with online kNN each epoch (the reference of the resume tests, which
    also shows that the kNN pass leaves the training RNG streams alone)."""
    out = tmp_path_factory.mktemp("full")
    mp = pytest.MonkeyPatch()
    try:
        _train(mp, _knn_argv(synthetic_root, out))
    finally:
        mp.undo()
    return out


def _assert_same_state(a: dict, b: dict):
    for key in ("student", "teacher", "dino_loss"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}"
    # every trainable parameter has its AdamW state (step, both moments), the same in both, step counts included
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and len(sa) == sum(len(g["params"]) for g in a["optimizer"]["param_groups"])
    for index in sa:
        assert sa[index].keys() == sb[index].keys() == {"step", "exp_avg", "exp_avg_sq"}
        for name in sa[index]:
            assert torch.equal(sa[index][name], sb[index][name]), f"optimizer state {index} {name}"


def test_two_epoch_run_outputs(full_run):
    lines = [json.loads(l) for l in (full_run / "log.txt").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [0, 1]
    for line in lines:
        assert {"train_loss", "train_lr", "train_wd", "epoch", "train_replaced_samples", "epoch_time"} <= line.keys()
        assert 0 <= line["train_data_wait"] < 1
        assert np.isfinite(line["train_loss"]) and line["train_replaced_samples"] == 0
        assert 0 <= line["knn_top1"] <= line["knn_top5"] <= 100  # online kNN on the held-out lists
    assert list((full_run / "tb").glob("events.out.tfevents.*"))
    assert json.loads((full_run / "config.txt").read_text())["out_dim"] == 256
    assert "LOCAL_NUM_FRAMES" in (full_run / "config.yaml").read_text()
    ckpt = safe_torch_load(full_run / "checkpoint.pth")
    assert ORIGINAL_KEYS <= ckpt.keys() and ckpt["epoch"] == 2 and "fp16_scaler" not in ckpt
    # 2 epochs of 4 steps; the last layer's direction is frozen in epoch 0 (no gradient: AdamW skips it)
    steps = sorted(int(state["step"]) for state in ckpt["optimizer"]["state"].values())
    assert steps == [4] + [8] * (len(steps) - 1)
    assert all(k.startswith(("module.backbone.", "module.head.")) for k in ckpt["student"])
    assert all(k.startswith(("backbone.", "head.")) for k in ckpt["teacher"])
    assert ckpt["dino_loss"]["center"].shape == (1, 256) and ckpt["args"].out_dim == 256
    assert len(ckpt["optimizer"]["param_groups"]) == 2
    first = safe_torch_load(full_run / "checkpoint0000.pth")
    assert first["epoch"] == 1
    # Epoch 0: the last layer got no update, so the EMA teacher still equals the student there.
    for ck, close in ((first, True), (ckpt, False)):
        s, t = ck["student"]["module.head.last_layer.weight_v"], ck["teacher"]["head.last_layer.weight_v"]
        assert torch.allclose(s, t, atol=1e-6) == close
        assert not torch.equal(ck["student"]["module.backbone.cls_token"], ck["teacher"]["backbone.cls_token"])


class _Killed(Exception):
    pass


def test_kill_after_epoch_then_resume_is_exact(full_run, synthetic_root, tmp_path, monkeypatch):
    real = train_ssl.train_one_epoch

    def dies_in_epoch_1(state, loader, epoch, *a, **kw):
        if epoch == 1:
            raise _Killed
        return real(state, loader, epoch, *a, **kw)

    monkeypatch.setattr(train_ssl, "train_one_epoch", dies_in_epoch_1)
    with pytest.raises(_Killed):
        _train(monkeypatch, _argv(synthetic_root, tmp_path))
    assert safe_torch_load(tmp_path / "checkpoint.pth")["epoch"] == 1
    monkeypatch.setattr(train_ssl, "train_one_epoch", real)
    _train(monkeypatch, _argv(synthetic_root, tmp_path))
    _assert_same_state(safe_torch_load(tmp_path / "checkpoint.pth"), safe_torch_load(full_run / "checkpoint.pth"))
    losses = [json.loads(l)["train_loss"] for l in (tmp_path / "log.txt").read_text().splitlines()]
    full = [json.loads(l)["train_loss"] for l in (full_run / "log.txt").read_text().splitlines()]
    assert losses == full


def test_mid_epoch_resume_is_exact(full_run, synthetic_root, tmp_path, monkeypatch):
    real_forward = DINOLoss.forward
    calls = []

    def dies_at_step_7(self, *a, **kw):  # epoch 1, iteration 2 (4 iterations per epoch)
        calls.append(1)
        if len(calls) == 7:
            raise _Killed
        return real_forward(self, *a, **kw)

    monkeypatch.setattr(DINOLoss, "forward", dies_at_step_7)
    with pytest.raises(_Killed):
        _train(monkeypatch, _argv(synthetic_root, tmp_path, "--saveckp_iters", "2"))
    ckpt = safe_torch_load(tmp_path / "checkpoint.pth")
    assert (ckpt["epoch"], ckpt["iteration"]) == (1, 2)
    monkeypatch.setattr(DINOLoss, "forward", real_forward)
    _train(monkeypatch, _argv(synthetic_root, tmp_path, "--saveckp_iters", "2"))
    _assert_same_state(safe_torch_load(tmp_path / "checkpoint.pth"), safe_torch_load(full_run / "checkpoint.pth"))


# A real signal, sent by the process to itself at the start of its `nth` training step (on rank `rank` only); test
# code, no hook in train_ssl.py. Runs train_ssl.py's command line with the tiny backbone.
SIGNAL_LAUNCHER = textwrap.dedent("""
    import functools, os, signal, sys
    sys.path.insert(0, {root!r})
    import models, train_ssl
    from utils import evaluation
    train_ssl.build_backbone = functools.partial(models.build_backbone, depth=2, embed_dim=48, num_heads=2)
    real, calls = {hook}, []

    def signalled(*args, **kwargs):
        calls.append(1)
        if len(calls) == {nth} and os.environ.get("RANK", "0") == "{rank}":
            os.kill(os.getpid(), signal.{sig})
        return real(*args, **kwargs)

    {hook} = signalled
    try:
        train_ssl.main()
    except SystemExit as stop:
        sys.stderr.write(f"rank {{os.environ.get('RANK', '0')}} exits with {{stop.code}}\\n")
        raise
""")


def _signal_launcher(tmp_path: Path, nth: int, sig: str = "SIGTERM", rank: int = 0,
                     hook: str = "train_ssl.train_step") -> Path:
    """The launcher of SIGNAL_LAUNCHER, signalling at the `nth` call of `hook` (train_ssl.train_step: once per
    training step; evaluation.to_device: once per batch of a kNN pass)."""
    launcher = tmp_path.parent / f"{tmp_path.name}_signal.py"
    launcher.write_text(SIGNAL_LAUNCHER.format(root=str(ROOT), nth=nth, sig=sig, rank=rank, hook=hook))
    return launcher


def _knn_argv(root: Path, out: Path, *extra: str) -> list[str]:
    """The argv of the `full_run` reference: a kNN pass after each epoch, of 8 bank and 4 query batches."""
    return _argv(root, out, "--knn_freq", "1", "--knn_data_path", str(root / "knn_splits"),
                 "--knn_path_prefix", str(root / "videos"), "--eval_batch_size_per_gpu", "2", *extra)


def _assert_same_run(out: Path, reference: Path):
    """Same log.txt records (but the wall-clock keys) and the same final weights, optimizer and centre."""
    assert log_records(out) == log_records(reference)
    _assert_same_state(safe_torch_load(out / "checkpoint.pth"), safe_torch_load(reference / "checkpoint.pth"))


def test_sigterm_mid_epoch_saves_the_step_reached_exits_3_and_resumes_exactly(full_run, synthetic_root, tmp_path,
                                                                            monkeypatch):
    """SIGTERM during step 6 (epoch 1, iteration index 1 of 4): the run finishes that step and the next (the
    first stop check, a log step), writes checkpoint.pth at iteration 3 and exits with status 3; the rerun
    ends with the log and weights of an uninterrupted run."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())  # the reference's float summation order
    proc = subprocess.run([sys.executable, str(_signal_launcher(tmp_path, nth=6)),
                           *_knn_argv(synthetic_root, tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ("Stop signal SIGTERM: every rank stopped after iteration 3/4 of epoch 1 and "
            f"{tmp_path / 'checkpoint.pth'} holds it. Exiting with status 3") in proc.stdout
    ckpt = safe_torch_load(tmp_path / "checkpoint.pth")
    assert (ckpt["epoch"], ckpt["iteration"]) == (1, 3)
    assert len((tmp_path / "log.txt").read_text().splitlines()) == 1
    _train(monkeypatch, _knn_argv(synthetic_root, tmp_path))
    _assert_same_run(tmp_path, full_run)


def test_sigusr1_at_an_epochs_last_step_saves_it_and_the_rerun_only_ends_the_epoch(full_run, synthetic_root,
                                                                                  tmp_path, monkeypatch):
    """The signal handler is in place in-process, and the default handler is back after the stop; a stop at the
    last iteration of epoch 0 saves iteration 4 of 4: the rerun trains nothing more of that epoch, runs its kNN
    pass and epoch end, and goes on as an uninterrupted run."""
    import signal
    calls = signal_at_call(monkeypatch, train_ssl, "train_step", 4, signal.SIGUSR1)
    with pytest.raises(SystemExit) as stopped:
        _train(monkeypatch, _knn_argv(synthetic_root, tmp_path))
    assert stopped.value.code == 3 and len(calls) == 4
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    ckpt = safe_torch_load(tmp_path / "checkpoint.pth")
    assert (ckpt["epoch"], ckpt["iteration"]) == (0, 4)
    assert not (tmp_path / "log.txt").exists()
    monkeypatch.undo()
    _train(monkeypatch, _knn_argv(synthetic_root, tmp_path))
    _assert_same_run(tmp_path, full_run)


def test_sigterm_in_the_knn_pass_keeps_the_epoch_and_the_rerun_runs_the_pass_again(full_run, synthetic_root,
                                                                                  tmp_path, monkeypatch, capsys):
    """SIGTERM at the first batch of epoch 0's kNN pass (its bank: 8 batches of 2): the pass stops after batch 5,
    its first check (the queries are never extracted), and the run exits with status 3. The epoch-end checkpoint,
    written before the pass, holds epoch 0; log.txt has no line yet. The rerun trains nothing of epoch 0 again: it
    runs epoch 0's kNN pass, writes its log.txt line once, trains epoch 1 and ends as the uninterrupted run (the
    same log.txt, kNN results included, and weights)."""
    calls = signal_at_call(monkeypatch, evaluation, "to_device", 1)  # once per batch of a kNN pass
    with pytest.raises(SystemExit) as stopped:
        _train(monkeypatch, _knn_argv(synthetic_root, tmp_path))
    assert len(calls) == 5
    assert_stopped(stopped, capsys.readouterr().out, "after iteration 4/4 of epoch 0 (in the kNN evaluation of "
                   "epoch 0, which a resume runs again) and", tmp_path / "checkpoint.pth")
    ckpt = safe_torch_load(tmp_path / "checkpoint.pth")
    assert (ckpt["epoch"], ckpt["iteration"], ckpt["epoch_log"]["epoch"]) == (1, 0, 0)
    assert "knn_top1" not in ckpt["epoch_log"] and (tmp_path / "checkpoint0000.pth").is_file()
    assert not (tmp_path / "log.txt").exists()
    monkeypatch.undo()
    _train(monkeypatch, _knn_argv(synthetic_root, tmp_path))
    out = capsys.readouterr().out
    assert "Wrote the log.txt line of epoch 0, missing after an interrupted end of epoch." in out
    assert "SVT pretraining from epoch 1 to 2." in out and "Epoch: [0/2]" not in out
    _assert_same_run(tmp_path, full_run)


def test_mid_epoch_resume_with_another_global_batch_trains_each_video_once(synthetic_root, tmp_path, monkeypatch,
                                                                          capsys):
    """A mid-epoch checkpoint resumed with another global batch (--batch_size_per_gpu or the number of
    processes changed, e.g. after losing a node) continues after the videos already done, counted in videos,
    not in iterations of the new batch size."""
    seen, real_getitem = [], SeededDataset.__getitem__

    def recording(self, item):
        seen.append(item[0])
        return real_getitem(self, item)

    real_forward, calls = DINOLoss.forward, []

    def dies_at_step_5(self, *a, **kw):  # after the save at iteration 4 of 8 (batch 2): 8 videos done
        calls.append(1)
        if len(calls) == 5:
            raise _Killed
        return real_forward(self, *a, **kw)

    monkeypatch.setattr(SeededDataset, "__getitem__", recording)
    monkeypatch.setattr(DINOLoss, "forward", dies_at_step_5)
    one_epoch = ("--epochs", "1", "--warmup_epochs", "0", "--saveckp_iters", "4")
    with pytest.raises(_Killed):
        _train(monkeypatch, _argv(synthetic_root, tmp_path, *one_epoch, "--batch_size_per_gpu", "2"))
    assert safe_torch_load(tmp_path / "checkpoint.pth")["iteration"] == 4
    done, seen[:] = seen[:8], []
    monkeypatch.setattr(DINOLoss, "forward", real_forward)
    capsys.readouterr()
    _train(monkeypatch, _argv(synthetic_root, tmp_path, *one_epoch, "--batch_size_per_gpu", "4"))
    assert sorted(done + seen) == list(range(16))  # the 8 videos left, in 2 iterations of 4
    assert "global batch of 2 videos (1 process x 2), this run 4: 8 videos of epoch 0 were done" in \
        capsys.readouterr().out


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(synthetic_root, tmp_path, monkeypatch, capsys):
    real_forward = DINOLoss.forward

    def nan_in_epoch_1(self, student_output, teacher_output, epoch):
        loss = real_forward(self, student_output, teacher_output, epoch)
        return loss * float("nan") if epoch == 1 else loss

    monkeypatch.setattr(DINOLoss, "forward", nan_in_epoch_1)
    with pytest.raises(SystemExit) as exc:
        _train(monkeypatch, _argv(synthetic_root, tmp_path))
    assert exc.value.code == 1
    out = capsys.readouterr().out
    assert "Loss is [nan], stopping training" in out and "No checkpoint is written" in out
    ckpt = safe_torch_load(tmp_path / "checkpoint.pth")
    assert ckpt["epoch"] == 1  # the epoch-0 checkpoint, untouched
    assert all(torch.isfinite(v).all() for v in ckpt["student"].values())
    assert not list(tmp_path.glob(".checkpoint*.tmp"))
    assert len((tmp_path / "log.txt").read_text().splitlines()) == 1


def test_eval_normalisation_keys_given_to_pretraining_are_noted(synthetic_root, capsys):
    """DATA.MEAN/STD normalise evaluation clips; the SSL views keep the ImageNet statistics (the original's):
    train_ssl says so when they are set, and nothing when they are not."""
    args = train_ssl.get_args_parser().parse_args(["--data_path", str(synthetic_root / "annotations"), "--opts",
                                                   "DATA.MEAN", "[0.5, 0.5, 0.5]"])
    train_ssl.prepare_config(args)
    assert "Note: DATA.MEAN is set, but the SSL views are normalised with the ImageNet statistics" in \
        capsys.readouterr().out
    args = train_ssl.get_args_parser().parse_args(["--data_path", str(synthetic_root / "annotations"), "--opts",
                                                   "DATA.INV_UNIFORM_SAMPLE", "True"])
    train_ssl.prepare_config(args)
    assert "Note: DATA.INV_UNIFORM_SAMPLE is set, but it draws the short side of the clips the evaluation scripts " \
           "train on" in capsys.readouterr().out
    args = train_ssl.get_args_parser().parse_args(["--data_path", str(synthetic_root / "annotations")])
    train_ssl.prepare_config(args)
    assert "Note:" not in capsys.readouterr().out


def test_data_split_in_pretraining_picks_the_online_knn_split(synthetic_root, capsys):
    """train_ssl's DATA.SPLIT is the online kNN's (the Kinetics train.csv has no splits): checked against
    --knn_dataset when the kNN runs, noted as unread when it does not."""
    def prepare(*argv):
        train_ssl.prepare_config(train_ssl.get_args_parser().parse_args(
            ["--data_path", str(synthetic_root / "annotations"), *argv, "--opts", "DATA.SPLIT", "2"]))
        return capsys.readouterr().out

    assert "Note:" not in prepare("--knn_freq", "1", "--knn_dataset", "hmdb51")
    assert "Note: DATA.SPLIT is set, but it picks the UCF-101 / HMDB-51 split of the online kNN lists, which " \
           "--knn_freq 0 turns off." in prepare()
    with pytest.raises(ValueError, match=r"^DATA.SPLIT 2 applies only to ucf101/hmdb51 .*kinetics400 has one list"):
        prepare("--knn_freq", "1", "--knn_dataset", "kinetics400")


def test_no_rgb_aug_which_would_leave_no_ssl_views_is_an_error(synthetic_root):
    """DATA.NO_RGB_AUG True (the original's plain Kinetics train clip) is read nowhere: pretraining refuses it."""
    args = train_ssl.get_args_parser().parse_args(["--data_path", str(synthetic_root / "annotations"), "--opts",
                                                   "DATA.NO_RGB_AUG", "True"])
    with pytest.raises(ValueError, match="DATA.NO_RGB_AUG True asks for one plain clip per video instead of the SSL"):
        train_ssl.prepare_config(args)


def test_missing_train_csv_names_the_path(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "train.csv")):
        _train(monkeypatch, ["--data_path", str(tmp_path), "--output_dir", str(tmp_path / "o")])


def test_unwritable_output_dir_fails_before_any_work(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # a folder under a file cannot be created, even by root
    (tmp_path / "train.csv").write_text("a.mp4 0\n")
    # it writes there every epoch, not "at the end of the run" (the evaluations' case)
    with pytest.raises(PermissionError, match=r"--output_dir .*a_file/o is not writable .*; pass a folder you can write "
                                              r"to \(checkpoint.pth, log.txt and tensorboard files are written there "
                                              r"from the first epoch on\)"):
        _train(monkeypatch, ["--data_path", str(tmp_path), "--output_dir", str(blocker / "o")])
    # the command line (main) too: its folder is made before the run, with the same error
    with pytest.raises(PermissionError, match=r"--output_dir .*a_file/o/sub is not writable"):
        train_ssl.main(["--data_path", str(tmp_path), "--output_dir", str(blocker / "o" / "sub")])


def test_a_folder_another_run_writes_fails_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "train.csv").write_text("a.mp4 0\n")
    with output_dir_lock(tmp_path / "o"):  # a run still writing there (README "Reliability")
        with pytest.raises(RuntimeError, match=rf"--output_dir {tmp_path / 'o'} is in use by another run \(pid "):
            _train(monkeypatch, ["--data_path", str(tmp_path), "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o" / "config.txt").exists()


def test_train_csv_given_as_data_path_names_its_folder(tmp_path, monkeypatch):
    # The README's DATA_PATH is the annotations folder; users often pass the csv itself.
    (tmp_path / "train.csv").write_text("a.mp4 0\n")
    with pytest.raises(FileNotFoundError, match=f"is a file, and the setting names the folder that holds the lists: "
                                                f"use {tmp_path}$"):
        _train(monkeypatch, ["--data_path", str(tmp_path / "train.csv"), "--output_dir", str(tmp_path / "o")])


def test_warmup_longer_than_the_run_names_the_value_to_pass(tmp_path, monkeypatch):
    (tmp_path / "train.csv").write_text("a.mp4 0\n")
    with pytest.raises(ValueError, match=r"--warmup_epochs 10 is larger than --epochs 2: pass --warmup_epochs 2 or "
                                         r"less"):
        _train(monkeypatch, ["--epochs", "2", "--warmup_epochs", "10", "--data_path", str(tmp_path),
                             "--output_dir", str(tmp_path / "o")])


@pytest.mark.parametrize("flags", [["--global_crops_scale", "0.4"], ["--local_crops_scale", "0.4", "0.05"],
                                   ["--local_crops_scale", "0.0", "0.4"], ["--global_crops_scale", "0.4", "1.5"]])
def test_crop_scales_must_be_two_area_fractions(flags):
    # one number would fail inside the loader workers (IndexError), a reversed range draws nothing sensible
    args = train_ssl.get_args_parser().parse_args(flags)
    with pytest.raises(ValueError, match=rf"^{flags[0]} {' '.join(flags[1:])}: give two area fractions MIN MAX"):
        train_ssl.check_args(args)
    train_ssl.check_args(train_ssl.get_args_parser().parse_args([]))  # SVT's defaults pass


# ---------------------------------------------------------------------------------------------
# 2 processes (torchrun, gloo) vs 1 process with the same global batch
# ---------------------------------------------------------------------------------------------
LAUNCHER = textwrap.dedent("""
    import functools, sys
    sys.path.insert(0, {root!r})
    import models, train_ssl
    train_ssl.build_backbone = functools.partial(models.build_backbone, depth=2, embed_dim=48, num_heads=2)
    train_ssl.train_svt(train_ssl.get_args_parser().parse_args())
""")


def _torchrun(launcher: Path, nproc: int, argv: list[str], status: int = 0) -> str:
    """torchrun's output; its exit status must be `status` (1 when a process failed or stopped)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(launcher), *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == status, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_two_process_loss_matches_one_process(synthetic_root, tmp_path, monkeypatch):
    launcher = tmp_path / "launch_tiny.py"
    launcher.write_text(LAUNCHER.format(root=str(ROOT)))
    opts = ("MODEL.DROP_PATH_RATE", "0.0")  # drop path draws differ per process; everything else is shared
    logs = {}
    for nproc, batch in ((1, 8), (2, 4)):
        out = tmp_path / f"np{nproc}"
        # fp32: bf16 rounding (auto on a CPU with native bf16) differs between batches of 8 and 2 x 4
        argv = _argv(synthetic_root, out, "--epochs", "1", "--warmup_epochs", "0", "--batch_size_per_gpu",
                     str(batch), "--use_fp16", "false", opts=opts)
        if nproc == 1:  # in this process (one thread, as torchrun's): the same run as LAUNCHER's, without a launch
            _train(monkeypatch, argv)
        else:
            _torchrun(launcher, nproc, argv)
        logs[nproc] = json.loads((out / "log.txt").read_text().splitlines()[0])
    # the loss (its centre all-reduced), and the collapse diagnostics: the entropy of the mean target is
    # that of the global batch, not of each process's share (lower: fewer clips to spread over prototypes)
    for key in ("train_loss", "train_target_entropy", "train_target_mean_entropy"):
        assert logs[2][key] == pytest.approx(logs[1][key], rel=1e-4), key
    # rank 0 alone writes: one tensorboard file, one log line, no stray temporary files
    assert len(list((tmp_path / "np2" / "tb").glob("events.out.tfevents.*"))) == 1
    assert len((tmp_path / "np2" / "log.txt").read_text().splitlines()) == 1
    assert sorted(p.name for p in (tmp_path / "np2").iterdir()) == sorted(p.name for p in (tmp_path / "np1").iterdir())


def test_a_signal_on_one_rank_stops_both_after_the_same_iteration(synthetic_root, tmp_path):
    """2 processes, 4 iterations of 2 x 2 clips; only rank 1 gets SIGTERM, during its 2nd step. Both ranks stop
    after iteration 3 (the first stop check after it, a log step), rank 0 writes that checkpoint and both exit
    with status 3 (torchrun reports it, then exits 1 itself)."""
    argv = _argv(synthetic_root, tmp_path, "--epochs", "1", "--warmup_epochs", "0", "--batch_size_per_gpu", "2",
                 "--dist_timeout", "1")
    out = _torchrun(_signal_launcher(tmp_path, nth=2, rank=1), 2, argv, status=1)
    # each rank's own exit status: torchrun 2.5 reports only the first rank to exit, having stopped the other
    assert "exitcode  : 3" in out and "rank 0 exits with 3" in out and "rank 1 exits with 3" in out, out[-3000:]
    assert out.count("Stop signal SIGTERM: every rank stopped after iteration 3/4 of epoch 0") == 2, out[-3000:]
    ckpt = safe_torch_load(tmp_path / "checkpoint.pth")
    assert (ckpt["epoch"], ckpt["iteration"]) == (0, 3)
    assert len(ckpt["rng"]) == 2 and len(ckpt["epoch_meters"]) == 2


def test_a_signal_on_one_rank_in_the_knn_pass_stops_both_and_both_run_it_again(synthetic_root, tmp_path):
    """2 processes, 1 epoch (1 step of 2 x 8 clips), then its kNN pass (a bank shard of 4 batches of 2 per rank);
    only rank 1 gets SIGTERM, at its first bank batch. Both stop at the bank's check after batch 4 and exit with
    status 3, the epoch-end checkpoint on disk. The 2-process rerun: rank 0 finds no log.txt line for epoch 0, both
    ranks run the kNN pass (collective) and rank 0 writes the line once, with the kNN result."""
    argv = _knn_argv(synthetic_root, tmp_path, "--epochs", "1", "--warmup_epochs", "0", "--batch_size_per_gpu", "8",
                     "--dist_timeout", "1")
    out = _torchrun(_signal_launcher(tmp_path, nth=1, rank=1, hook="evaluation.to_device"), 2, argv, status=1)
    # each rank's own exit status: torchrun 2.5 reports only the first rank to exit, having stopped the other
    assert "exitcode  : 3" in out and "rank 0 exits with 3" in out and "rank 1 exits with 3" in out, out[-3000:]
    assert out.count("Stop signal SIGTERM: every rank stopped after iteration 1/1 of epoch 0 (in the kNN evaluation "
                     "of epoch 0, which a resume runs again)") == 2, out[-3000:]
    assert safe_torch_load(tmp_path / "checkpoint.pth")["epoch"] == 1 and not (tmp_path / "log.txt").exists()
    launcher = tmp_path.parent / f"{tmp_path.name}_launch.py"
    launcher.write_text(LAUNCHER.format(root=str(ROOT)))
    out = _torchrun(launcher, 2, argv)
    assert "Wrote the log.txt line of epoch 0, missing after an interrupted end of epoch." in out
    (line,) = log_records(tmp_path)
    assert line["epoch"] == 0 and 0 <= line["knn_top1"] <= line["knn_top5"] <= 100


def test_a_stop_at_the_epochs_last_iteration_resumes_with_more_processes(synthetic_root, tmp_path, monkeypatch):
    """One process, 8 iterations of 2 clips, SIGUSR1 at the last: the checkpoint holds iteration 8/8 and the
    epoch's meters. Two processes of 1 clip resume it: no iteration is left, rank 0 starts from all the saved
    means, rank 1 from none; both sync the same meters (it hung until --dist_timeout, each rerun again) and
    log.txt and the printed line have the epoch's means of the first run."""
    import signal
    argv = _argv(synthetic_root, tmp_path, "--epochs", "1", "--warmup_epochs", "0", "--batch_size_per_gpu", "2",
                 "--dist_timeout", "0.25")
    signal_at_call(monkeypatch, train_ssl, "train_step", 8, signal.SIGUSR1)
    with pytest.raises(SystemExit) as stopped:
        _train(monkeypatch, argv)
    assert stopped.value.code == 3
    ckpt = safe_torch_load(tmp_path / "checkpoint.pth")
    assert (ckpt["epoch"], ckpt["iteration"]) == (0, 8)
    (saved,) = ckpt["epoch_meters"]
    launcher = tmp_path.parent / f"{tmp_path.name}_launch.py"
    launcher.write_text(LAUNCHER.format(root=str(ROOT)))
    out = _torchrun(launcher, 2, _set_batch(argv, "1"))
    (line,) = log_records(tmp_path)
    # the printed means are the epoch's, not the medians of rank 0's empty windows (0.000000)
    assert f"Epoch means: loss: {line['train_loss']:.6f}  target_entropy: " in out
    for name in ("loss", "target_entropy", "lr"):
        count, total = saved["meters"][name]
        assert count == 8 and line[f"train_{name}"] == pytest.approx(total / count, rel=1e-12), name
    assert line["epoch"] == 0 and line["train_replaced_samples"] == 0


def _set_batch(argv: list[str], batch: str) -> list[str]:
    i = argv.index("--batch_size_per_gpu")
    return argv[:i + 1] + [batch] + argv[i + 2:]


# LAUNCHER that also saves each rank's student and teacher (DDP-wrapped or not) after the run, to rank<R>.pt.
NETWORKS_LAUNCHER = textwrap.dedent("""
    import functools, os, sys, torch
    sys.path.insert(0, {root!r})
    import models, train_ssl
    train_ssl.build_backbone = functools.partial(models.build_backbone, depth=2, embed_dim=48, num_heads=2)
    real, built = train_ssl.build_networks, []

    def recording(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    train_ssl.build_networks = recording
    args = train_ssl.get_args_parser().parse_args()
    train_ssl.train_svt(args)
    student, teacher = built[0][2:]
    torch.save({{"student": student.state_dict(), "teacher": teacher.state_dict()}},
               os.path.join(args.output_dir, "rank" + os.environ["RANK"] + ".pt"))
""")


def test_batchnorm_head_with_two_cpu_processes_trains_with_per_process_statistics(synthetic_root, tmp_path):
    """--use_bn_in_head True with 2 gloo processes (README: the demo's fix for collapse): SyncBatchNorm runs on GPUs
    only (it failed every rank with 'SyncBatchNorm layers only work with GPU modules'), so on CPU the head keeps a
    BatchNorm per process, says so, and the 2 steps train: both ranks end with the same student and teacher weights
    (gradients all-reduced, the same EMA), each BatchNorm with its running statistics."""
    launcher = tmp_path.parent / f"{tmp_path.name}_networks.py"
    launcher.write_text(NETWORKS_LAUNCHER.format(root=str(ROOT)))
    argv = _argv(synthetic_root, tmp_path, "--epochs", "1", "--warmup_epochs", "0", "--use_bn_in_head", "True",
                 "--dist_timeout", "1")
    out = _torchrun(launcher, 2, argv)
    assert out.count("Note: on CPU the head's BatchNorm statistics are per process (each of the 2 normalises with "
                     "its own batch); SyncBatchNorm, which pools them, needs CUDA.") == 1
    (line,) = log_records(tmp_path)
    assert np.isfinite(line["train_loss"])
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for net in ("student", "teacher"):
        state = ranks[0][net]
        norms = [k.removesuffix(".running_mean") for k in state if k.endswith(".running_mean")]
        assert norms and all(state[f"{n}.num_batches_tracked"] == 2 for n in norms), net
        for name, value in state.items():
            if "running_" not in name:
                assert torch.equal(ranks[1][net][name], value), f"{net}.{name}"


def test_auto_precision_grad_checkpointing_lars_run(synthetic_root, tmp_path, monkeypatch):
    # auto: bf16 autocast on CPUs with native bf16, fp32 elsewhere (never emulated bf16 in a test)
    _train(monkeypatch, _argv(synthetic_root, tmp_path, "--epochs", "1", "--warmup_epochs", "0", "--amp_dtype", "auto",
                              "--grad_checkpointing", "true", "--optimizer", "lars", "--teacher_drop_path", "false"))
    line = json.loads((tmp_path / "log.txt").read_text())
    assert np.isfinite(line["train_loss"])
    ckpt = safe_torch_load(tmp_path / "checkpoint.pth")
    assert all(v.dtype == torch.float32 for v in ckpt["student"].values() if v.is_floating_point())


def test_collapse_warning_uniform_targets_and_one_prototype():
    # Uniform teacher targets over K prototypes give a cross-entropy of exactly ln K.
    import math
    healthy = math.log(512) * 0.8  # the batch-mean target spread over many prototypes
    assert train_ssl.collapse_warning(4.3, healthy, 512) is None
    assert train_ssl.collapse_warning(math.log(512) * 0.99, healthy, 512) is None
    msg = train_ssl.collapse_warning(6.2389, math.log(512), 512)
    assert msg and "ln(out_dim) = 6.2383" in msg and "--teacher_temp" in msg and "--use_bn_in_head" in msg
    assert "--warmup_teacher_temp" not in msg  # SVT's default: no warm-up, so that flag does nothing
    msg = train_ssl.collapse_warning(6.2389, math.log(512), 512, warmup_teacher_temp_epochs=30)
    assert "lower --teacher_temp, and --warmup_teacher_temp, where its 30-epoch warm-up starts" in msg
    assert train_ssl.collapse_warning(math.log(65536), math.log(65536), 65536)
    # One prototype for every clip: a low loss, but the batch-mean target has (almost) no entropy.
    msg = train_ssl.collapse_warning(0.03, 0.005, 512)
    assert msg and "same prototype" in msg and "--center_momentum" in msg
    assert train_ssl.collapse_warning(0.03, 0.1 * math.log(512) + 1e-3, 512) is None


def test_dino_loss_target_entropy_hand_computed():
    # Teacher logits chosen so the centred softmax at temperature 1 is known: one-hot-like vs uniform rows.
    loss = DINOLoss(out_dim=4, ncrops=2, warmup_teacher_temp=1.0, teacher_temp=1.0, warmup_teacher_temp_epochs=0,
                    nepochs=1)
    student = torch.zeros(2, 4)  # 2 views x batch 1
    uniform = torch.zeros(2, 4)
    loss(student, uniform, 0)
    assert torch.allclose(loss.target_entropy, torch.tensor([math.log(4), math.log(4)]))
    loss.center.zero_()
    peaked = torch.tensor([[50.0, 0, 0, 0], [0, 50.0, 0, 0]])  # each row one prototype, two different ones
    loss(student, peaked, 0)
    assert loss.target_entropy[0] < 1e-6 and torch.isclose(loss.target_entropy[1], torch.tensor(math.log(2)))
