"""Synthetic motion videos: real H.264 mp4 files where the class is a motion.

Two scenes:
- `object` (default): one textured object (disc, square or diamond) over a textured background. Colours,
  textures, object size, start position and speed are random for every video; the class is the motion
  (translate left/right/up/down/diagonally, rotate either way, zoom in/out). With colour_drift the colours
  also change along each video, so that only the motion stays the same between a short window and the clip.
- `particles` (the demo's): a field of dots that all follow the class motion (the translations move the
  whole field, rotations turn it about the centre, zooms stream out of / into the centre). Layout and
  speed are random for every video and the colours are the same for all, so no single frame tells a
  translation's direction, or one polar motion from another: only the motion does.

The output uses the Kinetics csv and the UCF-101/HMDB-51 split-list layouts, so every dataset class and
script runs on it:

    out/videos/<class>/<class>_<i:03d>.mp4
    out/annotations/{train,val,test}.csv              (Kinetics: "class/file.mp4 label")
    out/splits/{ucf101,hmdb51}_{train,val}_split_1_videos.txt   (and the same in out/knn_splits/)
    out/classes.txt

Train is the first 2/3 of each class, val = test = the rest. Deterministic given the seed: the rendered
frames always; the encoded files only with `--crf 0` (lossless): libx264's lossy output (single-threaded)
was seen to differ between processes for 30-50 % of the demo's videos, by a few levels.
FLIP_DISTINCT lists classes no two of which are left-right mirror images.
CLI: `python -m datasets.synthetic --out DIR [--scene object|particles] [--motions M ...] --classes K
--per_class N --frames T --size S [--colour_drift]`.
"""
import argparse
import os
import sys
import time
from pathlib import Path

from typing import Sequence

import av
import numpy as np

MOTIONS = ("move_left", "move_right", "move_up", "move_down", "rotate_cw", "rotate_ccw",
           "zoom_in", "zoom_out", "move_up_right", "move_down_left")

# No two of these are mirror images of each other: SVT's views are randomly flipped left-right, so
# self-supervision cannot tell e.g. move_left from a flipped move_right (the demo's default classes).
FLIP_DISTINCT = ("move_right", "move_up", "move_down", "rotate_cw", "zoom_in", "zoom_out")

SCENES = ("object", "particles")

_DIRECTIONS = {"move_left": (-1, 0), "move_right": (1, 0), "move_up": (0, -1), "move_down": (0, 1),
               "move_up_right": (0.7071, -0.7071), "move_down_left": (-0.7071, 0.7071)}


def _texture(rng: np.random.Generator, drift: bool = False):
    """A random two-colour texture (stripes, checker or rings): a function of pixel coordinates u, v and of
    the time w in [0, 1] (broadcastable to u) that returns (..., 3) float colours. With drift the two
    colours move linearly to two other random colours over the video; otherwise w is ignored."""
    c0, c1 = rng.uniform(0, 255, 3).astype(np.float32), rng.uniform(0, 255, 3).astype(np.float32)
    e0, e1 = (rng.uniform(0, 255, 3).astype(np.float32) for _ in range(2)) if drift else (c0, c1)
    period = rng.uniform(4, 14)
    kind = rng.integers(3)
    angle = rng.uniform(0, np.pi)

    def paint(u: np.ndarray, v: np.ndarray, w: np.ndarray | float = 0.0) -> np.ndarray:
        if kind == 0:
            t = np.sin((u * np.cos(angle) + v * np.sin(angle)) * 2 * np.pi / period) > 0
        elif kind == 1:
            t = (np.floor(u / period) + np.floor(v / period)) % 2 == 0
        else:
            t = np.sin(np.sqrt(u ** 2 + v ** 2) * 2 * np.pi / period) > 0
        w = np.asarray(w, dtype=np.float32)[..., None]
        return np.where(t[..., None], c0 + (e0 - c0) * w, c1 + (e1 - c1) * w)
    return paint


