"""CPU time of the SVT view augmentation alone: `VideoDataAugmentationDINO.from_union` on decoded unions.

The decoding is done once, before timing: every sample's union of frames (synthetic H.264 videos, short
side 256, as bench_data.py) is decoded and kept, then the 10 views of each sample are made under the
sample's seed. With `--ref REV`, datasets/transform.py of that git revision is loaded next to this tree's
and both are timed in interleaved rounds (the best and the median of each kept, so a busy machine slows
both alike); their views are compared (bit-equal or the largest difference). One torch thread, as in a
DataLoader worker. Minor page faults per sample are reported too: every view's output is fresh memory.

    python benchmarks/bench_augment.py --ref main --rounds 7
"""
import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_data import make_videos, sample_plan  # noqa: E402
from datasets import decoder, ssl_view_frames, transform  # noqa: E402
from utils.collect_env import cpu_name  # noqa: E402
from utils.defaults import get_cfg  # noqa: E402


def transform_at(rev: str):
    """datasets/transform.py as it is at git revision `rev`, loaded as a module of its own."""
    source = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:datasets/transform.py"], check=True,
                            capture_output=True, text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(f"transform_{rev}", f.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    os.unlink(f.name)
    return module


def decode_unions(paths: list[str], samples: int, cfg, aug) -> list[tuple]:
    unions = []
    for i in range(samples):
        torch.manual_seed(i)
        with decoder.open_video(paths[i % len(paths)], "auto") as reader:
            first, _, views = sample_plan(reader, cfg, aug)
            unions.append(decoder.decode_union(reader, first, views))
    return unions


def run(aug, unions: list[tuple]) -> tuple[float, float, list]:
    """(ms per sample, minor page faults per sample, the last sample's views)."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for i, union in enumerate(unions):
        torch.manual_seed(i)
        views = aug.from_union(*union)
    ms = (time.perf_counter() - start) / len(unions) * 1e3
    return ms, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / len(unions), views


def max_difference(a, b, unions: list[tuple]) -> float:
    """The largest absolute difference between the views of the two augmentations over all samples."""
    worst = 0.0
    for i, union in enumerate(unions):
        torch.manual_seed(i)
        x = a.from_union(*union)
        torch.manual_seed(i)
        y = b.from_union(*union)
        worst = max([worst] + [(u - v).abs().max().item() for u, v in zip(x, y)])
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=4, help="Generated videos the samples cycle over.")
    parser.add_argument("--samples", type=int, default=16, help="Samples (decoded unions) per timed pass.")
    parser.add_argument("--height", type=int, default=256, help="Frame height (Kinetics resized to short side 256).")
    parser.add_argument("--width", type=int, default=340, help="Frame width.")
    parser.add_argument("--rand_fr", action="store_true", help="Views with DATA.RAND_FR frame counts.")
    parser.add_argument("--rounds", type=int, default=5, help="Interleaved rounds.")
    parser.add_argument("--ref", default=None, help="Also time datasets/transform.py at this git revision.")
    parser.add_argument("--out", default=None, help="Also write the JSON here.")
    args = parser.parse_args()
    torch.set_num_threads(1)

    cfg = get_cfg()
    cfg.DATA.RAND_FR = args.rand_fr
    g, loc = ssl_view_frames(cfg, 8)
    modules = {"this": transform}
    if args.ref:
        modules[args.ref] = transform_at(args.ref)
    augs = {name: m.VideoDataAugmentationDINO(global_frames=g, local_frames=loc) for name, m in modules.items()}
    with tempfile.TemporaryDirectory() as root:
        paths = make_videos(root, args.videos, 300, args.height, args.width)
        unions = decode_unions(paths, args.samples, cfg, augs["this"])
    for aug in augs.values():
        run(aug, unions[:2])  # warm-up
    times = {name: [] for name in augs}
    faults = {}
    for _ in range(args.rounds):
        for name, aug in augs.items():
            ms, faults[name], _ = run(aug, unions)
            times[name].append(ms)
    report = {
        "unit": "ms per 10-view sample (from_union only, decoding excluded), torch threads 1",
        "views": {"global_frames": list(g), "local_frames": list(loc)},
        "samples": args.samples, "rounds": args.rounds, "union_frames_mean": round(
            statistics.mean(u[0].shape[0] for u in unions), 1), "frame_size": [args.height, args.width],
        "ms_per_sample": {n: {"best": round(min(t), 2), "median": round(statistics.median(t), 2)}
                          for n, t in times.items()},
        "samples_per_s_best": {n: round(1e3 / min(t), 1) for n, t in times.items()},
        "minor_page_faults_per_sample": {n: round(f) for n, f in faults.items()},
        "load_average": os.getloadavg(),
        "machine": {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__},
    }
    if args.ref:
        report["max_abs_difference_vs_ref"] = max_difference(augs["this"], augs[args.ref], unions)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
