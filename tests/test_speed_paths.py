"""The speed paths give the same numbers as the plain formulations (CPU, tiny sizes)."""
import argparse
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_ssl
from models import DINOHead, MultiCropWrapper, VisionTransformer

TINY = dict(embed_dim=48, depth=2, num_heads=3, drop_path_rate=0.0)


def reference_dino_loss(student_output, teacher_output, center, ncrops, student_temp=0.1, temp=0.04):
    """The original loop: mean over the 2 * (ncrops - 1) pairs of sum(-q * log p).mean() over the batch."""
    logp = F.log_softmax(student_output / student_temp, dim=-1).chunk(ncrops)
    q = F.softmax((teacher_output - center) / temp, dim=-1).detach().chunk(2)
    total, n = 0, 0
    for iq, qi in enumerate(q):
        for v, lp in enumerate(logp):
            if v != iq:
                total = total + torch.sum(-qi * lp, dim=-1).mean()
                n += 1
    return total / n


@pytest.mark.parametrize("ncrops", [2, 3, 10])
def test_dino_loss_matches_pairwise_loop(ncrops):
    torch.manual_seed(0)
    b, k = 3, 64
    student = torch.randn(ncrops * b, k, requires_grad=True)
    teacher = torch.randn(2 * b, k)
    loss_fn = train_ssl.DINOLoss(k, ncrops, 0.04, 0.04, 0, 2)
    loss_fn.center.normal_()
    center = loss_fn.center.clone()
    loss = loss_fn(student, teacher, 0)
    (grad,) = torch.autograd.grad(loss, student)
    ref = reference_dino_loss(student, teacher, center, ncrops)
    (ref_grad,) = torch.autograd.grad(ref, student)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)
    # the centre update is unchanged: 0.9 * c + 0.1 * mean(teacher)
    torch.testing.assert_close(loss_fn.center, 0.9 * center + 0.1 * teacher.mean(0, keepdim=True))


def test_weight_norm_linear_scales_outputs_like_normalised_weight():
    torch.manual_seed(0)
    head = DINOHead(16, 40, norm_last_layer=False, hidden_dim=32, bottleneck_dim=8)
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)
    layer = head.last_layer
    x = torch.randn(5, 8)
    out = layer(x)
    ref = F.linear(x, layer.weight)
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out.square().sum(), (layer.weight_v, layer.weight_g))
    ref_grads = torch.autograd.grad(ref.square().sum(), (layer.weight_v, layer.weight_g))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def reference_block(blk, z, b, t):
    """The divided space-time block with slices, two concatenations and plain permutes (the original's)."""
    d = z.shape[-1]
    hw = (z.shape[1] - 1) // t
    c, pt = z[:, :1], z[:, 1:]
    res_t = blk.temporal_fc(blk.temporal_attn(blk.temporal_norm1(pt.reshape(b * hw, t, d))).reshape(b, hw * t, d))
    xt = pt + res_t
    xs = xt.reshape(b, hw, t, d).permute(0, 2, 1, 3).reshape(b * t, hw, d)
    res = blk.attn(blk.norm1(torch.cat([c.repeat(1, t, 1).reshape(b * t, 1, d), xs], dim=1)))
    c_avg = res[:, 0].reshape(b, t, d).mean(dim=1, keepdim=True)
    res_p = res[:, 1:].reshape(b, t, hw, d).permute(0, 2, 1, 3).reshape(b, hw * t, d)
    z = torch.cat([c, xt], dim=1) + torch.cat([c_avg, res_p], dim=1)
    return z + blk.mlp(blk.norm2(z))


@pytest.mark.parametrize("t,side", [(8, 32), (2, 48), (1, 32)])
def test_divided_block_forward_and_backward_match_reference(t, side):
    torch.manual_seed(0)
    model = VisionTransformer(**TINY).train()
    with torch.no_grad():
        for blk in model.blocks:
            blk.temporal_fc.weight.normal_(0, 0.1)
    blk = model.blocks[0]
    b = 2
    z = torch.randn(b, 1 + (side // 16) ** 2 * t, 48, requires_grad=True)
    out = blk(z, b, t, side // 16)
    ref = reference_block(blk, z, b, t)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(out)
    params = [z, *blk.parameters()]
    grads = torch.autograd.grad((out * w).sum(), params)
    ref_grads = torch.autograd.grad((ref * w).sum(), params)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def make_state(fused: bool, precision=None):
    torch.manual_seed(0)
    backbone = VisionTransformer(**TINY, img_size=32, num_frames=2)
    student = MultiCropWrapper(backbone, DINOHead(48, 64, hidden_dim=32, bottleneck_dim=16))
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad = False
    args = argparse.Namespace(optimizer="adamw", clip_grad=3.0, freeze_last_layer=0)
    optimizer = train_ssl.build_optimizer(args, student, torch.device("cpu"), fused=fused)
    n = 4
    state = train_ssl.TrainState(
        student=student, teacher=teacher, student_without_ddp=student, teacher_without_ddp=teacher,
        dino_loss=train_ssl.DINOLoss(64, 4, 0.04, 0.04, 0, 1), optimizer=optimizer, fp16_scaler=None,
        lr_schedule=np.full(n, 1e-3), wd_schedule=np.full(n, 0.04), momentum_schedule=np.full(n, 0.9),
        precision=precision, device=torch.device("cpu"), writer=None, save_checkpoint=None)
    return state, args


def views(b=2):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(b, 3, 2, 32, 32, generator=g) for _ in range(2)] + \
           [torch.randn(b, 3, 2, 16, 16, generator=g) for _ in range(2)]


def run_steps(state, args, steps=3):
    losses = [train_ssl.train_step(state, views(), 0, it, args)[0] for it in range(steps)]
    return torch.stack(losses), state.teacher.state_dict()


def test_fused_adamw_matches_foreach_on_cpu():
    losses_f, teacher_f = run_steps(*make_state(fused=True))
    losses_r, teacher_r = run_steps(*make_state(fused=False))
    torch.testing.assert_close(losses_f, losses_r, rtol=1e-5, atol=1e-6)
    for k in teacher_r:
        torch.testing.assert_close(teacher_f[k], teacher_r[k], rtol=1e-5, atol=1e-6)


def test_train_step_bf16_autocast_and_grad_checkpointing_on_cpu():
    losses_32, _ = run_steps(*make_state(fused=False))
    state, args = make_state(fused=False, precision=torch.bfloat16)
    losses_bf, _ = run_steps(state, args)
    assert torch.isfinite(losses_bf).all()
    torch.testing.assert_close(losses_bf, losses_32, rtol=2e-2, atol=2e-2)
    state, args = make_state(fused=False)
    state.student.backbone.set_grad_checkpointing(True)
    losses_ck, _ = run_steps(state, args)
    torch.testing.assert_close(losses_ck, losses_32, rtol=1e-5, atol=1e-6)


def test_train_step_returns_without_host_sync_value():
    state, args = make_state(fused=False)
    loss, momentum = train_ssl.train_step(state, views(), 0, 0, args)
    assert isinstance(loss, torch.Tensor) and not loss.requires_grad and momentum == pytest.approx(0.9)