def render_video(motion: str, num_frames: int, size: int, rng: np.random.Generator,
                 width: int | None = None, chunk: int = 16, colour_drift: bool = False):
    """Frames (T, size, width or size, 3) uint8 of one textured object performing `motion`.
    colour_drift: the object's and the background's colours change over the video (then a short
    window and the whole clip share the motion but not the colours). Rendered `chunk` frames at a
    time (memory stays small for long, large videos)."""
    if motion not in MOTIONS:
        raise ValueError(f"unknown motion {motion!r}; known: {MOTIONS}")
    height, width = size, width or size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    background, gain = _texture(rng, colour_drift), np.float32(rng.uniform(0.5, 1.0))
    foreground = _texture(rng, colour_drift)
    radius = rng.uniform(0.12, 0.22) * min(height, width)
    shape = rng.integers(3)
    speed = rng.uniform(0.5, 1.0)
    t = np.linspace(0.0, 1.0, num_frames, dtype=np.float32)
    cx = np.full_like(t, rng.uniform(0.4, 0.6) * width)
    cy = np.full_like(t, rng.uniform(0.4, 0.6) * height)
    angle = np.full_like(t, rng.uniform(0, 2 * np.pi))
    scale = np.ones_like(t)
    if motion in _DIRECTIONS:
        dx, dy = _DIRECTIONS[motion]
        travel = speed * 0.6 * min(height, width)
        cx, cy = cx + (t - 0.5) * travel * dx, cy + (t - 0.5) * travel * dy
    elif motion in ("rotate_cw", "rotate_ccw"):
        angle = angle + (1 if motion == "rotate_cw" else -1) * speed * 1.5 * np.pi * t
    else:
        grow = 1.0 + speed * 1.2
        scale = (grow ** t if motion == "zoom_in" else grow ** (1 - t)) / np.sqrt(grow)
    out = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for s in range(0, num_frames, chunk):
        sl = slice(s, s + chunk)
        # Object coordinates of every pixel: rotate and scale the offsets from the centre.
        ox, oy = xs[None] - cx[sl, None, None], ys[None] - cy[sl, None, None]
        cos, sin, sc = np.cos(angle[sl])[:, None, None], np.sin(angle[sl])[:, None, None], scale[sl, None, None]
        u, v = (cos * ox + sin * oy) / sc, (-sin * ox + cos * oy) / sc
        if shape == 0:
            inside = u ** 2 + v ** 2 <= radius ** 2
        elif shape == 1:
            inside = np.maximum(np.abs(u), np.abs(v)) <= radius * 0.85
        else:
            inside = np.abs(u) + np.abs(v) <= radius * 1.2
        w = t[sl, None, None]
        frames = np.where(inside[..., None], foreground(u, v, w), background(xs[None], ys[None], w) * gain)
        out[sl] = np.clip(frames, 0, 255).astype(np.uint8)
    return out


# Particle scene: colours shared by every video (an orange field on a dark background).
_PARTICLE_RGB = np.array([0.9, 0.55, 0.2], dtype=np.float32)
_PARTICLE_BG = 0.25 * (0.5 + 0.5 * _PARTICLE_RGB / _PARTICLE_RGB.max())
_PARTICLE_FG = np.clip(_PARTICLE_BG + 0.9 * _PARTICLE_RGB, 0, 1)


