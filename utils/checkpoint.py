"""Reading and writing checkpoints: safe loading, backbone weights from any SVT/TimeSformer layout,
atomic saves, and DINO-style resume."""
from __future__ import annotations

import argparse
import os
import pickle
import tempfile
import zipfile
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

# Prefixes stripped from state-dict keys: DDP, MultiCropWrapper, TimeSformer's model wrapper.
_PREFIXES = ("module.", "backbone.", "model.")


def safe_torch_load(path: str | os.PathLike) -> Any:
    """`torch.load` on CPU with `weights_only=True`, allowing the pickled `argparse.Namespace` that
    training checkpoints carry under `args`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(2)
    if not zipfile.is_zipfile(path) and head[:1] != b"\x80":  # neither torch.save format
        raise RuntimeError(f"{path} is not a complete file written by torch.save (it starts with {head!r}): "
                           "re-download or re-copy it, e.g. not an HTML error page or a partial download.")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise RuntimeError(
            f"could not load {path} with weights_only=True: {e}\nOnly tensors, containers and "
            "argparse.Namespace are accepted; re-save the file from a trusted source without other "
            "Python objects.") from e
    except Exception as e:  # a truncated or foreign file
        raise RuntimeError(f"could not read checkpoint {path} ({type(e).__name__}: {e}); it is not a complete "
                           "file written by torch.save: re-download or re-copy it (compare its size).") from e


def _strip_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in state.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def _select_state_dict(ckpt: Any, checkpoint_key: str | None, path: str) -> tuple[dict[str, Any], str]:
    """The backbone state dict inside a checkpoint and a word on where it was found."""
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{path} holds a {type(ckpt).__name__}, not a state dict or checkpoint dict")
    where = "top level"
    if checkpoint_key and checkpoint_key in ckpt:
        ckpt, where = ckpt[checkpoint_key], f"'{checkpoint_key}'"
    else:
        for key in ("model_state", "state_dict", "model"):
            if key in ckpt and isinstance(ckpt[key], Mapping):
                ckpt, where = ckpt[key], f"'{key}'"
                break
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{path}: entry {where} is a {type(ckpt).__name__}, not a state dict; pick another "
                         f"entry with the checkpoint key (--checkpoint_key student / teacher).")
    state = {k: v for k, v in ckpt.items() if isinstance(v, torch.Tensor)}
    # Keep the backbone of a MultiCropWrapper state (drops `head.*`, the DINO head).
    if any(k.removeprefix("module.").startswith("backbone.") for k in state):
        state = {k: v for k, v in state.items() if k.removeprefix("module.").startswith("backbone.")}
    return _strip_prefixes(state), where


def _kind_hint(state: Mapping[str, Any]) -> str:
    """A sentence naming what a non-matching state dict looks like, or ''."""
    keys = list(state)
    if keys and all(k.startswith("linear.") for k in keys):
        return (" This is a linear classifier saved by eval_linear.py (checkpoint.pth.tar), not a backbone;"
                " pass it as --lc_pretrained_weights of eval_linear.py.")
    if not keys:
        return " The selected entry holds no tensors."
    return ""


def resize_time_embed(time_embed: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(1, T, D) -> (1, num_frames, D), nearest along time (the resize the model does on the fly)."""
    emb = F.interpolate(rearrange(time_embed, "1 t d -> 1 d t"), size=num_frames, mode="nearest")
    return rearrange(emb, "1 d t -> 1 t d")


