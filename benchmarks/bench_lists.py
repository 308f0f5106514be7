"""Dataset lists at full scale: building the training dataset, and the memory a DataLoader worker copies over an
epoch of reading its paths.

Generates list files of `--layout` in a folder: `k400`, Kinetics-400's train.csv (`--videos` lines
'<class>/<youtube id>_<start>_<end>.mp4 <label>', 400 classes whose names hold a space, as Kinetics' do); `ssv2`,
TimeSformer's SSv2 layout (the labels JSON of 174 templates, the train JSON of `--videos` videos, and the frame
list train.csv: a header, then 30-60 frames per video, 45 on average, 'id index frame id/id_000001.jpg ""').
Only the list's first file is created on disk: the dataset's check that the paths resolve probes a spread of them
and passes when one exists, as it does on a real disk.

Measured in this process: the time and the peak RSS above the RSS before it (the high-water mark reset first) of
`build_dataset(..., "train")`, the time of its list parse alone, and the RSS the dataset leaves. Then one epoch of
a DataLoader (`--workers` forked workers, a shuffled pass over all indices, as training's sampler makes) with
VideoDataset._load replaced by its bookkeeping: it reads what _load reads of the dataset (a video's path; for
frame folders the video's frame list and the paths of the frames a clip opens) and opens nothing. Each worker's
private memory (Private_Clean + Private_Dirty of /proc/<pid>/smaps_rollup) is read as it starts and again after
the epoch (the workers are persistent, so they are still there, idle): its growth is what the worker copied of
the parent's pages (pytorch/pytorch#13246). `--as_lists` keeps the paths as Python lists of str, as before
datasets/path_lists.py, for the other side of the comparison.

    python benchmarks/bench_lists.py --layout ssv2 --dir /tmp/lists --out ssv2.json [--as_lists]
"""
import argparse
import functools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets import build_dataset, decoder, video_dataset  # noqa: E402
from utils.collect_env import cpu_name  # noqa: E402
from utils.defaults import get_cfg  # noqa: E402

FULL_SIZE = {"k400": 240_000, "ssv2": 168_913}  # Kinetics-400's train list, SSv2's train JSON
DATASET = {"k400": "kinetics400", "ssv2": "ssv2"}
SSV2_TEMPLATES = 174
CHUNK = 10_000  # videos written at a time: the generator's memory stays small


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layout", choices=sorted(FULL_SIZE), default="k400", help="The lists to generate.")
    parser.add_argument("--videos", type=int, default=None,
                        help=f"Videos in the train list (default: the full size, {FULL_SIZE}).")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers.")
    parser.add_argument("--batch_size", type=int, default=64, help="Samples per batch (the epoch reads all anyway).")
    parser.add_argument("--as_lists", action="store_true",
                        help="Keep the paths as Python lists of str (as before datasets/path_lists.py).")
    parser.add_argument("--dir", default=None, help="Folder for the generated lists, kept after the run (default: a "
                        "temporary folder, removed). SSv2's full frame list is ~300 MB.")
    parser.add_argument("--out", default=None, help="Also write the JSON here.")
    return parser


def write_k400(root: str, videos: int) -> None:
    rng = np.random.default_rng(0)
    alphabet = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"))
    with open(os.path.join(root, "train.csv"), "w") as f:
        for first in range(0, videos, CHUNK):
            n = min(CHUNK, videos - first)
            ids = ["".join(row) for row in alphabet[rng.integers(0, 64, (n, 11))]]
            labels, starts = rng.integers(0, 400, n), rng.integers(0, 300, n)
            f.writelines(f"class {y:03d} name/{i}_{s:06d}_{s + 10:06d}.mp4 {y}\n"
                         for i, y, s in zip(ids, labels.tolist(), starts.tolist()))


def write_ssv2(root: str, videos: int) -> int:
    """The SSv2 train layout; returns the number of frames listed."""
    rng = np.random.default_rng(0)
    templates = [f"Doing thing {c} with [something] near [something]" for c in range(SSV2_TEMPLATES)]
    with open(os.path.join(root, "something-something-v2-labels.json"), "w") as f:
        json.dump({t.replace("[", "").replace("]", ""): str(c) for c, t in enumerate(templates)}, f)
    ids = np.sort(rng.choice(np.arange(1, 220_848), videos, replace=False)).tolist()  # SSv2's ids: 1-220847
    labels = rng.integers(0, SSV2_TEMPLATES, videos).tolist()
    with open(os.path.join(root, "something-something-v2-train.json"), "w") as f:
        json.dump([{"id": str(i), "label": templates[y].replace("[something]", "a thing"), "template": templates[y],
                    "placeholders": ["a thing", "a thing"]} for i, y in zip(ids, labels)], f)
    counts = rng.integers(30, 61, videos).tolist()
    with open(os.path.join(root, "train.csv"), "w") as f:
        f.write("original_vido_id video_id frame_id path labels\n")
        for first in range(0, videos, CHUNK):
            f.writelines(f'{i} {v} {k} {i}/{i}_{k + 1:06d}.jpg ""\n'
                         for v in range(first, min(first + CHUNK, videos)) for i in (ids[v],) for k in range(counts[v]))
    return sum(counts)


def first_path(root: str, layout: str) -> str:
    """The list's first file (relative to the prefix): the one created on disk."""
    with open(os.path.join(root, "train.csv")) as f:
        if layout == "ssv2":
            f.readline()
            return f.readline().split()[3]
        return f.readline().rsplit(" ", 1)[0]


