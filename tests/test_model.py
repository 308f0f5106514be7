"""TimeSformer backbone, DINO head and multi-view wrapper (CPU, tiny sizes)."""
import copy
import math
import warnings

import pytest
import timm
import torch
from torch import nn

from models import ARCHS, DINOHead, MultiCropWrapper, VisionTransformer, build_backbone
from models.timesformer import vit_base_patch16_224
from utils.defaults import get_cfg

TINY = dict(embed_dim=48, depth=2, num_heads=3, drop_path_rate=0.0)


def tiny(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(**{**TINY, **kw}).eval()


def randomise_temporal(model: VisionTransformer) -> None:
    """Give the zero-initialised temporal parts non-zero values so that they matter."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.time_embed.normal_(0, 0.5, generator=g)
        for blk in model.blocks:
            blk.temporal_fc.weight.normal_(0, 0.1, generator=g)
            blk.temporal_fc.bias.normal_(0, 0.1, generator=g)


@pytest.mark.parametrize("shape", [(2, 3, 8, 224, 224), (2, 3, 2, 96, 96), (1, 3, 16, 64, 64),
                                   (1, 3, 4, 64, 96), (1, 3, 64, 32, 32)])
@pytest.mark.parametrize("attention_type", ["divided_space_time", "space_only", "joint_space_time"])
def test_output_shapes(shape, attention_type):
    model = tiny(attention_type=attention_type)
    b, _, t, h, w = shape
    x = torch.randn(shape)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert model(x).shape == (b, 48)
    n = (h // 16) * (w // 16) * (1 if attention_type == "space_only" else t)
    assert tokens.shape == (b, 1 + n, 48)
    assert torch.isfinite(tokens).all()


def test_classifier_head_and_bad_inputs():
    model = tiny(num_classes=5)
    assert "head.weight" in model.state_dict()
    assert model(torch.randn(2, 3, 2, 32, 32)).shape == (2, 5)
    assert not any(k.startswith("head") for k in tiny().state_dict())
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 3, 2, 40, 32))
    with pytest.raises(ValueError, match="attention_type"):
        tiny(attention_type="divided")


def test_pos_embed_interpolation_is_nearest():
    model = tiny()
    assert model.interpolate_pos_embed(197, 14, 14) is model.pos_embed
    grid = model.pos_embed[0, 1:].reshape(14, 14, 48)
    idx6 = [0, 2, 4, 7, 9, 11]  # floor(i * 14 / 6)
    out = model.interpolate_pos_embed(1 + 36, 6, 6)[0]
    assert torch.equal(out[0], model.pos_embed[0, 0])
    assert torch.equal(out[1:].reshape(6, 6, 48), grid[idx6][:, idx6])
    out = model.interpolate_pos_embed(1 + 4 * 6, 4, 6)[0]  # non-square: rows 14->4, cols 14->6
    assert torch.equal(out[1:].reshape(4, 6, 48), grid[[0, 3, 7, 10]][:, idx6])
    assert torch.equal(model.interpolate_pos_embed(1 + 49, 7, 7)[0, 1:].reshape(7, 7, 48),
                       grid[0::2][:, 0::2])


def test_time_embed_interpolation_is_nearest():
    model = tiny()
    randomise_temporal(model)
    te = model.time_embed[0]
    assert model.interpolate_time_embed(8) is model.time_embed
    assert torch.equal(model.interpolate_time_embed(2)[0], te[[0, 4]])
    assert torch.equal(model.interpolate_time_embed(4)[0], te[[0, 2, 4, 6]])
    assert torch.equal(model.interpolate_time_embed(16)[0], te.repeat_interleave(2, dim=0))
    assert torch.equal(model.interpolate_time_embed(64)[0], te.repeat_interleave(8, dim=0))


def reference_block(blk, z: torch.Tensor, b: int, t: int) -> torch.Tensor:
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


def reference_tokens(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """The embedded clip (B, 1 + hw*T, D) with plain reshapes/permutes and explicit nearest indices, following
    the original step by step: patches + pos_embed per frame, + time_embed per patch, one CLS per clip."""
    b, _, t, hh, ww = x.shape
    h, w, d = hh // 16, ww // 16, model.embed_dim
    frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, 3, hh, ww)
    p = model.patch_embed.proj(frames).flatten(2).transpose(1, 2)  # (bt, hw, d)
    rows = [math.floor(i * 14 / h) for i in range(h)]
    cols = [math.floor(j * 14 / w) for j in range(w)]
    grid = model.pos_embed[0, 1:].reshape(14, 14, d)[rows][:, cols].reshape(h * w, d)
    p = p + grid
    cls = model.cls_token[0] + model.pos_embed[0, :1]  # (1, d)
    te = model.time_embed[0, [math.floor(i * 8 / t) for i in range(t)]]  # (t, d)
    p = p.reshape(b, t, h * w, d) + te[None, :, None]
    tokens = p.permute(0, 2, 1, 3).reshape(b, h * w * t, d)  # index n * t + frame
    return torch.cat([cls.expand(b, 1, d), tokens], dim=1)


def reference_forward(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """The divided space-time forward (eval mode: no dropout / drop path)."""
    b, t = x.shape[0], x.shape[2]
    z = reference_tokens(model, x)
    for blk in model.blocks:
        z = reference_block(blk, z, b, t)
    return model.norm(z)


def reference_joint_block(blk, z: torch.Tensor, heads: int) -> torch.Tensor:
    """A plain pre-norm ViT block over all 1 + hw*T tokens at once (joint space-time attention), with the
    attention written out: rows [q; k; v] of qkv, heads of D / heads, softmax(q k^T / sqrt(D / heads)) v."""
    b, n, d = z.shape
    qkv = blk.norm1(z) @ blk.attn.qkv.weight.T + blk.attn.qkv.bias
    q, k, v = (qkv[..., i * d:(i + 1) * d].reshape(b, n, heads, d // heads).transpose(1, 2) for i in range(3))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
    mixed = (weights @ v).transpose(1, 2).reshape(b, n, d)
    z = z + mixed @ blk.attn.proj.weight.T + blk.attn.proj.bias
    return z + blk.mlp(blk.norm2(z))


@pytest.mark.parametrize("shape", [(2, 3, 8, 32, 48), (1, 3, 4, 32, 32), (1, 3, 16, 32, 32)])
def test_joint_forward_matches_reference(shape):
    model = tiny(attention_type="joint_space_time")
    with torch.no_grad():
        model.time_embed.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))  # zero at init
    x = torch.randn(shape)
    with torch.no_grad():
        z = reference_tokens(model, x)
        for blk in model.blocks:
            z = reference_joint_block(blk, z, heads=TINY["num_heads"])
        torch.testing.assert_close(model.forward_features(x), model.norm(z), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 3, 8, 32, 48), (1, 3, 4, 96, 96), (1, 3, 16, 32, 32)])
def test_divided_forward_matches_reference(shape, device):
    model = tiny()
    randomise_temporal(model)
    model.to(device)
    x = torch.randn(shape).to(device)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), reference_forward(model, x), atol=1e-5)


@pytest.mark.parametrize("t,side", [(8, 32), (2, 48), (1, 32)])
def test_divided_block_forward_and_backward_match_reference(t, side):
    model = tiny().train()
    with torch.no_grad():
        for blk in model.blocks:
            blk.temporal_fc.weight.normal_(0, 0.1)
    blk = model.blocks[0]
    b = 2
    z = torch.randn(b, 1 + (side // 16) ** 2 * t, 48, requires_grad=True)
    out = blk(z, b, t)
    ref = reference_block(blk, z, b, t)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(out)
    params = [z, *blk.parameters()]
    grads = torch.autograd.grad((out * w).sum(), params)
    ref_grads = torch.autograd.grad((ref * w).sum(), params)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_sdpa_equals_explicit_attention(device):
    model = tiny()
    randomise_temporal(model)
    model.to(device)
    x = torch.randn(2, 3, 4, 64, 64).to(device)
    with torch.no_grad():
        fused = model.forward_features(x)
        model.set_fused_attention(False)
        assert not any(m.fused for m in model.modules() if hasattr(m, "fused"))
        explicit = model.forward_features(x)
    assert (fused - explicit).abs().max() < 1e-5


def test_fused_attention_in_batch_chunks_equals_one_call(device, monkeypatch):
    # The fused call takes at most sdpa_max_batch sequences (CUDA's grid limit); chunked output and gradients
    # must equal one call's. 7 sequences in chunks of 3: 3 + 3 + 1.
    from models.timesformer import Attention
    torch.manual_seed(0)
    attn = Attention(32, num_heads=2).to(device)
    x = torch.randn(7, 5, 32, device=device, requires_grad=True)
    whole = attn(x)
    (grad_whole,) = torch.autograd.grad(whole.square().sum(), x)
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, *a, **kw: calls.append(q.shape[0]) or real(q, *a, **kw))
    monkeypatch.setattr(Attention, "sdpa_max_batch", 3)
    chunked = attn(x)
    (grad_chunked,) = torch.autograd.grad(chunked.square().sum(), x)
    assert calls == [3, 3, 1]
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad_chunked, grad_whole, rtol=0, atol=1e-6)


@pytest.mark.parametrize("attention_type", ["divided_space_time", "space_only"])
def test_static_clip_with_inert_temporal_path_equals_image_vit(attention_type):
    """At init temporal_fc = 0 and time_embed = 0, so on a clip of one repeated frame the TimeSformer
    (with the image ViT's weights) must give exactly the image ViT's tokens."""
    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=16, embed_dim=48, depth=2, num_heads=3, num_classes=0).eval()
    model = tiny(img_size=64, attention_type=attention_type)
    missing = model.load_state_dict(vit.state_dict(), strict=False).missing_keys
    assert all("temporal" in k or k == "time_embed" for k in missing)
    frame = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = vit.forward_features(frame)
        tokens = model.forward_features(frame[:, :, None].expand(-1, -1, 4, -1, -1))
    assert torch.allclose(tokens[:, 0], ref[:, 0], atol=1e-5)
    if attention_type == "divided_space_time":  # patch n of frame t sits at 1 + n * T + t
        assert torch.allclose(tokens[:, 1::4], ref[:, 1:], atol=1e-5)
        assert torch.allclose(tokens[:, 4::4], ref[:, 1:], atol=1e-5)


def test_vit_base_state_dict_matches_original():
    with torch.device("meta"):  # shapes only: skip allocating and initialising 121M parameters
        model = vit_base_patch16_224()
    expected = [("cls_token", (1, 1, 768)), ("pos_embed", (1, 197, 768)), ("time_embed", (1, 8, 768)),
                ("patch_embed.proj.weight", (768, 3, 16, 16)), ("patch_embed.proj.bias", (768,))]
    block = [("norm1.weight", (768,)), ("norm1.bias", (768,)),
             ("attn.qkv.weight", (2304, 768)), ("attn.qkv.bias", (2304,)),
             ("attn.proj.weight", (768, 768)), ("attn.proj.bias", (768,)),
             ("temporal_norm1.weight", (768,)), ("temporal_norm1.bias", (768,)),
             ("temporal_attn.qkv.weight", (2304, 768)), ("temporal_attn.qkv.bias", (2304,)),
             ("temporal_attn.proj.weight", (768, 768)), ("temporal_attn.proj.bias", (768,)),
             ("temporal_fc.weight", (768, 768)), ("temporal_fc.bias", (768,)),
             ("norm2.weight", (768,)), ("norm2.bias", (768,)),
             ("mlp.fc1.weight", (3072, 768)), ("mlp.fc1.bias", (3072,)),
             ("mlp.fc2.weight", (768, 3072)), ("mlp.fc2.bias", (768,))]
    for i in range(12):
        expected += [(f"blocks.{i}.{k}", s) for k, s in block]
    expected += [("norm.weight", (768,)), ("norm.bias", (768,))]
    sd = model.state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == expected
    assert len(sd) == 247 and not list(model.buffers())
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vit_base TimeSformer parameters (no head): {n_params:,}")
    assert n_params == 121_258_752
    assert [m.drop_prob if hasattr(m, "drop_prob") else 0.0 for m in
            (blk.drop_path for blk in model.blocks)] == pytest.approx(torch.linspace(0, 0.1, 12).tolist())


@pytest.mark.parametrize("attention_type", ["space_only", "joint_space_time"])
def test_other_attention_types_have_no_temporal_keys(attention_type):
    sd = tiny(attention_type=attention_type).state_dict()
    assert not any("temporal" in k for k in sd)
    assert ("time_embed" in sd) == (attention_type == "joint_space_time")


def test_init():
    model = tiny(depth=3)
    assert torch.count_nonzero(model.time_embed) == 0
    for blk in model.blocks:  # all blocks, including block 0
        assert torch.count_nonzero(blk.temporal_fc.weight) == 0
        assert torch.count_nonzero(blk.temporal_fc.bias) == 0
        assert torch.count_nonzero(blk.attn.qkv.bias) == 0
        assert torch.equal(blk.norm1.weight, torch.ones(48)) and blk.norm1.eps == 1e-6
        assert 0.015 < blk.mlp.fc1.weight.std() < 0.025  # trunc-normal std .02 (cut-offs +-2, absolute)
    assert model.pos_embed.abs().max() <= 2.0 and 0.015 < model.pos_embed.std() < 0.025
    assert 0.012 < model.cls_token.std() < 0.028  # trunc-normal .02 too (48 values)


def test_patch_embed_and_dino_head_init():
    # The patch-embed conv keeps PyTorch's default init, uniform within 1/sqrt(fan_in) (weight and bias); a
    # trunc-normal(.02) would put many of its 36864 weights beyond 1/sqrt(768) = 0.036.
    proj = tiny().patch_embed.proj
    bound = 1 / math.sqrt(3 * 16 * 16)
    assert 0.99 * bound < proj.weight.abs().max() <= bound
    assert torch.count_nonzero(proj.bias) == 48 and proj.bias.abs().max() <= bound
    # DINO head: MLP Linears trunc-normal(.02) with zero bias; the last layer's direction v keeps nn.Linear's
    # uniform init (bound 1/sqrt(bottleneck)), its gain is 1.
    torch.manual_seed(0)
    head = DINOHead(48, 4000, hidden_dim=512, bottleneck_dim=16)
    for layer in (head.mlp[0], head.mlp[2], head.mlp[4]):
        assert 0.018 < layer.weight.std() < 0.022 and torch.count_nonzero(layer.bias) == 0
    v = head.last_layer.weight_v
    assert 0.99 * 0.25 < v.abs().max() <= 0.25 and v.std().item() == pytest.approx(0.25 / math.sqrt(3), rel=0.03)
    assert torch.equal(head.last_layer.weight_g, torch.ones(4000, 1))


def test_dino_head_runs_in_fp32_under_bf16_autocast():
    """The head's similarities reach the loss divided by 0.04: under bf16 autocast it still computes in fp32, so
    its output on the backbone's bf16 features is the fp32 head's on the same values (bf16 matmuls in the head
    were ~5e-3 off), and its gradients flow back in fp32."""
    torch.manual_seed(0)
    head = DINOHead(64, 4096, hidden_dim=128, bottleneck_dim=32)
    features = torch.randn(16, 64).bfloat16().requires_grad_()
    reference = head(features.detach().float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(features)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)
    out.sum().backward()
    assert head.last_layer.weight_v.grad.dtype == torch.float32 and features.grad is not None


def test_intermediate_layers_and_grad_checkpointing():
    model = tiny()
    randomise_temporal(model)
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        last = model.get_intermediate_layers(x, n=1)
        two = model.get_intermediate_layers(x, n=2)
        assert len(last) == 1 and torch.allclose(last[0], model.forward_features(x))
        assert len(two) == 2 and torch.allclose(two[1], last[0])
    model.train()
    out = model(x).sum()
    out.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out_ckpt = model(x).sum()
    out_ckpt.backward()
    assert torch.allclose(out, out_ckpt)
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)


def test_build_backbone_from_cfg():
    cfg = get_cfg()
    cfg.DATA.TRAIN_CROP_SIZE = 96
    cfg.DATA.NUM_FRAMES = 4
    cfg.MODEL.DROP_PATH_RATE = 0.2
    model = build_backbone("vit_tiny", cfg, depth=2)
    assert model.pos_embed.shape == (1, 37, 192) and model.time_embed.shape == (1, 4, 192)
    assert model.blocks[-1].drop_path.drop_prob == pytest.approx(0.2)
    assert set(ARCHS) == {"timesformer", "vit_base", "vit_small", "vit_tiny"}
    with pytest.raises(ValueError, match="unknown arch"):
        build_backbone("resnet", cfg)


def test_dino_head_keys_shapes_and_counts():
    head = DINOHead(768, 65536)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {
        "mlp.0.weight": (2048, 768), "mlp.0.bias": (2048,), "mlp.2.weight": (2048, 2048),
        "mlp.2.bias": (2048,), "mlp.4.weight": (256, 2048), "mlp.4.bias": (256,),
        "last_layer.weight_g": (65536, 1), "last_layer.weight_v": (65536, 256)}
    assert sum(p.numel() for p in head.parameters()) == 23_138_560
    assert sum(p.numel() for p in head.parameters() if p.requires_grad) == 23_073_024
    assert torch.equal(head.last_layer.weight_g, torch.ones(65536, 1))
    assert DINOHead(768, 16, norm_last_layer=False).last_layer.weight_g.requires_grad
    bn = DINOHead(32, 16, use_bn=True, hidden_dim=24, bottleneck_dim=8)
    assert [type(m).__name__ for m in bn.mlp] == ["Linear", "BatchNorm1d", "GELU"] * 2 + ["Linear"]


def test_dino_head_matches_legacy_weight_norm():
    torch.manual_seed(0)
    head = DINOHead(32, 16, hidden_dim=24, bottleneck_dim=8)
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        legacy = nn.utils.weight_norm(nn.Linear(8, 16, bias=False))
    legacy.load_state_dict(head.last_layer.state_dict())
    x = torch.randn(5, 32)
    z = nn.functional.normalize(head.mlp(x), dim=-1)
    assert torch.allclose(head(x), legacy(z), atol=1e-6)
    # norm_last_layer with g = 1: every output is a cosine similarity
    unit = DINOHead(32, 16, hidden_dim=24, bottleneck_dim=8)
    assert unit(x).abs().max() <= 1 + 1e-6
    copy.deepcopy(head)  # the legacy helper cannot be deep-copied after a forward


def test_weight_norm_linear_scales_outputs_like_normalised_weight():
    torch.manual_seed(0)
    head = DINOHead(16, 40, norm_last_layer=False, hidden_dim=32, bottleneck_dim=8)
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)
    layer = head.last_layer
    x = torch.randn(5, 8)
    out = layer(x)
    ref = nn.functional.linear(x, layer.weight)
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out.square().sum(), (layer.weight_v, layer.weight_g))
    ref_grads = torch.autograd.grad(ref.square().sum(), (layer.weight_v, layer.weight_g))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_multicrop_wrapper_groups_and_matches_per_view_calls():
    backbone = tiny()
    randomise_temporal(backbone)
    head = DINOHead(48, 10, hidden_dim=16, bottleneck_dim=8).eval()
    wrapper = MultiCropWrapper(backbone, head)
    shapes = [(4, 64, 64), (8, 64, 64), (2, 32, 32), (2, 32, 32), (4, 32, 32), (4, 32, 32), (2, 32, 32)]
    views = [torch.randn(2, 3, *s) for s in shapes]
    calls = []
    hook = backbone.register_forward_hook(lambda m, inp, out: calls.append(tuple(inp[0].shape)))
    with torch.no_grad():
        out = wrapper(views)
    hook.remove()
    assert calls == [(2, 3, 4, 64, 64), (2, 3, 8, 64, 64), (4, 3, 2, 32, 32), (4, 3, 4, 32, 32),
                     (2, 3, 2, 32, 32)]
    assert out.shape == (len(views) * 2, 10)
    with torch.no_grad():
        expected = torch.cat([head(backbone(v)) for v in views])
    assert torch.allclose(out, expected, atol=1e-5)
    keys = wrapper.state_dict().keys()
    assert all(k.startswith(("backbone.", "head.")) for k in keys) and "head.last_layer.weight_g" in keys


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_on_cuda_beyond_65535_sequences(dtype):
    # Temporal attention runs views x clips x h*w sequences of T tokens: ViT-B at 224 px gives 196 per clip,
    # so an extraction batch of 335+ clips passes 2^16 sequences. SDPA's flash / memory-efficient kernels put
    # the batch on a CUDA grid axis limited to 65535 (pytorch/pytorch#142228, #146704: "invalid configuration
    # argument"); Attention calls it in chunks of at most Attention.sdpa_max_batch, which this checks on CUDA.
    from models.timesformer import Attention
    torch.manual_seed(0)
    attn = Attention(64, num_heads=1).cuda()
    x = torch.randn(70_000, 8, 64, device="cuda", requires_grad=True)
    outputs, grads = [], []
    for fused in (True, False):
        attn.fused = fused
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            out = attn(x)
        (grad,) = torch.autograd.grad(out.float().square().mean(), x)
        outputs.append(out.float())
        grads.append(grad)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(outputs[0], outputs[1], rtol=tol, atol=tol)
    torch.testing.assert_close(grads[0], grads[1], rtol=tol, atol=tol * grads[1].abs().max().item())