def _particle_paths(motion: str, height: int, width: int, count: int, speed: float,
                    rng: np.random.Generator):
    """A function t (array of frame times) -> particle positions (..., count, 2) as (x, y) pixels."""
    if motion in _DIRECTIONS:
        start = rng.uniform(0, 1, (count, 2)) * (width, height)
        step = np.asarray(_DIRECTIONS[motion]) * speed * min(height, width) / 64
        # The field wraps around the frame edges, so its density never changes.
        return lambda t: (start + np.asarray(t)[..., None, None] * step) % (width, height)
    # Polar motions about the frame centre; log-radius uniform in [lo, hi) keeps the density steady
    # while particles leave at one end and come back at the other.
    centre = np.array([width / 2, height / 2])
    lo, hi = np.log(3.0 * min(height, width) / 64), np.log(0.72 * max(height, width))
    log_r0, angle0 = rng.uniform(lo, hi, count), rng.uniform(0, 2 * np.pi, count)
    sign = 1 if motion in ("zoom_in", "rotate_cw") else -1

    def paths(t):
        t = np.asarray(t, dtype=np.float64)[..., None]
        if motion.startswith("zoom"):
            log_r, angle = lo + (log_r0 + sign * speed * 0.035 * t - lo) % (hi - lo), angle0 + 0 * t
        else:
            log_r, angle = log_r0 + 0 * t, angle0 + sign * speed * 0.04 * t
        r = np.exp(log_r)
        return np.stack([centre[0] + r * np.cos(angle), centre[1] + r * np.sin(angle)], -1)
    return paths


def _blur_same(img: np.ndarray, kernel: tuple[float, float, float], axis: int) -> np.ndarray:
    """3-tap 'same' convolution along `axis` with zero padding."""
    pad = [(0, 0)] * img.ndim
    pad[axis] = (1, 1)
    p = np.pad(img, pad)
    n = img.shape[axis]
    return sum(k * np.take(p, range(i, i + n), axis=axis) for i, k in enumerate(kernel))


def render_particles(motion: str, num_frames: int, size: int, rng: np.random.Generator,
                     width: int | None = None) -> np.ndarray:
    """Frames (T, size, width or size, 3) uint8 of a field of soft dots that all follow `motion`. A single
    frame says nothing of the class (the dots of every class are spread the same way within a frame;
    only the polar motions, which keep a steady density, crowd the centre); the motion between frames does."""
    if motion not in MOTIONS:
        raise ValueError(f"unknown motion {motion!r}; known: {MOTIONS}")
    height, width = size, width or size
    count = max(1, round(40 * height * width / 64 ** 2))
    speed = rng.uniform(0.6, 1.4)
    xy = _particle_paths(motion, height, width, count, speed, rng)(np.arange(num_frames))
    # Bilinear splats, then a small blur: dots of about 3 pixels.
    x0, y0 = np.floor(xy[..., 0]).astype(int), np.floor(xy[..., 1]).astype(int)
    fx, fy = (xy[..., 0] - x0).astype(np.float32), (xy[..., 1] - y0).astype(np.float32)
    frame_idx = np.broadcast_to(np.arange(num_frames)[:, None], (num_frames, count))
    img = np.zeros((num_frames, height, width), dtype=np.float32)
    for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = x0 + dx, y0 + dy
        ok = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
        np.add.at(img, (frame_idx[ok], yi[ok], xi[ok]), w[ok])
    img = _blur_same(_blur_same(img, (0.125, 0.75, 0.125), 2), (0.25, 0.5, 0.25), 1)
    alpha = np.clip(7.0 * img, 0, 1)[..., None]
    return (255 * (_PARTICLE_BG + (_PARTICLE_FG - _PARTICLE_BG) * alpha)).astype(np.uint8)