def bookkeeping_load(self, index: int):
    """VideoDataset._load without the decode or the image reads: what it reads of the dataset's lists."""
    video = index // self.num_clips_per_video
    if self.frame_paths is None:
        return torch.tensor(len(self.video_paths[video]))
    paths = self.frame_paths[video]
    frames = video_dataset.segment_indices(len(paths), self.cfg.DATA.NUM_FRAMES, self.mode == "train")
    return torch.tensor(sum(len(paths[i]) for i in frames.tolist()))


def memory_kb(pid="self", fields=("Private_Clean", "Private_Dirty"), name="smaps_rollup") -> int:
    """The sum of these fields (kB) of /proc/<pid>/<name>."""
    with open(f"/proc/{pid}/{name}") as f:
        return sum(int(line.split()[1]) for line in f if line.split(":")[0] in fields)


def record_worker_start(folder: str, worker_id: int) -> None:
    with open(os.path.join(folder, f"worker{worker_id}.json"), "w") as f:
        json.dump({"pid": os.getpid(), "private_kb": memory_kb()}, f)


def count_batch(batch: list) -> int:
    return len(batch)


def measure(args, root: str) -> dict:
    report = {"layout": args.layout, "videos": args.videos, "as_lists": args.as_lists, "workers": args.workers}
    start = time.perf_counter()
    if args.layout == "ssv2":
        report["frames"] = write_ssv2(root, args.videos)
    else:
        write_k400(root, args.videos)
    report["generate_s"] = round(time.perf_counter() - start, 4)
    prefix = os.path.join(root, "data")
    probe = os.path.join(prefix, first_path(root, args.layout))
    os.makedirs(os.path.dirname(probe), exist_ok=True)
    open(probe, "w").close()

    cfg = get_cfg()
    cfg.DATA.PATH_TO_DATA_DIR, cfg.DATA.PATH_PREFIX = root, prefix
    cfg.freeze()
    if args.as_lists:
        video_dataset.PathList = video_dataset.PathLists = list
    parse_s = []

    def timed(fn):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                parse_s.append(time.perf_counter() - t)
        return wrapper

    parse = "load_frame_lists" if args.layout == "ssv2" else "parse_list_file"
    setattr(video_dataset, parse, timed(getattr(video_dataset, parse)))
    decoder.resolve_backend(cfg.DATA.DECODING_BACKEND)  # its imports (torchcodec's) are not the list's memory
    rss_before = memory_kb(fields=("VmRSS",), name="status")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    start = time.perf_counter()
    dataset = build_dataset(DATASET[args.layout], cfg, "train")
    report["build_s"] = round(time.perf_counter() - start, 4)
    report["parse_s"] = round(sum(parse_s), 4)
    report["build_peak_mb"] = round((memory_kb(fields=("VmHWM",), name="status") - rss_before) / 1024, 1)
    report["build_kept_mb"] = round((memory_kb(fields=("VmRSS",), name="status") - rss_before) / 1024, 1)
    report["rss_after_build_mb"] = round(memory_kb(fields=("VmRSS",), name="status") / 1024, 1)
    report["path_types"] = [type(dataset.video_paths).__name__, type(dataset.frame_paths).__name__]

    video_dataset.VideoDataset._load = bookkeeping_load
    if args.workers:
        warnings.filterwarnings("ignore", "This DataLoader will create")  # more workers than cores: on purpose
        workers = os.path.join(root, "workers")
        shutil.rmtree(workers, ignore_errors=True)  # a previous run's in --dir
        os.makedirs(workers)
        loader = DataLoader(dataset, sampler=RandomSampler(dataset, generator=torch.Generator().manual_seed(0)),
                            batch_size=args.batch_size, num_workers=args.workers, collate_fn=count_batch,
                            persistent_workers=True, worker_init_fn=functools.partial(record_worker_start, workers),
                            multiprocessing_context="fork")
        start = time.perf_counter()
        it = iter(loader)
        report["samples"] = sum(it)
        report["epoch_s"] = round(time.perf_counter() - start, 4)
        growth = []
        for name in sorted(os.listdir(workers)):
            with open(os.path.join(workers, name)) as f:
                begin = json.load(f)
            growth.append(round((memory_kb(begin["pid"]) - begin["private_kb"]) / 1024, 1))
        del it, loader
        report["worker_private_growth_mb"] = growth
    report["load_average"] = [round(x, 2) for x in os.getloadavg()]
    report["machine"] = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                         "torch": torch.__version__}
    return report


def main(args) -> dict:
    args.videos = args.videos or FULL_SIZE[args.layout]
    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
        return measure(args, args.dir)
    root = tempfile.mkdtemp(prefix="bench_lists_")
    try:
        return measure(args, root)
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    result = main(args)
    growth = result.get("worker_private_growth_mb", [])
    frames = f", {result['frames']} frames" if "frames" in result else ""
    print(f"{result['layout']} {result['videos']} videos{frames}, paths as "
          f"{'lists' if result['as_lists'] else 'PathList'}")
    for key in ("build_s", "parse_s", "build_peak_mb", "build_kept_mb", "rss_after_build_mb", "epoch_s"):
        if key in result:
            print(f"  {key:<28} {result[key]}")
    if growth:
        print(f"  {'worker_private_growth_mb':<28} {growth}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
