"""Where the CLS token looks: the last block's spatial attention of the CLS query, per head and per frame.

A checkpoint and a video in; out come `attention.png` (rows: the frames, then one row per head, then the
mean over heads; columns: the sampled frames) and `attention.gif` (the frames next to each head's map,
animated over time). Works with the released checkpoint (flat teacher `backbone.*` / `head.*` dict), a
train_ssl.py checkpoint (`--checkpoint_key teacher` or `student`), a TimeSformer `model_state` file or a
bare backbone dict; width, depth, patch size and frame count are read from the weights. No weights: a
random backbone (a baseline to compare with).

    python visualize_attention.py --pretrained_weights checkpoints/kinetics400_vitb_ssl.pth \
        --video v_ApplyEyeMakeup_g01_c01.avi --num_frames 8 --image_size 224 --output_dir attention/

With divided space-time attention the CLS token is copied into every frame's spatial attention, so each
frame gets its own map; the head's attention weights over that frame's patches are shown (they sum to
less than 1: the rest goes to the CLS token itself).
"""
import argparse
import re
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from datasets.decoder import BACKENDS, DecodeError, open_video
from datasets.transform import apply_eval_crop, eval_crop_box
from models import VisionTransformer, build_backbone, vit_base_patch16_224
from models.timesformer import ARCH_OF_WIDTH
from utils.checkpoint import load_pretrained_weights, read_backbone_state
from utils.defaults import get_cfg


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Visualize the CLS attention of a video transformer", add_help=False)
    parser.add_argument("--pretrained_weights", default="", type=str,
                        help="Checkpoint (released file, train_ssl.py checkpoint.pth, TimeSformer or bare backbone). "
                             "Empty: a random vit_base backbone, the baseline to compare with.")
    parser.add_argument("--checkpoint_key", default="teacher", type=str,
                        help='Entry of a training checkpoint to show ("teacher" or "student").')
    parser.add_argument("--video", required=True, type=str, help="Video file (any container FFmpeg reads).")
    parser.add_argument("--num_frames", default=8, type=int,
                        help="Frames sampled from the video (8 for the released ViT-B; the model's own count is "
                             "only a default, the time embedding is resized for any count).")
    parser.add_argument("--sampling_rate", default=0, type=int,
                        help="Stride between sampled frames, the clip centred in the video; 0 spreads the "
                             "frames evenly over the whole video.")
    parser.add_argument("--image_size", default=224, type=int,
                        help="Short side the frames are resized to and side of their centre crop, cut and "
                             "normalised as an evaluation's val clip (a multiple of the patch size).")
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="Video decoder (auto: the first of torchcodec, decord, PyAV that loads).")
    parser.add_argument("--output_dir", default=".", type=str, help="attention.png and attention.gif go here.")
    parser.add_argument("--seed", default=0, type=int, help="Seed of the random backbone (no weights).")
    return parser


def sized_like(path: str, checkpoint_key: str = "teacher") -> VisionTransformer:
    """A randomly initialised TimeSformer of the size of the weights in `path`: width (tiny/small/base),
    blocks, patch size, frames and image size are read from them."""
    state, _ = read_backbone_state(path, checkpoint_key)
    if "pos_embed" not in state or "patch_embed.proj.weight" not in state:
        raise ValueError(f"{path}: no backbone weights (pos_embed, patch_embed.proj.weight) found; pass an SVT, "
                         f"TimeSformer or backbone checkpoint (--checkpoint_key teacher/student for training ones).")
    width, patch = state["pos_embed"].shape[-1], state["patch_embed.proj.weight"].shape[-1]
    if width not in ARCH_OF_WIDTH:
        raise ValueError(f"{path}: embedding width {width} is none of vit_tiny/small/base {sorted(ARCH_OF_WIDTH)}")
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    grid = round((state["pos_embed"].shape[1] - 1) ** 0.5)
    kwargs = {"depth": depth, "patch_size": patch, "img_size": grid * patch, "drop_path_rate": 0.0}
    if "time_embed" in state:
        kwargs["num_frames"] = state["time_embed"].shape[1]
    else:
        kwargs["attention_type"] = "space_only"
    return build_backbone(ARCH_OF_WIDTH[width][0], get_cfg(), **kwargs).eval()


