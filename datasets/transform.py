"""Spatial transforms on whole clips: the SVT multi-view augmentation and the evaluation sampling.

Every function works on a clip tensor (T, C, H, W) at once, so one crop box and one set of colour
parameters is shared by all frames of a view. Randomness comes from torch's RNG (seeded per sample by
datasets/seeding.py).
"""
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RAND_FR_GLOBAL_FRAMES = (4, 8)
RAND_FR_LOCAL_FRAMES = (2, 2, 4, 4, 8, 8, 16, 16)


def ssl_view_frames(cfg, local_crops_number: int = 8) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Frames per SSL view: (global_frames, local_frames).

    Default: every view has DATA.NUM_FRAMES. DATA.RAND_FR: globals (4, 8), locals (2,2,4,4,8,8,16,16)
    (the original code). DATA.GLOBAL_NUM_FRAMES / LOCAL_NUM_FRAMES override either (the paper's
    setting is [8, 16] and [2, 2, 4, 4, 8, 8, 16, 16])."""
    n = cfg.DATA.NUM_FRAMES
    global_frames = RAND_FR_GLOBAL_FRAMES if cfg.DATA.RAND_FR else (n, n)
    local_frames = RAND_FR_LOCAL_FRAMES if cfg.DATA.RAND_FR else (n,) * local_crops_number
    source = "DATA.RAND_FR True" if cfg.DATA.RAND_FR else "DATA.NUM_FRAMES"
    if len(cfg.DATA.GLOBAL_NUM_FRAMES):
        global_frames = tuple(int(f) for f in cfg.DATA.GLOBAL_NUM_FRAMES)
    if len(cfg.DATA.LOCAL_NUM_FRAMES):
        local_frames = tuple(int(f) for f in cfg.DATA.LOCAL_NUM_FRAMES)
        source = "DATA.LOCAL_NUM_FRAMES"
    if len(global_frames) != 2:
        raise ValueError(f"DATA.GLOBAL_NUM_FRAMES must list 2 frame counts (one per global view), "
                         f"got {list(global_frames)}")
    if len(local_frames) != local_crops_number:
        raise ValueError(f"{source} gives {len(local_frames)} local views ({list(local_frames)}) but "
                         f"--local_crops_number is {local_crops_number}; set --local_crops_number "
                         f"{len(local_frames)} or DATA.LOCAL_NUM_FRAMES with {local_crops_number} entries.")
    if min(global_frames + local_frames, default=1) < 1:
        raise ValueError(f"frame counts must be >= 1, got globals {global_frames}, locals {local_frames}")
    return global_frames, local_frames


def to_float_clip(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float (T, 3, H, W) in [0, 1]."""
    return frames.permute(0, 3, 1, 2).float().div_(255.0)


