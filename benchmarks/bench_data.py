"""Data-loading throughput: decoded 10-view SVT samples per second, single process.

Compares, on synthetic videos with short side 256 (10 s at 30 fps by default), for every backend that
works here (torchcodec, decord, pyav), side by side in one run (`--rounds` interleaved rounds, the best
rate of each kept, so a busy machine slows all of them alike):
- decode strategies per backend (decoding only, no augmentation; every open includes the PyAV probe):
  `decode_once` (ours: one open, the union of all views' frames in one call),
  `per_view` (naive: open and decode every view separately),
  `sequential` (what a seek-unsafe file costs: the union decoded from the first frame on), and
  `full_window` (the original's loader: PyAV decodes every frame of the ~8.5 s window to RGB, then indexes);
- the full sample (`dataset[i]`: decode once + the SVT spatial augmentation) per backend;
- a DataLoader over that dataset (default backend) for each `--workers` count: what training sees.

    python benchmarks/bench_data.py --videos 6 --samples 24 --out bench_data.json
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets import VideoDataAugmentationDINO, build_dataset, ssl_view_frames  # noqa: E402
from datasets import decoder  # noqa: E402
from datasets.synthetic import MOTIONS, render_video, write_video  # noqa: E402
from utils.defaults import get_cfg  # noqa: E402


def make_videos(root: str, count: int, frames: int, height: int, width: int) -> list[str]:
    paths = []
    for i in range(count):
        path = os.path.join(root, f"v{i:03d}.mp4")
        motion = MOTIONS[i % len(MOTIONS)]
        write_video(path, render_video(motion, frames, height, np.random.default_rng(i), width=width), crf=23)
        paths.append(path)
    with open(os.path.join(root, "train.csv"), "w") as f:
        f.writelines(f"{os.path.basename(p)} {i % len(MOTIONS)}\n" for i, p in enumerate(paths))
    return paths


def sample_plan(reader, cfg, aug) -> tuple[int, int, list[torch.Tensor]]:
    data = cfg.DATA
    clip_size = decoder.clip_size_frames(data.NUM_FRAMES, data.SAMPLING_RATE, data.TARGET_FPS, reader.fps)
    first, length = decoder.clip_window(reader.num_frames, clip_size, -1, 1)
    return first, length, decoder.ssl_view_indices(length, aug.global_frames, aug.local_frames)


def decode_once(path, backend, cfg, aug):
    with decoder.open_video(path, backend) as reader:
        first, _, views = sample_plan(reader, cfg, aug)
        return decoder.decode_union(reader, first, views)


def per_view(path, backend, cfg, aug):
    with decoder.open_video(path, backend) as reader:
        first, _, views = sample_plan(reader, cfg, aug)
    out = []
    for idx in views:
        with decoder.open_video(path, backend) as reader:
            out.append(decoder.decode_views(reader, first, [idx])[0])
    return out


def sequential(path, cfg, aug):
    with decoder.open_video(path, "pyav") as reader:
        first, _, views = sample_plan(reader, cfg, aug)
        union = torch.unique(torch.cat([first + v for v in views])).tolist()
        return decoder.decode_sequential(path, reader.info, union)


def full_window(path, cfg, aug):
    with decoder.open_video(path, "pyav") as reader:
        first, length, views = sample_plan(reader, cfg, aug)
        window = reader.get_frames(range(first, first + length))
    return [window[idx] for idx in views]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def timed(fn, items, warmup: int = 2) -> float:
    for item in items[:warmup]:
        fn(item)
    start = time.perf_counter()
    for item in items:
        fn(item)
    return len(items) / (time.perf_counter() - start)


def loader_rate(dataset, workers: int, batch_size: int = 4) -> float:
    """Samples per second of a DataLoader (after its first batch, so worker start-up is not counted)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    batches = iter(loader)
    next(batches)
    start, count = time.perf_counter(), 0
    for views, *_ in batches:
        count += len(views[0])
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=6)
    parser.add_argument("--frames", type=int, default=300, help="Frames per video (30 fps).")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=340)
    parser.add_argument("--samples", type=int, default=24, help="Timed samples per measurement.")
    parser.add_argument("--rand_fr", action="store_true", help="Views with DATA.RAND_FR frame counts.")
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2],
                        help="DataLoader worker counts to time (batches of 4 clips, default backend).")
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds; the best rate of each is kept.")
    parser.add_argument("--out", default=None, help="Also write the JSON here.")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        paths = make_videos(root, args.videos, args.frames, args.height, args.width)
        gen_s = time.perf_counter() - t0
        cfg = get_cfg()
        cfg.DATA.PATH_TO_DATA_DIR = cfg.DATA.PATH_PREFIX = root
        cfg.DATA.RAND_FR = args.rand_fr
        g, loc = ssl_view_frames(cfg, 8)
        aug = VideoDataAugmentationDINO(global_frames=g, local_frames=loc)
        items = [paths[i % len(paths)] for i in range(args.samples)]
        backends = [b for b in ("torchcodec", "decord", "pyav")
                    if not {"torchcodec": decoder.torchcodec_status, "decord": decoder.decord_status}.get(b, str)()]
        datasets = {}
        for backend in backends:
            cfg.DATA.DECODING_BACKEND = backend
            datasets[backend] = build_dataset("kinetics400", cfg, "train", ssl_aug=aug)
        runs = {"pyav_full_window": lambda: timed(lambda p: full_window(p, cfg, aug), items),
                "sequential": lambda: timed(lambda p: sequential(p, cfg, aug), items)}
        for backend in backends:
            runs[f"{backend}_decode_once"] = lambda b=backend: timed(lambda p: decode_once(p, b, cfg, aug), items)
            runs[f"{backend}_per_view"] = lambda b=backend: timed(lambda p: per_view(p, b, cfg, aug), items)
            runs[f"{backend}_dataset_sample"] = lambda b=backend: timed(lambda i: datasets[b][i % len(paths)],
                                                                         list(range(args.samples)))
        results = {}
        for _ in range(args.rounds):
            for name, run in runs.items():
                torch.manual_seed(0)
                results[name] = max(results.get(name, 0.0), run())
        cfg.DATA.DECODING_BACKEND = get_cfg().DATA.DECODING_BACKEND
        ds = build_dataset("kinetics400", cfg, "train", ssl_aug=aug)
        repeated = torch.utils.data.Subset(ds, [i % len(ds) for i in range(args.samples)])
        for workers in args.workers:
            results[f"loader_{workers}_workers"] = loader_rate(repeated, workers)
    report = {
        "unit": "10-view samples per second, torch threads 1 (loader_*: DataLoader with that many workers)",
        "views": {"global_frames": list(g), "local_frames": list(loc), "global_size": 224, "local_size": 96},
        "videos": {"count": args.videos, "frames": args.frames, "fps": 30, "size": [args.height, args.width],
                   "codec": "h264 yuv420p crf 23, default GOP", "generate_s": round(gen_s, 1)},
        "samples_per_s": {k: round(v, 2) for k, v in results.items()},
        "speedup_decode_once_vs_per_view": {b: round(results[f"{b}_decode_once"] / results[f"{b}_per_view"], 2)
                                            for b in backends},
        "speedup_decode_once_vs_original_loader": {
            b: round(results[f"{b}_decode_once"] / results["pyav_full_window"], 2) for b in backends},
        "default_backend": decoder.resolve_backend(get_cfg().DATA.DECODING_BACKEND),
        "machine": {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