def backbone_from_checkpoint(path: str, checkpoint_key: str = "teacher", seed: int = 0) -> VisionTransformer:
    """`sized_like(path)` with the weights of `path` loaded (every backbone weight must be there); a random
    vit_base when `path` is empty. In eval mode."""
    torch.manual_seed(seed)
    if not path:
        print("WARNING: no --pretrained_weights, showing a randomly initialised vit_base backbone.")
        return vit_base_patch16_224(drop_path_rate=0.0).eval()
    model = sized_like(path, checkpoint_key)
    summary = load_pretrained_weights(model, path, checkpoint_key)
    if summary.missing:
        raise ValueError(f"{path}: {len(summary.missing)} backbone weights missing ({summary.missing[:4]})")
    return model


def read_clip(path: str, num_frames: int, size: int, sampling_rate: int = 0,
              backend: str = "auto") -> tuple[np.ndarray, torch.Tensor]:
    """The normalised clip (1, 3, T, size, size) the model takes, cut as an evaluation cuts a val clip whose short
    side and crop are `size` (DATA.TRAIN_JITTER_SCALES[0] and TEST_CROP_SIZE: bilinear resize without antialiasing,
    centre crop, DATA.MEAN/STD), and its pixels as uint8 frames (T, size, size, 3)."""
    with open_video(path, backend) as reader:
        n = reader.num_frames
        if sampling_rate > 0:
            start = max(0.0, (n - num_frames * sampling_rate) / 2)
            idx = np.clip(np.round(start + np.arange(num_frames) * sampling_rate), 0, n - 1)
        else:
            idx = np.round(np.linspace(0, n - 1, num_frames))
        frames = reader.get_frames(np.unique(idx.astype(int)).tolist())
        # repeated indices (a video shorter than the clip) read once, then repeated
        frames = frames[torch.as_tensor(np.searchsorted(np.unique(idx), idx))]
    data = get_cfg().DATA
    resized, offset, flip = eval_crop_box(frames.shape[1], frames.shape[2], 1, size, size, size, False)
    clip = apply_eval_crop(frames, resized, offset, flip, size, size, data.MEAN, data.STD)
    mean, std = (torch.tensor(v).view(3, 1, 1, 1) for v in (data.MEAN, data.STD))
    shown = (clip * std + mean).clamp(0, 1).permute(1, 2, 3, 0).mul(255).round().to(torch.uint8).numpy()
    return shown, clip.unsqueeze(0)


@torch.no_grad()
def cls_attention(model: VisionTransformer, clip: torch.Tensor) -> torch.Tensor:
    """(heads, T, h, w) attention of the CLS query over each frame's patches in the last block's spatial
    attention, for one clip (1, 3, T, H, W)."""
    if clip.shape[0] != 1:
        raise ValueError(f"one clip at a time, got a batch of {clip.shape[0]}")
    t = clip.shape[2]
    h, w = clip.shape[-2] // model.patch_size, clip.shape[-1] // model.patch_size
    attn = model.blocks[-1].attn
    seen = {}
    handle = attn.register_forward_hook(lambda module, args, out: seen.setdefault("x", args[0]))
    try:
        model.forward_features(clip)
    finally:
        handle.remove()
    q, k = rearrange(attn.qkv(seen["x"]), "b n (three h d) -> three b h n d", three=3, h=attn.num_heads)[:2]
    weights = (q[:, :, :1] @ k.transpose(-2, -1) * attn.scale).softmax(dim=-1)[:, :, 0, 1:]  # (b, heads, n - 1)
    if weights.shape[0] == t:  # divided / space-only: one row per frame, patches row-major
        return rearrange(weights, "t heads (h w) -> heads t h w", h=h, w=w)
    # joint space-time: one row, patches ordered (h w t)
    return rearrange(weights[0], "heads (h w t) -> heads t h w", h=h, w=w, t=t)


