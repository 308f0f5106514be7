"""TimeSformer video ViT (Bertasius et al., ICML'21) as used by SVT.

Divided space-time attention (SVT's backbone), plus the `space_only` and `joint_space_time` variants.
The state-dict keys are those of the original implementation, so its checkpoints and SVT's load as they
are. Input clips are (B, 3, T, H, W) with H and W multiples of the patch size; `pos_embed` and
`time_embed` are resized on the fly (nearest) when the input grid or frame count differs from theirs.

Token layout after the embeddings: one CLS per clip, then the patch tokens ordered spatial-major,
time-minor (token 1 + n*T + t is patch n of frame t).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from timm.layers import DropPath, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

ATTENTION_TYPES = ("divided_space_time", "space_only", "joint_space_time")


class Mlp(nn.Module):
    """Linear -> GELU -> dropout -> Linear -> dropout."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head self-attention with packed qkv (rows [q; k; v], each heads x head_dim).

    `fused` selects `F.scaled_dot_product_attention` (default) or the explicit
    softmax(q k^T * scale) v; both compute the same function. The fused call takes at most
    `sdpa_max_batch` sequences at once: CUDA's flash / memory-efficient kernels put the batch on a grid axis
    limited to 65535 (pytorch#142228), which temporal attention passes at 335+ clips of 196 patches.
    """

    fused: bool = True
    sdpa_max_batch: int = 65535

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        if self.fused:
            drop = self.attn_drop.p if self.training else 0.0
            outs = [F.scaled_dot_product_attention(q[i:i + self.sdpa_max_batch], k[i:i + self.sdpa_max_batch],
                                                   v[i:i + self.sdpa_max_batch], dropout_p=drop, scale=self.scale)
                    for i in range(0, q.shape[0], self.sdpa_max_batch)]
            x = outs[0] if len(outs) == 1 else torch.cat(outs)
        else:
            attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
            x = self.attn_drop(attn) @ v
        return self.proj_drop(self.proj(rearrange(x, "b h n d -> b n (h d)")))


class Block(nn.Module):
    """Transformer block; with divided attention: temporal attention, then spatial attention, then MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 attention_type: str = "divided_space_time") -> None:
        super().__init__()
        self.attention_type = attention_type
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        if attention_type == "divided_space_time":
            self.temporal_norm1 = nn.LayerNorm(dim, eps=1e-6)
            self.temporal_attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
            self.temporal_fc = nn.Linear(dim, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
        if self.attention_type != "divided_space_time":
            x = x + self.drop_path(self.attn(self.norm1(x)))
            return x + self.drop_path(self.mlp(self.norm2(x)))

        b, t = batch, frames
        n = x.shape[1] - 1  # h * w * t patch tokens
        # split (not two slices): its backward is one concatenation instead of two zero-filled scatters
        cls, patches = x.split((1, n), dim=1)

        # Temporal attention over the T frames of each patch position; CLS takes no part.
        xt = rearrange(patches, "b (hw t) d -> (b hw) t d", t=t)
        res_t = self.drop_path(self.temporal_attn(self.temporal_norm1(xt)))
        res_t = self.temporal_fc(rearrange(res_t, "(b hw) t d -> b (hw t) d", b=b))
        xt = patches + res_t

        # Spatial attention within each frame, with the clip's CLS repeated per frame: the frame-major
        # copy and the CLS concatenation are one copy.
        xs = rearrange(xt, "b (hw t) d -> b t hw d", t=t)
        xs = torch.cat((repeat(cls, "b 1 d -> b t 1 d", t=t), xs), dim=2).flatten(0, 1)
        res_s = self.drop_path(self.attn(self.norm1(xs)))
        cls_s, res_s = res_s.split((1, n // t), dim=1)
        cls_s = rearrange(cls_s, "(b t) 1 d -> b t d", b=b).mean(dim=1, keepdim=True)
        # the add reads the frame-major residual through a strided view (no separate permute copy)
        xt = xt.unflatten(1, (n // t, t)) + rearrange(res_s, "(b t) hw d -> b hw t d", b=b)
        x = torch.cat((cls + cls_s, xt.flatten(1, 2)), dim=1)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Per-frame patch embedding: (B, C, T, H, W) -> (B*T, h*w, D), plus T and w."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        if x.ndim != 5:
            raise ValueError(f"expected a clip batch (B, C, T, H, W), got shape {tuple(x.shape)}")
        _, _, t, height, width = x.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"frame size {height}x{width} is not a multiple of the patch size {self.patch_size}")
        x = self.proj(rearrange(x, "b c t h w -> (b t) c h w"))
        w = x.shape[-1]
        return rearrange(x, "bt d h w -> bt (h w) d"), t, w


class VisionTransformer(nn.Module):
    """TimeSformer backbone. `forward` returns the CLS feature (B, D), or logits when num_classes > 0."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 0,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, num_frames: int = 8,
                 attention_type: str = "divided_space_time") -> None:
        super().__init__()
        if attention_type not in ATTENTION_TYPES:
            raise ValueError(f"attention_type {attention_type!r} is not one of {ATTENTION_TYPES}")
        self.attention_type = attention_type
        self.embed_dim = self.num_features = embed_dim
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        if attention_type != "space_only":
            self.time_embed = nn.Parameter(torch.zeros(1, num_frames, embed_dim))
            self.time_drop = nn.Dropout(drop_rate)

        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[i], attention_type)
            for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)
        # The original means to skip block 0 but its counter also counts the ModuleList itself, so every
        # block's temporal_fc starts at zero and the temporal branch is inert at init.
        if attention_type == "divided_space_time":
            for blk in self.blocks:
                nn.init.zeros_(blk.temporal_fc.weight)
                nn.init.zeros_(blk.temporal_fc.bias)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head by a new linear classifier (trunc-normal 0.02 weight, zero bias, TimeSformer's
        init) for `num_classes` classes; 0 removes it (forward returns the CLS feature)."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head.apply(_init_weights)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    def set_fused_attention(self, enable: bool = True) -> None:
        """SDPA (True) or the explicit softmax(q k^T * scale) v (False) in every attention layer."""
        for m in self.modules():
            if isinstance(m, Attention):
                m.fused = enable

    def take_embeddings(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        """Replace `pos_embed` / `time_embed` by parameters of the size of those in `state` where only their token or
        frame count differs (a square patch grid: checkpoint_filter_fn checks), so that the model is the one of the
        stored grid and frame count, which the forward pass resizes once to each input. The values are left to
        load_state_dict. Returns the replaced ones as "key (model shape)->(stored shape)"."""
        taken = []
        for key in ("pos_embed", "time_embed"):
            own, stored = getattr(self, key, None), state.get(key)
            if own is None or stored is None or stored.shape == own.shape or stored.shape[0::2] != own.shape[0::2]:
                continue
            if key == "pos_embed":
                side = math.isqrt(stored.shape[1] - 1)
                self.patch_embed.grid_size, self.patch_embed.num_patches = (side, side), side * side
            setattr(self, key, nn.Parameter(own.new_zeros(stored.shape), requires_grad=own.requires_grad))
            taken.append(f"{key} {tuple(own.shape)}->{tuple(stored.shape)}")
        return taken

    def interpolate_pos_embed(self, num_tokens: int, h: int, w: int) -> torch.Tensor:
        """`pos_embed` for 1 + h*w tokens: stored as is when the count matches, else the patch grid
        resized (nearest) to (h, w) with the CLS entry kept. Keyed on the token count, as the original."""
        if num_tokens == self.pos_embed.shape[1]:
            return self.pos_embed
        return resample_pos_embed(self.pos_embed, self.patch_embed.grid_size, (h, w))

    def interpolate_time_embed(self, t: int) -> torch.Tensor:
        """`time_embed` for t frames: as is, or resized along time (nearest)."""
        if t == self.time_embed.shape[1]:
            return self.time_embed
        return resample_time_embed(self.time_embed, t)

    def prepare_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Embed a clip batch: returns tokens (B, 1 + hw*T, D) (space_only: (B*T, 1 + hw, D)), B and T."""
        b = x.shape[0]
        x, t, w = self.patch_embed(x)
        h = x.shape[1] // w
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.pos_drop(x + self.interpolate_pos_embed(x.shape[1], h, w))
        if self.attention_type == "space_only":
            return x, b, t
        cls = x[:b, :1]  # every row carries the same CLS value
        x = rearrange(x[:, 1:], "(b t) n d -> (b n) t d", b=b, t=t)
        x = self.time_drop(x + self.interpolate_time_embed(t))
        x = rearrange(x, "(b n) t d -> b (n t) d", b=b, t=t)
        return torch.cat((cls, x), dim=1), b, t

    def _run_block(self, blk: nn.Module, x: torch.Tensor, b: int, t: int) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(blk, x, b, t, use_reentrant=False)
        return blk(x, b, t)

    def _finish(self, x: torch.Tensor, b: int, t: int) -> torch.Tensor:
        if self.attention_type == "space_only":  # average the per-frame tokens over time
            x = rearrange(x, "(b t) n d -> b t n d", b=b, t=t).mean(dim=1)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm: (B, 1 + N, D), CLS first."""
        x, b, t = self.prepare_tokens(x)
        for blk in self.blocks:
            x = self._run_block(blk, x, b, t)
        return self._finish(x, b, t)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """CLS feature (B, D), or class logits when the model has a head."""
        return self.head(tokens[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """Tokens (B, 1 + N, D) output by each of the last n blocks, each through the final norm."""
        x, b, t = self.prepare_tokens(x)
        outputs = []
        for i, blk in enumerate(self.blocks):
            x = self._run_block(blk, x, b, t)
            if i >= len(self.blocks) - n:
                outputs.append(self._finish(x, b, t))
        return outputs


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def resample_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """(1, 1 + gh*gw, D) -> (1, 1 + h*w, D): the CLS entry kept, the patch grid resized (nearest)."""
    (gh, gw), (h, w) = grid, new_grid
    patches = rearrange(pos_embed[:, 1:], "1 (gh gw) d -> 1 d gh gw", gh=gh, gw=gw)
    patches = F.interpolate(patches, size=(h, w), mode="nearest")
    return torch.cat((pos_embed[:, :1], rearrange(patches, "1 d h w -> 1 (h w) d")), dim=1)


def resample_time_embed(time_embed: torch.Tensor, t: int) -> torch.Tensor:
    """(1, T, D) -> (1, t, D), nearest along time."""
    emb = F.interpolate(rearrange(time_embed, "1 t d -> 1 d t"), size=t, mode="nearest")
    return rearrange(emb, "1 d t -> 1 t d")


# Key prefixes of foreign state dicts: DDP, MultiCropWrapper (SVT / DINO), TimeSformer's model wrapper.
_PREFIXES = ("module.", "backbone.", "model.")


def _strip_prefixes(key: str) -> str:
    while key.startswith(_PREFIXES):
        key = key[len(next(p for p in _PREFIXES if key.startswith(p))):]
    return key


def backbone_state(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The backbone tensors of a foreign state dict under the keys of this model: of a MultiCropWrapper state (a
    training checkpoint's entry, the released teacher file) only the backbone (the DINO head is dropped), and the
    prefixes `module.`, `backbone.` and `model.` stripped."""
    state = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if any(k.removeprefix("module.").startswith("backbone.") for k in state):
        state = {k: v for k, v in state.items() if k.removeprefix("module.").startswith("backbone.")}
    return {_strip_prefixes(k): v for k, v in state.items()}


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: VisionTransformer,
                         resize_embeddings: bool = True) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map a foreign state dict (SVT, DINO, TimeSformer or an image ViT) onto the keys and shapes of `model`.

    - `backbone_state`: tensors only, the backbone of a MultiCropWrapper state, prefixes stripped.
    - An image ViT (no `time_embed`: DINO or timm ImageNet weights): a flattened patch projection is reshaped
      to the conv, a classifier head that does not fit the model is dropped, and with divided attention each
      block's `attn` / `norm1` also initialise `temporal_attn` / `temporal_norm1` (TimeSformer's init);
      `time_embed` and `temporal_fc` keep the model's zero init.
    - A `pos_embed` of another square grid or a `time_embed` of another length is resized (nearest) as the
      model resizes its own on the fly, so the loaded model computes what the stored-size one would at the
      model's size; with `resize_embeddings` False they are left as stored (only a non-square grid is an error),
      for `VisionTransformer.take_embeddings`.

    Returns the mapped dict and the resized entries as "key (old shape)->(new shape)". Keys the model lacks
    and other shape mismatches are left in for the caller to report.
    """
    state = backbone_state(state_dict)
    target = model.state_dict()
    if "time_embed" not in state:  # an image ViT
        w = state.get("patch_embed.proj.weight")
        if w is not None and w.ndim == 2 and "patch_embed.proj.weight" in target:
            state["patch_embed.proj.weight"] = w.reshape(target["patch_embed.proj.weight"].shape)
        for k in [k for k in state if k.startswith("head.")]:
            if k not in target or target[k].shape != state[k].shape:
                del state[k]
        if model.attention_type == "divided_space_time":
            for k in list(state):
                if k.startswith("blocks.") and ".attn." in k:
                    state.setdefault(k.replace(".attn.", ".temporal_attn."), state[k])
                elif k.startswith("blocks.") and ".norm1." in k:
                    state.setdefault(k.replace(".norm1.", ".temporal_norm1."), state[k])
    resized = []
    for key in ("pos_embed", "time_embed"):
        if key not in state or key not in target:
            continue
        v, want = state[key], target[key].shape
        if v.shape == want or v.shape[0::2] != want[0::2]:
            continue
        side = round((v.shape[1] - 1) ** 0.5)
        if key == "pos_embed" and side * side != v.shape[1] - 1:
            patches = round((v.shape[1] - 2) ** 0.5)  # DeiT-distilled: class + distillation token + grid
            distilled = "dist_token" in state or patches * patches == v.shape[1] - 2
            raise ValueError(f"pos_embed with {v.shape[1]} tokens cannot be resized to {want[1]}: only square "
                             "patch grids are supported" + (
                                 f"; {v.shape[1]} tokens are a class token, a distillation token and "
                                 f"{patches}x{patches} patches: DeiT-distilled weights are not supported, use "
                                 "the non-distilled DeiT or ViT weights" if distilled else ""))
        if not resize_embeddings:
            continue
        state[key] = (resample_time_embed(v, want[1]) if key == "time_embed" else
                      resample_pos_embed(v, (side, side), model.patch_embed.grid_size))
        resized.append(f"{key} {tuple(v.shape)}->{tuple(want)}")
    return state, resized


def vit_tiny_patch16_224(**kwargs) -> VisionTransformer:
    """ViT-Ti/16 sized TimeSformer (192 wide, 12 blocks, 3 heads)."""
    return VisionTransformer(**{"embed_dim": 192, "depth": 12, "num_heads": 3, **kwargs})


def vit_small_patch16_224(**kwargs) -> VisionTransformer:
    """ViT-S/16 sized TimeSformer (384 wide, 12 blocks, 6 heads)."""
    return VisionTransformer(**{"embed_dim": 384, "depth": 12, "num_heads": 6, **kwargs})


def vit_base_patch16_224(**kwargs) -> VisionTransformer:
    """TimeSformer-B/16 (768 wide, 12 blocks, 12 heads): SVT's backbone."""
    return VisionTransformer(**{"embed_dim": 768, "depth": 12, "num_heads": 12, **kwargs})


_FACTORIES: dict[str, Callable[..., VisionTransformer]] = {
    "timesformer": vit_base_patch16_224,
    "vit_base": vit_base_patch16_224,
    "vit_small": vit_small_patch16_224,
    "vit_tiny": vit_tiny_patch16_224,
}
ARCHS = tuple(_FACTORIES)
# The architecture of each width (embed_dim) of the factories, and its heads: what a checkpoint of that width holds.
ARCH_OF_WIDTH = {192: ("vit_tiny", 3), 384: ("vit_small", 6), 768: ("vit_base", 12)}


def build_backbone(arch: str, cfg, **overrides) -> VisionTransformer:
    """Backbone from the config: img size DATA.TRAIN_CROP_SIZE, DATA.NUM_FRAMES frames,
    TIMESFORMER.ATTENTION_TYPE, MODEL.DROP_PATH_RATE, MODEL.DEPTH (when > 0). `overrides` go to the factory
    (e.g. depth=2, num_classes=400). Weights (TIMESFORMER.PRETRAINED_MODEL, checkpoints) are loaded by
    utils/checkpoint.py through `checkpoint_filter_fn`."""
    if arch not in _FACTORIES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
    kwargs = {
        "img_size": cfg.DATA.TRAIN_CROP_SIZE,
        "num_frames": cfg.DATA.NUM_FRAMES,
        "attention_type": cfg.TIMESFORMER.ATTENTION_TYPE,
        "drop_path_rate": cfg.MODEL.DROP_PATH_RATE,
        **({"depth": cfg.MODEL.DEPTH} if cfg.MODEL.DEPTH > 0 else {}),
        **overrides,
    }
    return _FACTORIES[arch](**kwargs)