def normalize(clip: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(T, C, H, W) -> normalised (C, T, H, W)."""
    out = clip.permute(1, 0, 2, 3).clone(memory_format=torch.contiguous_format)
    out.sub_(torch.as_tensor(mean, dtype=out.dtype).view(-1, 1, 1, 1))
    return out.div_(torch.as_tensor(std, dtype=out.dtype).view(-1, 1, 1, 1))


def resize(clip: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (T, C, H, W) to size (h, w); align_corners False, no antialias (as the
    original's evaluation sampling)."""
    if tuple(clip.shape[-2:]) == tuple(size):
        return clip
    return F.interpolate(clip, size=size, mode="bilinear", align_corners=False)


def resize_uint8(frames: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> uint8 (T, 3, size, size): bicubic without antialiasing, as the original's
    F.interpolate of its float views (a downscaled crop keeps the original's aliasing), on a channels-last view,
    which torch's vectorised uint8 kernel handles ~15x faster than a float resize: two separable passes, each
    rounded to uint8 levels (within 1-2 levels of the float resize where it stays in [0, 255])."""
    return TF.resize(frames.permute(0, 3, 1, 2), [size, size], interpolation=InterpolationMode.BICUBIC,
                     antialias=False)


def random_resized_crop_params(height: int, width: int, scale: Sequence[float],
                               ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) as torchvision's RandomResizedCrop: area U(scale), log-uniform ratio,
    10 attempts, first valid one wins, else a centre crop with the ratio clamped."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * float(torch.empty(()).uniform_(scale[0], scale[1]))
        aspect = math.exp(float(torch.empty(()).uniform_(*log_ratio)))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, ()))
            left = int(torch.randint(0, width - w + 1, ()))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class ViewParams:
    """The random draws of one SSL view: crop box (top, left, h, w), flip, colour-jitter factors
    (brightness, contrast, saturation; None when the view is not jittered) and their order, grayscale."""

    box: tuple[int, int, int, int]
    flip: bool = False
    jitter: tuple[float, float, float] | None = None
    order: tuple[int, int, int] = (0, 1, 2)
    gray: bool = False

    def as_row(self) -> list[float]:
        """[top, left, h, w, flip, brightness, contrast, saturation, order x 3, gray]; factors 1 when the
        view is not jittered (the identity). The layout the device path receives (PARAM_COLUMNS)."""
        return [*self.box, float(self.flip), *(self.jitter or (1.0, 1.0, 1.0)), *self.order, float(self.gray)]


PARAM_COLUMNS = 12


def draw_view_params(height: int, width: int, scale: Sequence[float], no_spatial: bool = False,
                     random_flip: bool = True) -> ViewParams:
    """Draw one view's parameters from torch's RNG: the crop box, then flip p=0.5 (drawn, but never applied
    without `random_flip`: the other draws stay the same), colour jitter p=0.8 (factors U(1 - m, 1 + m) for
    m = 0.4, 0.4, 0.2, then a random order), grayscale p=0.2. With `no_spatial`, the full frame and nothing else
    (no draws)."""
    if no_spatial:
        return ViewParams((0, 0, height, width))
    box = random_resized_crop_params(height, width, scale)
    flip = bool(torch.rand(()) < 0.5) and random_flip
    jitter, order = None, (0, 1, 2)
    if torch.rand(()) < 0.8:
        jitter = tuple(float(torch.empty(()).uniform_(1 - m, 1 + m)) for m in (0.4, 0.4, 0.2))
        order = tuple(torch.randperm(3).tolist())
    gray = bool(torch.rand(()) < 0.2)
    return ViewParams(box, flip, jitter, order, gray)


def gather_crop(frames: torch.Tensor, box: tuple[int, int, int, int],
                positions: torch.Tensor | slice = slice(None)) -> torch.Tensor:
    """uint8 (K, H, W, 3) -> the box (top, left, h, w) of frames[positions], (T, h, w, 3): only the crop
    is copied (index_select copies whole rows; advanced indexing of the strided crop is ~8x slower)."""
    top, left, h, w = box
    crop = frames[:, top:top + h, left:left + w]
    return crop.index_select(0, positions) if isinstance(positions, torch.Tensor) else crop[positions]


def _grayscale_planes(clip: torch.Tensor) -> torch.Tensor:
    """(3, T, H, W) -> (T, H, W) luma with torchvision's weights and its order of float operations."""
    return clip[0].mul(0.2989).add_(clip[1], alpha=0.587).add_(clip[2], alpha=0.114)


def _blend_(clip: torch.Tensor, other: torch.Tensor | None, ratio: float) -> torch.Tensor:
    """In place: clip * ratio + other * (1 - ratio), clamped to [0, 1] (torchvision's _blend, whose
    operations and their rounding this repeats; `other` None is black: brightness). Brightness with
    ratio <= 1 skips the clamp, a no-op there: clip is in [0, 1] and a float product x * r with r <= 1
    rounds to at most x. (A blend with `other` can round one ulp above 1, so it always clamps.)"""
    clip.mul_(ratio)
    if other is not None:
        clip.add_(other, alpha=1.0 - ratio)
    elif ratio <= 1:
        return clip
    return clip.clamp_(0, 1)


def color_jitter_(clip: torch.Tensor, factors: Sequence[float], order: Sequence[int]) -> torch.Tensor:
    """In place on a float (3, T, H, W) clip in [0, 1]: brightness, contrast and saturation (no hue) with
    one factor each for the whole clip, applied in `order` (indices into (brightness, contrast,
    saturation)). Contrast blends every frame with the mean of its own grayscale image. The values are
    torchvision's adjust_brightness/contrast/saturation on (T, 3, H, W), bit for bit."""
    for k in order:
        factor = float(factors[k])
        if k == 0:
            _blend_(clip, None, factor)
        elif k == 1:
            _blend_(clip, _grayscale_planes(clip).mean(dim=(-2, -1), keepdim=True), factor)
        else:
            _blend_(clip, _grayscale_planes(clip), factor)
    return clip


CHUNK_BYTES = 1 << 20  # float frames per pass of the colour operations: about half of a core's L2


def _frame_chunks(frames: int, per_chunk: int) -> list[tuple[int, int]]:
    """(first frame, frames) of the chunks of a view: `per_chunk` frames each, but never a chunk of one frame
    in a clip of several. Contrast's mean is a reduction per frame; torch splits a reduction with a single
    output over its threads and sums in another order, one with several outputs it does not: so a 1-frame
    chunk would give other floats (last-bit) than torchvision's whole-clip op when torch has several threads."""
    per_chunk = max(2, per_chunk)
    starts = list(range(0, frames, per_chunk))
    if len(starts) > 1 and frames - starts[-1] == 1:
        starts.pop()  # the last frame joins the chunk before
    return [(t, (starts[i + 1] if i + 1 < len(starts) else frames) - t) for i, t in enumerate(starts)]


def apply_view_params(frames: torch.Tensor, params: ViewParams, size: int,
                      positions: torch.Tensor | slice = slice(None)) -> torch.Tensor:
    """One view on the CPU: uint8 (T, H, W, 3) -> float (3, T, size, size). The view is frames[positions],
    cropped before the gather (only the crop is copied), resized in uint8 (bicubic, no antialiasing) and
    flipped in uint8. Then, a chunk of frames (<= CHUNK_BYTES of floats, so the ~10 passes of the colour
    operations stay in the cache) at a time, written straight into the output's (3, T, size, size)
    layout: float in [0, 1], colour jitter, grayscale and normalisation, in place. The values are those of
    torchvision's ops on the (T, 3, H, W) clip, bit for bit (every operation is per frame)."""
    clip = resize_uint8(gather_crop(frames, params.box, positions), size)
    if params.flip:
        clip = clip.flip(-1)
    out = torch.empty((3, clip.shape[0], size, size))
    mean = torch.as_tensor(IMAGENET_MEAN).view(-1, 1, 1, 1)
    std = torch.as_tensor(IMAGENET_STD).view(-1, 1, 1, 1)
    for t, n in _frame_chunks(out.shape[1], CHUNK_BYTES // (3 * size * size * out.element_size())):
        chunk = out[:, t:t + n]
        chunk.copy_(clip[t:t + n].permute(1, 0, 2, 3)).div_(255.0)
        if params.jitter is not None:
            color_jitter_(chunk, params.jitter, params.order)
        if params.gray:
            torch.sub(_grayscale_planes(chunk).expand_as(chunk), mean, out=chunk)
        else:
            chunk.sub_(mean)
        chunk.div_(std)
    return out


class VideoDataAugmentationDINO:
    """SVT's per-view spatial augmentation. Input: a list of uint8 clips (T_v, H, W, 3), the global
    views first; output: float (3, T_v, size, size) normalised with the ImageNet statistics.

    Per view: RandomResizedCrop (global scale (0.4, 1) to global_size, local (0.05, 0.4) to local_size,
    bicubic without antialiasing as the original, values kept in [0, 1]); flip p=0.5 (none without `random_flip`,
    DATA.RANDOM_FLIP); colour jitter p=0.8 (0.4, 0.4, 0.2, no hue, random order); grayscale p=0.2. Blur and
    solarisation are off (no-ops in the original).
    The parameters of every view are drawn first (`draw_params`, what the device path receives), then
    applied (`apply_view_params`; datasets/device_views.py applies them batched on a device)."""

    def __init__(self, global_crops_scale: Sequence[float] = (0.4, 1.0),
                 local_crops_scale: Sequence[float] = (0.05, 0.4), local_crops_number: int = 8,
                 global_size: int = 224, local_size: int = 96, global_frames: Sequence[int] = (8, 8),
                 local_frames: Sequence[int] = (8,) * 8, no_spatial: bool = False, random_flip: bool = True):
        if len(global_frames) != 2:
            raise ValueError(f"SVT has 2 global views, got global_frames {list(global_frames)}")
        if len(local_frames) != local_crops_number:
            raise ValueError(f"local_frames has {len(local_frames)} entries but local_crops_number is "
                             f"{local_crops_number}")
        self.global_crops_scale = tuple(global_crops_scale)
        self.local_crops_scale = tuple(local_crops_scale)
        self.local_crops_number = local_crops_number
        self.global_size, self.local_size = global_size, local_size
        self.global_frames, self.local_frames = tuple(global_frames), tuple(local_frames)
        self.no_spatial = no_spatial
        self.random_flip = random_flip

    @property
    def sizes(self) -> list[int]:
        """Output side of every view, the globals first; with `no_spatial` every view is global-sized (the full
        frame resized to the global size, as the original's DATA.NO_SPATIAL)."""
        if self.no_spatial:
            return [self.global_size] * (2 + self.local_crops_number)
        return [self.global_size] * 2 + [self.local_size] * self.local_crops_number

    def draw_params(self, height: int, width: int) -> list[ViewParams]:
        """The parameters of every view of one sample (globals first) for frames of height x width."""
        scales = [self.global_crops_scale] * 2 + [self.local_crops_scale] * self.local_crops_number
        return [draw_view_params(height, width, scale, self.no_spatial, self.random_flip) for scale in scales]

    def from_union(self, frames: torch.Tensor, positions: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Views given as positions into one decoded array of frames (K, H, W, 3) (decoder.decode_union)."""
        if len(positions) != 2 + self.local_crops_number:
            raise ValueError(f"expected {2 + self.local_crops_number} views, got {len(positions)}")
        params = self.draw_params(frames.shape[1], frames.shape[2])
        return [apply_view_params(frames, p, size, pos) for p, size, pos in zip(params, self.sizes, positions)]


def short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) with the short side = size and the long side floor(long * size / short) (PySlowFast)."""
    if height <= width:
        return size, int(math.floor(width * size / height))
    return int(math.floor(height * size / width)), size


def uniform_crop_offsets(height: int, width: int, size: int, spatial_idx: int) -> tuple[int, int]:
    """(top, left) of crop spatial_idx in {0, 1, 2} along the long side (left/centre/right or
    top/centre/bottom); 1 is the centre: ceil((S - size) / 2)."""
    top = int(math.ceil((height - size) / 2))
    left = int(math.ceil((width - size) / 2))
    if height > width:
        top = {0: 0, 1: top, 2: height - size}[spatial_idx]
    else:
        left = {0: 0, 1: left, 2: width - size}[spatial_idx]
    return top, left


def eval_crop_box(height: int, width: int, spatial_idx: int, min_scale: int, max_scale: int,
                  crop_size: int, random_flip: bool,
                  inverse_uniform: bool = False) -> tuple[tuple[int, int], tuple[int, int], bool]:
    """Spatial sampling of an evaluation clip: ((resized h, w), (top, left), flip).

    spatial_idx -1 (train): short side round(U(min_scale, max_scale)), or with `inverse_uniform`
    (DATA.INV_UNIFORM_SAMPLE, TimeSformer's SSv2 setting) round(1 / U(1 / max_scale, 1 / min_scale)), which
    favours the small sides; random crop at offsets 0 ... S - crop_size - 1 (the original's: never flush with the
    bottom/right edge), random flip. 0/1/2: short side min_scale, uniform crop spatial_idx, no flip."""
    if spatial_idx == -1:
        if inverse_uniform:
            short = int(round(1.0 / float(torch.empty(()).uniform_(1.0 / max_scale, 1.0 / min_scale))))
        else:
            short = int(round(float(torch.empty(()).uniform_(min_scale, max_scale))))
        rh, rw = short_side_size(height, width, short)
        # the original's random_crop: offsets in [0, S - crop_size), exclusive (0 when S == crop_size)
        top = int(torch.randint(0, max(rh - crop_size, 1), ()))
        left = int(torch.randint(0, max(rw - crop_size, 1), ()))
        flip = random_flip and bool(torch.rand(()) < 0.5)
        return (rh, rw), (top, left), flip
    rh, rw = short_side_size(height, width, min_scale)
    return (rh, rw), uniform_crop_offsets(rh, rw, crop_size, spatial_idx), False


def apply_eval_crop(frames: torch.Tensor, resized: tuple[int, int], offset: tuple[int, int], flip: bool,
                    crop_size: int, out_size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> resize (bilinear) to `resized`, crop crop_size at offset, flip, resize to
    out_size when it differs (slow-fast clip), normalise -> float (3, T, out_size, out_size)."""
    clip = resize(to_float_clip(frames), resized)
    top, left = offset
    clip = clip[..., top:top + crop_size, left:left + crop_size]
    if flip:
        clip = clip.flip(-1)
    if out_size != crop_size:
        clip = TF.resize(clip, [out_size, out_size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return normalize(clip, mean, std)