def _colour(maps: np.ndarray, size: int) -> np.ndarray:
    """(..., h, w) maps in [0, 1] -> (..., size, size, 3) uint8 (inferno, nearest upsampling)."""
    from matplotlib import colormaps
    h = maps.shape[-2]
    up = maps.repeat(size // h, axis=-2).repeat(size // maps.shape[-1], axis=-1)
    return (colormaps["inferno"](up)[..., :3] * 255).astype(np.uint8)


def attention_panels(frames: np.ndarray, attention: torch.Tensor) -> np.ndarray:
    """(rows, T, S, S, 3) uint8: the frames, each head's map, and the head mean, each map scaled to [0, 1]
    over its own frames (so one head's maps compare across time)."""
    maps = torch.cat([attention, attention.mean(0, keepdim=True)]).numpy()
    lo = maps.min(axis=(1, 2, 3), keepdims=True)
    maps = (maps - lo) / np.maximum(maps.max(axis=(1, 2, 3), keepdims=True) - lo, 1e-12)
    return np.concatenate([frames[None], _colour(maps, frames.shape[1])])


def save_grid(panels: np.ndarray, path: Path, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, cols = panels.shape[:2]
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols + 0.8, 1.4 * rows + 0.4), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.imshow(panels[r, c])
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"frame {c}", fontsize=8)
        axes[r, 0].set_ylabel("video" if r == 0 else "mean" if r == rows - 1 else f"head {r - 1}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_animation(panels: np.ndarray, path: Path, fps: float = 2.0) -> None:
    """A GIF whose frame t shows the video frame and every head's map side by side."""
    from PIL import Image
    pad = np.full(panels.shape[2:3] + (2, 3), 255, np.uint8)
    images = [Image.fromarray(np.concatenate([x for row in panels[:, t] for x in (row, pad)][:-1], axis=1))
              for t in range(panels.shape[1])]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)


def read_video_arg(args) -> tuple[np.ndarray, torch.Tensor]:
    """`read_clip` of --video; a missing or undecodable file is a DecodeError naming --video (and the
    decoder's reason)."""
    try:
        return read_clip(args.video, args.num_frames, args.image_size, args.sampling_rate, args.backend)
    except DecodeError as err:
        reason = str(err).removeprefix(f"{args.video}: ")
        raise DecodeError(f"--video {args.video}: {reason}.") from err


def visualize(args) -> tuple[Path, Path]:
    frames, clip = read_video_arg(args)  # before the model: a bad --video is reported at once
    model = backbone_from_checkpoint(args.pretrained_weights, args.checkpoint_key, args.seed)
    if args.image_size % model.patch_size:
        raise ValueError(f"--image_size {args.image_size} is not a multiple of the patch size {model.patch_size}")
    attention = cls_attention(model, clip)
    panels = attention_panels(frames, attention)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    png, gif = out / "attention.png", out / "attention.gif"
    save_grid(panels, png, f"{Path(args.video).name}: last-block CLS attention per head "
                           f"({Path(args.pretrained_weights).name or 'random init'})")
    save_animation(panels, gif)
    print(f"{attention.shape[0]} heads x {attention.shape[1]} frames of {tuple(attention.shape[2:])} patches: "
          f"wrote {png} and {gif}")
    return png, gif


def main(argv: list[str] | None = None) -> None:
    """The command line; a --pretrained_weights file that is not there or a --video that does not decode ends it
    with a one-line error (exit status 2)."""
    parser = argparse.ArgumentParser("Visualize the CLS attention of a video transformer", parents=[get_args_parser()])
    args = parser.parse_args(argv)
    if args.pretrained_weights and not Path(args.pretrained_weights).is_file():
        parser.error(f"--pretrained_weights {args.pretrained_weights}: no such file.")
    try:
        visualize(args)
    except DecodeError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")


if __name__ == "__main__":
    main()