def write_video(path: str, frames: np.ndarray, fps: int = 30, crf: int = 18, gop: int | None = None) -> None:
    """Encode uint8 RGB frames (T, H, W, 3) as H.264 (yuv420p) mp4 with PyAV."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast", "threads": "1", **({"g": str(gop)} if gop else {})}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_lists(out: Path, items: list[tuple[str, int, bool]], classes: list[str]) -> None:
    """items: (relative path, label, is_train)."""
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    train = [f"{p} {y}\n" for p, y, tr in items if tr]
    held = [f"{p} {y}\n" for p, y, tr in items if not tr]
    for name, lines in (("train.csv", train), ("val.csv", held), ("test.csv", held)):
        (out / "annotations" / name).write_text("".join(lines))
    for folder in ("splits", "knn_splits"):
        (out / folder).mkdir(parents=True, exist_ok=True)
        for ds in ("ucf101", "hmdb51"):
            (out / folder / f"{ds}_train_split_1_videos.txt").write_text("".join(train))
            (out / folder / f"{ds}_val_split_1_videos.txt").write_text("".join(held))
    (out / "classes.txt").write_text("".join(f"{c}\n" for c in classes))


def generate(out_dir: str, num_classes: int = 10, per_class: int = 30, num_frames: int = 64, size: int = 128,
             fps: int = 30, seed: int = 0, crf: int = 18, motions: Sequence[str] | None = None,
             colour_drift: bool = False, scene: str = "object") -> Path:
    """Write the synthetic set to out_dir (layout in the module docstring); returns the root Path.
    The classes are the first num_classes of `motions` (default MOTIONS); scene `object` (render_video,
    colour_drift as there) or `particles` (render_particles)."""
    motions = tuple(motions or MOTIONS)
    unknown = [m for m in motions if m not in MOTIONS]
    if unknown:
        raise ValueError(f"unknown motions {unknown}; known: {MOTIONS}")
    if not 1 <= num_classes <= len(motions):
        raise ValueError(f"num_classes must be in 1..{len(motions)} (one per motion), got {num_classes}")
    if scene not in SCENES:
        raise ValueError(f"unknown scene {scene!r}; choose one of {SCENES}")
    if colour_drift and scene != "object":
        raise ValueError("colour_drift applies to the object scene only")
    if per_class < 2:
        raise ValueError(f"per_class must be >= 2 (train and val need one video each), got {per_class}")
    out = Path(out_dir)
    classes = list(motions[:num_classes])
    n_train = max(1, min(per_class - 1, round(per_class * 2 / 3)))
    items = []
    for label, name in enumerate(classes):
        for i in range(per_class):
            rng = np.random.default_rng([seed, label, i])
            rel = f"{name}/{name}_{i:03d}.mp4"
            if scene == "object":
                frames = render_video(name, num_frames, size, rng, colour_drift=colour_drift)
            else:
                frames = render_particles(name, num_frames, size, rng)
            write_video(str(out / "videos" / rel), frames, fps=fps, crf=crf)
            items.append((rel, label, i < n_train))
    _write_lists(out, items, classes)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="Output folder.")
    parser.add_argument("--scene", default="object", choices=SCENES,
                        help="object: one textured shape per video; particles: a field of dots, the same "
                             "colours in every video (the demo's).")
    parser.add_argument("--classes", type=int, default=None,
                        help="Number of classes, the first of --motions (default: all of them).")
    parser.add_argument("--motions", nargs="+", default=list(MOTIONS), choices=MOTIONS,
                        help="Class motions, in label order (default: all; the demo uses the "
                             f"left-right-flip-distinct set {' '.join(FLIP_DISTINCT)}).")
    parser.add_argument("--per_class", type=int, default=30, help="Videos per class.")
    parser.add_argument("--frames", type=int, default=64, help="Frames per video.")
    parser.add_argument("--size", type=int, default=128, help="Frame height and width.")
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--colour_drift", action="store_true",
                        help="Colours of object and background change over each video (only the motion "
                             "stays the same along it).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--crf", type=int, default=18,
                        help="libx264 quality (lower is better). 0 is lossless: the only setting whose files are "
                             "the same from one generation to the next (libx264's lossy output varies between "
                             "processes), about 4x larger.")
    args = parser.parse_args()
    start = time.time()
    classes = args.classes or len(args.motions)
    out = generate(args.out, classes, args.per_class, args.frames, args.size, args.fps, args.seed, args.crf,
                   motions=args.motions, colour_drift=args.colour_drift, scene=args.scene)
    print(f"wrote {classes * args.per_class} videos to {out} in {time.time() - start:.1f} s; "
          f"use DATA.PATH_TO_DATA_DIR {out / 'annotations'} DATA.PATH_PREFIX {out / 'videos'}")


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # a killed run keeps its last lines
    main()