def resize_pos_embed(pos_embed: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(1, 1 + g*g, D) -> (1, num_tokens, D) for square grids: CLS kept, patch grid resized (nearest)."""
    old, new = round((pos_embed.shape[1] - 1) ** 0.5), round((num_tokens - 1) ** 0.5)
    if old * old != pos_embed.shape[1] - 1 or new * new != num_tokens - 1:
        raise ValueError(f"pos_embed with {pos_embed.shape[1]} tokens cannot be resized to {num_tokens}: "
                         "only square patch grids are supported")
    grid = rearrange(pos_embed[:, 1:], "1 (h w) d -> 1 d h w", h=old, w=old)
    grid = F.interpolate(grid, size=(new, new), mode="nearest")
    return torch.cat((pos_embed[:, :1], rearrange(grid, "1 d h w -> 1 (h w) d")), dim=1)


@dataclass
class LoadSummary:
    """What `load_pretrained_weights` did."""

    path: str
    source: str
    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.matched)} tensors from {self.path} ({self.source}); "
                 f"{len(self.missing)} missing, {len(self.unexpected)} unexpected"]
        if self.missing:
            lines.append(f"  missing: {self.missing}")
        if self.unexpected:
            lines.append(f"  unexpected: {self.unexpected}")
        if self.resized:
            lines.append(f"  resized (nearest): {self.resized}")
        return "\n".join(lines)


def load_pretrained_weights(model: nn.Module, path: str | os.PathLike,
                            checkpoint_key: str | None = "teacher") -> LoadSummary:
    """Load backbone weights into `model` (a TimeSformer VisionTransformer) from any of:

    - the released `kinetics400_vitb_ssl.pth` (flat teacher state: `backbone.*` + `head.*`);
    - a training checkpoint (`student` / `teacher` entries, chosen by `checkpoint_key`);
    - a TimeSformer checkpoint (`model_state`, keys `model.*`), or a bare backbone state dict.

    Prefixes `module.`, `backbone.` and `model.` are stripped and the DINO head is ignored. A
    `time_embed` of another length (a model built for DATA.NUM_FRAMES != 8) and a `pos_embed` of
    another square grid are resized nearest, giving exactly what the stored-size model computes on the
    fly for that input. Raises when no key matches or when any other shape differs.
    """
    path = os.fspath(path)
    state, where = _select_state_dict(safe_torch_load(path), checkpoint_key, path)
    target = model.state_dict()
    summary = LoadSummary(path=path, source=where)
    summary.unexpected = [k for k in state if k not in target]
    summary.missing = [k for k in target if k not in state]
    summary.matched = [k for k in state if k in target]
    if not summary.matched:
        raise ValueError(
            f"no key of {path} ({where}) matches the model: file keys start with "
            f"{sorted(state)[:5]}, model keys with {list(target)[:5]}.{_kind_hint(state)} Pass an SVT "
            f"checkpoint (train_ssl.py checkpoint.pth, the released kinetics400_vitb_ssl.pth) or a "
            f"TimeSformer one (checkpoint_key={checkpoint_key!r}).")
    to_load = {}
    for k in summary.matched:
        v, want = state[k], target[k].shape
        if v.shape != want:
            if k == "time_embed" and v.shape[0::2] == want[0::2]:
                v = resize_time_embed(v, want[1])
            elif k == "pos_embed" and v.shape[0::2] == want[0::2]:
                v = resize_pos_embed(v, want[1])
            else:
                raise ValueError(f"{path}: shape of '{k}' is {tuple(v.shape)} in the file but "
                                 f"{tuple(want)} in the model; build the model with the checkpoint's size")
            summary.resized.append(f"{k} {tuple(state[k].shape)}->{tuple(want)}")
        to_load[k] = v
    model.load_state_dict(to_load, strict=False)
    print(summary)
    return summary


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` to a temporary file in the same folder, fsync, then rename over `path`, so a
    crash never leaves a truncated checkpoint behind."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def restart_from_checkpoint(ckp_path: str | os.PathLike, run_variables: dict | None = None,
                            **objects: Any) -> None:
    """Resume: each keyword object (module, optimizer, GradScaler, DINOLoss, ...) loads the entry of
    the same name; `run_variables` entries (e.g. `epoch`) are filled from the checkpoint. A missing
    file does nothing (a fresh run)."""
    ckp_path = os.fspath(ckp_path)
    if not os.path.isfile(ckp_path):
        return
    print(f"Resuming from {ckp_path}")
    ckpt = safe_torch_load(ckp_path)
    for key, obj in objects.items():
        if obj is None:
            continue
        if key not in ckpt or ckpt[key] is None:
            print(f"  {key}: not in the checkpoint, left as built")
            continue
        if isinstance(obj, nn.Module):
            result = obj.load_state_dict(ckpt[key], strict=False)
            print(f"  {key}: restored; missing keys {result.missing_keys}, unexpected keys "
                  f"{result.unexpected_keys}")
        else:
            obj.load_state_dict(ckpt[key])
            print(f"  {key}: restored")
    if run_variables is not None:
        for name in run_variables:
            if name in ckpt:
                run_variables[name] = ckpt[name]
