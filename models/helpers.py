"""ImageNet initialisation of the TimeSformer from a 2-D ViT checkpoint (TIMESFORMER.PRETRAINED_MODEL)."""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch import nn

from utils.checkpoint import resize_pos_embed, resize_time_embed, safe_torch_load

DINO_VITB16_URL = "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"


def _unwrap(ckpt: Any, path: str) -> dict[str, torch.Tensor]:
    """The flat ViT state dict inside a DINO / timm / TimeSformer-style file."""
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{path} holds a {type(ckpt).__name__}, not a state dict")
    for key in ("state_dict", "model_state", "model", "teacher"):
        if key in ckpt and isinstance(ckpt[key], Mapping):
            ckpt = ckpt[key]
            break
    state = {}
    for k, v in ckpt.items():
        if not isinstance(v, torch.Tensor):
            continue
        for prefix in ("module.", "model.", "backbone."):
            k = k.removeprefix(prefix)
        state[k] = v
    return state


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> dict[str, list[str]]:
    """Initialise a TimeSformer from an image ViT (DINO ViT-B/16 flat dict or timm layout, possibly
    under `model` / `state_dict` with a `module.` prefix).

    Spatial weights are copied 1:1; with divided attention each block's `attn` and `norm1` are also
    copied into `temporal_attn` and `temporal_norm1`. `time_embed` and `temporal_fc` keep their zero
    init, the classifier head is dropped unless the model has one of the same shape, and `pos_embed` is
    resized (nearest, on the 2-D grid) when the image size differs. Returns the missing / unexpected keys.
    """
    path = os.fspath(path)
    if path.startswith(("http://", "https://")):
        raise ValueError(f"TIMESFORMER.PRETRAINED_MODEL must be a local file, got the URL {path}; "
                         "download it once and pass its path (nothing is downloaded at run time)")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"ImageNet init file not found: {path} (TIMESFORMER.PRETRAINED_MODEL). Download the DINO "
            f"ViT-B/16 weights from {DINO_VITB16_URL} and put them at that path, or set "
            "TIMESFORMER.PRETRAINED_MODEL to '' for a random init.")
    state = _unwrap(safe_torch_load(path), path)
    target = model.state_dict()

    w = state.get("patch_embed.proj.weight")
    if w is not None and w.ndim == 2 and "patch_embed.proj.weight" in target:
        state["patch_embed.proj.weight"] = w.reshape(target["patch_embed.proj.weight"].shape)
    for k in [k for k in state if k.startswith("head.")]:
        if k not in target or target[k].shape != state[k].shape:
            del state[k]
    if "pos_embed" in state and state["pos_embed"].shape[1] != target["pos_embed"].shape[1]:
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], target["pos_embed"].shape[1])
    if "time_embed" in state and "time_embed" in target \
            and state["time_embed"].shape[1] != target["time_embed"].shape[1]:
        state["time_embed"] = resize_time_embed(state["time_embed"], target["time_embed"].shape[1])
    if any(".temporal_attn." in k for k in target):
        for k in list(state):
            if k.startswith("blocks.") and ".attn." in k:
                state.setdefault(k.replace(".attn.", ".temporal_attn."), state[k])
            elif k.startswith("blocks.") and ".norm1." in k:
                state.setdefault(k.replace(".norm1.", ".temporal_norm1."), state[k])

    matched = [k for k in state if k in target]
    if not matched:
        raise ValueError(f"no key of {path} matches the TimeSformer (file keys: {sorted(state)[:5]} ...); "
                         "expected a DINO or timm ViT state dict")
    for k in matched:
        if state[k].shape != target[k].shape:
            raise ValueError(f"{path}: '{k}' has shape {tuple(state[k].shape)} in the file but "
                             f"{tuple(target[k].shape)} in the model (wrong ViT size?)")
    msg = model.load_state_dict({k: state[k] for k in matched}, strict=False)
    unexpected = [k for k in state if k not in target]
    print(f"ImageNet init from {path}: {len(matched)} tensors loaded\n"
          f"  missing: {msg.missing_keys}\n  unexpected: {unexpected}")
    return {"missing": list(msg.missing_keys), "unexpected": unexpected}
