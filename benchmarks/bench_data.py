"""Data-loading throughput: decoded 10-view SVT samples per second.

Compares, on synthetic videos with short side 256 (10 s at 30 fps by default), for every backend that
works here (torchcodec, decord, pyav), side by side in one run (`--rounds` interleaved rounds, the best
rate of each kept, so a busy machine slows all of them alike):
- decode strategies per backend (decoding only, no augmentation; every open includes the PyAV probe):
  `decode_once` (ours: one open, the union of all views' frames in one call),
  `per_view` (naive: open and decode every view separately),
  `sequential` (what a seek-unsafe file costs: the union decoded from the first frame on), and
  `full_window` (the original's loader: PyAV decodes every frame of the ~8.5 s window to RGB, then indexes);
- the full sample (`dataset[i]`: decode once + the SVT spatial augmentation) per backend;
- `plan_sample`: what a worker does with DATA.DECODE_DEVICE cuda (probe, read the bytes, draw the views'
  parameters): its rate is the CPU cost per sample of the GPU decode path; `decoded_plan_sample`: with
  DATA.AUGMENT_DEVICE cuda (decode the union with the default decoder, draw the parameters);
- with `--device_decode cpu|cuda`, the GPU decode path (plans from the workers, decoded and rendered by the
  main process on that device), first: `device_stage_ms`, where its main-process stage's time goes per
  sample, one video at a time (the whole stage; DeviceViews.decode; render_views; torchcodec's decoder open
  and get-frames alone; each timed to the device's end on 8 samples after a warm-up batch), on CUDA
  `nvdec_cache` (open and get-frames with torchcodec's NVDEC decoder cache on, then off), then
  `device_stage_threads_ms`: the whole stage per sample on a batch of 16 with each `--decode_threads` count
  of videos decoded at once, then its loader (`loader_device_<device>_<n>_workers`, DATA.DEVICE_DECODE_THREADS
  threads, batches of `--feed_batch` clips as the step it feeds) with the most `--workers` only: the stage runs
  in the main process, so once it is the bottleneck other worker counts measure the same rate (the H200 run,
  one video at a time: 3.4 samples/s with 1, 4 and 16), and `plan_sample` already gives the workers' cost; cut
  at `--max_s`; then the same for DATA.AUGMENT_DEVICE (`loader_augment_<device>_<n>_workers`: the workers
  decode, the stage renders);
- with `--feed_step tiny|small|base` (a GPU run): `train_ssl.train_step` timed on a fixed batch, then fed by
  the default decoder's CPU loader (pinned batches, as train_ssl) and, with `--device_decode`, by the GPU
  decode loader and the AUGMENT_DEVICE loader, each with `--feed_workers` workers (fed steps cut at `--max_s`;
  bf16 autocast on a GPU, fp16 on one without bf16); per path `wait_fraction` = 1 - fixed / fed step time is
  the share of the step spent waiting on data;
- last, a DataLoader for each `--workers` count, per backend (`loader_<backend>_<n>_workers`, batches of 4):
  what training sees, each timed on min(--samples, max(32, 16 x workers)) samples, most workers first, never
  cut.
Each measurement runs on its own: one that raises is recorded in `errors` and the next one runs; `seconds`
gives each one's time. The JSON is rewritten after each measurement (a run stopped at a time limit keeps what
it measured).

    python benchmarks/bench_data.py --videos 6 --samples 24 --out bench_data.json
    python benchmarks/bench_data.py --loader_only --workers 1 4 16 --device_decode cuda --feed_step base --max_s 15
"""
import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Subset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train_ssl  # noqa: E402
from datasets import VideoDataAugmentationDINO, build_dataset, ssl_view_frames  # noqa: E402
from datasets import decoder  # noqa: E402
from datasets.device_views import DeviceViewLoader, DeviceViews, collate_plans, render_views  # noqa: E402
from datasets.synthetic import MOTIONS, render_video, write_video  # noqa: E402
from utils.collect_env import cpu_name  # noqa: E402
from utils.defaults import get_cfg  # noqa: E402
from utils.utils import DEFAULT_DECODE_TIMEOUT_MIN  # noqa: E402  (a stage's hung decode: DecodeHang, then exit 1)


def _write_one(job) -> None:
    path, motion, frames, height, width, seed = job
    write_video(path, render_video(motion, frames, height, np.random.default_rng(seed), width=width), crf=23)


def make_videos(root: str, count: int, frames: int, height: int, width: int) -> list[str]:
    """`count` H.264 mp4s of moving dots (written in parallel) and their train.csv."""
    paths = [os.path.join(root, f"v{i:03d}.mp4") for i in range(count)]
    jobs = [(p, MOTIONS[i % len(MOTIONS)], frames, height, width, i) for i, p in enumerate(paths)]
    with ProcessPoolExecutor(max(1, min(count, os.cpu_count() or 1))) as pool:
        list(pool.map(_write_one, jobs))
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


def timed(fn, items, warmup: int = 2) -> float:
    for item in items[:warmup]:
        fn(item)
    start = time.perf_counter()
    for item in items:
        fn(item)
    return len(items) / (time.perf_counter() - start)


CPU_LOADER_BATCH = 4  # clips per batch of the CPU loaders (comparable with the earlier runs)


def loader_rate(dataset, workers: int, batch_size: int = CPU_LOADER_BATCH, stage: DeviceViews | None = None,
                max_s: float = 0, pin: bool = False) -> float:
    """Samples per second of a DataLoader (after its first batch, so worker start-up is not counted); with
    `stage`, the dataset yields plans and the stage decodes and renders them (timed to the device's end).
    With `max_s`, stops after the batch that passes max_s seconds (a slow stage does not eat a time limit).
    `pin`: pinned batches (train_ssl pins the workers' decoded frames on a GPU)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=pin,
                                         collate_fn=collate_plans if stage else None)
    batches = iter(DeviceViewLoader(loader, stage) if stage else loader)
    next(batches)
    start, count = time.perf_counter(), 0
    for views, *_ in batches:
        count += len(views[0])
        if max_s and time.perf_counter() - start > max_s:
            break
    if stage is not None and stage.device.type == "cuda":
        torch.cuda.synchronize(stage.device)
    if not count:
        raise ValueError(f"--samples {len(dataset)} gives one batch of {batch_size}: nothing left to time")
    return count / (time.perf_counter() - start)


def plan_batches(plans, count: int, batch_size: int = 4) -> list[dict]:
    """`count` collated batches of plans, sample i of video i % videos (what the main-process stage gets)."""
    samples = [plans[i % len(plans)] for i in range(count * batch_size)]
    return [collate_plans(samples[k:k + batch_size])[0] for k in range(0, len(samples), batch_size)]


def clock(device: torch.device, fn) -> tuple[float, object]:
    """(seconds, result) of fn(), bracketed with CUDA synchronizations on a CUDA device."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def open_and_get(plans: dict, b: int, device: torch.device) -> tuple[float, float]:
    """Seconds torchcodec takes to open sample b's video on `device` (decoder construction: on CUDA an NVDEC
    decoder unless its cache holds one) and to get its union of frames: decoder.decode_on_device's two calls."""
    open_s, video = clock(device, lambda: decoder._open_torchcodec(plans["video"][b], plans["info"][b], str(device)))
    get_s, _ = clock(device, lambda: video.get_frames_at(plans["frames"][b].tolist()))
    return open_s, get_s


def stage_breakdown(batches: list[dict], stage: DeviceViews) -> dict:
    """Milliseconds per sample of the GPU decode path's main-process stage on `batches` (the first one a
    warm-up), each timed to the device's end in its own pass over the same batches: the whole stage
    (`stage_ms`), its two parts (`decode_ms`: DeviceViews.decode of each sample, i.e. torchcodec open + get
    frames + the frame checks; `render_ms`: render_views of the batch) and torchcodec's two calls alone
    (`open_ms`, `get_frames_ms`). The parts are separate runs, so decode + render ~ stage is a measurement.
    `nvdec_cpu_fallbacks`: the stage's videos torchcodec decoded on the CPU (a CUDA device without NVDEC: it
    falls back quietly), `sequential_cpu_decodes`: those it could not decode there; either makes the times
    those of the CPU, not of NVDEC."""
    device = stage.device
    stage(batches[0])
    parts = dict.fromkeys(("stage_ms", "decode_ms", "render_ms", "open_ms", "get_frames_ms"), 0.0)
    for plans in batches[1:]:
        num = len(plans["video"])
        parts["stage_ms"] += clock(device, lambda: stage(plans))[0]
        frames = []
        for b in range(num):
            seconds, out = clock(device, lambda: stage.decode(plans, b))
            parts["decode_ms"] += seconds
            frames.append(out)
        parts["render_ms"] += clock(device, lambda: render_views(frames, plans["positions"], plans["params"],
                                                                 stage.sizes))[0]
        for b in range(num):
            open_s, get_s = open_and_get(plans, b, device)
            parts["open_ms"] += open_s
            parts["get_frames_ms"] += get_s
    count = sum(len(plans["video"]) for plans in batches[1:])
    return {"samples": count, **{k: round(1000 * v / count, 2) for k, v in parts.items()}, "device": str(device),
            "nvdec_cpu_fallbacks": stage.cpu_fallbacks, "sequential_cpu_decodes": stage.sequential_total}


def nvdec_cache_compare(batches: list[dict], device: torch.device) -> dict:
    """torchcodec open + get frames (ms per sample, the first batch a warm-up) with its NVDEC decoder cache at
    its default capacity, then at 0 (what guard_nvdec_cache sets for good before torchcodec 0.17, so this runs
    before the stage is built); the default is restored afterwards where torchcodec can read it. All videos
    here share one coded size: with the cache on, every open after the first finds its decoder."""
    from torchcodec import __version__ as version, decoders
    setter = next((getattr(decoders, n) for n in decoder._CACHE_SETTERS if hasattr(decoders, n)), None)
    if setter is None:
        return {"torchcodec": version, "skipped": "no NVDEC cache setter in this torchcodec"}
    getter = getattr(decoders, "get_nvdec_cache_capacity", None)
    default = getter() if getter else None
    out = {"torchcodec": version, "default_capacity": default}
    for name, capacity in (("cache_on", default), ("cache_off", 0)):
        if capacity is not None:
            setter(capacity)
        timed_s = {"open_ms": 0.0, "get_frames_ms": 0.0}
        for k, plans in enumerate(batches):
            for b in range(len(plans["video"])):
                open_s, get_s = open_and_get(plans, b, device)
                if k:
                    timed_s["open_ms"] += open_s
                    timed_s["get_frames_ms"] += get_s
        count = sum(len(plans["video"]) for plans in batches[1:])
        out[name] = {k: round(1000 * v / count, 2) for k, v in timed_s.items()}
    if default is not None:
        setter(default)
    return out


def thread_scaling(batches: list[dict], stage_threads: Sequence[int], device: torch.device, sizes,
                   measured=lambda out: None) -> dict:
    """Milliseconds per sample of the whole main-process stage decoding `t` videos of a batch at once
    (DATA.DEVICE_DECODE_THREADS) for each t, on the same batch (batches[1]; batches[0] warms up NVDEC's
    sessions and the streams), timed to the device's end; `measured(out)` after each t."""
    out = {}
    for threads in stage_threads:
        stage = DeviceViews(sizes, device, threads, decode_timeout=DEFAULT_DECODE_TIMEOUT_MIN)
        stage(batches[0])
        seconds, _ = clock(device, lambda: stage(batches[1]))
        stage.close()
        out[str(threads)] = round(1000 * seconds / len(batches[1]["video"]), 2)
        measured(out)
    return out


def feed_plans(plans, stage: DeviceViews, batch: int, workers: int, steps: int, pin: bool = False) -> tuple:
    """(loader, views): a loader of plans and `views(iterator of its batches)`, the device views train_ssl gets
    from them (DeviceViewLoader: decoded unless the workers did, rendered by `stage`, one batch ahead); pinned
    as train_ssl pins them (`pin`: the workers' decoded frames, not bytes)."""
    loader = torch.utils.data.DataLoader(plans, batch_size=batch, num_workers=workers, collate_fn=collate_plans,
                                         pin_memory=pin, sampler=feed_sampler(plans, batch, steps, workers))
    return loader, lambda batches: (views for views, *_ in DeviceViewLoader(loader, stage).views(batches))


def feed_cpu(dataset, device: torch.device, batch: int, workers: int, steps: int) -> tuple:
    """(loader, views) of the CPU path: pinned batches copied to the device as train_ssl does."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers,
                                         pin_memory=device.type == "cuda",
                                         sampler=feed_sampler(dataset, batch, steps, workers))
    return loader, lambda batches: ([v.to(device, non_blocking=True) for v in b[0]] for b in batches)


PREFETCH = 2  # DataLoader's default prefetch_factor: batches each worker makes ahead


def feed_sampler(dataset, batch: int, steps: int, workers: int):
    """Samples for a fed run: the first batch, the batches the workers prefetch, two spare, `steps` timed."""
    return torch.utils.data.RandomSampler(dataset, replacement=True,
                                          num_samples=batch * (steps + 3 + PREFETCH * workers))


def fed_steps(feeds: dict, device: torch.device, size: str, batch: int, workers: int, steps: int, crop: int,
              num_frames: int, max_s: float = 0, measured=lambda out: None) -> dict:
    """train_step on a fixed batch vs fed by each loader of `feeds` ({path: (loader, views)}, `views` making the
    device views of an iterator of the loader's batches, as train_ssl gets them; run one after the other, each
    loader's workers started at its turn and stopped after it): step times and, per path, the share of the step
    spent waiting on data. Before timing, the batches the workers made ahead while the first one was awaited
    are taken from the loader unused, so the timed steps see the workers' steady rate, not a full queue. With
    `max_s`, each path's fed steps stop after the one that passes max_s seconds (two at least). One model for
    all paths; a path that fails is recorded as {"error": ...} and the next one runs; `measured(out)` is called
    after each path."""
    from bench_train_step import build_state, get_parser
    precision = step_precision(device)
    opt = get_parser().parse_args(["--size", size, "--precision", precision, "--crop", str(crop),
                                   "--num_frames", str(num_frames), "--fused_adamw", "on"])
    state, args = build_state(opt, device)

    def timed_steps(source, limit: float = 0) -> tuple[float, int]:
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        for it in range(steps):
            train_ssl.train_step(state, source(), 0, it, args)
            if limit and it >= 1 and time.perf_counter() - start > limit:
                break
        sync()
        return (time.perf_counter() - start) / (it + 1), it + 1

    out = {"size": size, "batch": batch, "workers": workers, "device": str(device), "precision": precision,
           "steps": steps, "paths": {}}
    for path, (loader, views) in feeds.items():
        batches = fed = None
        try:
            batches = iter(loader)
            first = next(batches)  # the workers' start-up is not timed
            for _ in range(PREFETCH * workers):  # nor what they queued meanwhile
                next(batches)
            fed = views(itertools.chain([first], batches))
            first = next(fed)
            if "fixed_batch_step_s" not in out:
                train_ssl.train_step(state, first, 0, 0, args)  # warm-up
                out["fixed_batch_step_s"], _ = timed_steps(lambda: first)
            fed_s, fed_count = timed_steps(lambda: next(fed), max_s)
            out["paths"][path] = {"fed_steps": fed_count, "fed_step_s": fed_s,
                                  "wait_fraction": max(0.0, 1 - out["fixed_batch_step_s"] / fed_s)}
        except Exception as err:  # e.g. no NVDEC decoder: the other paths are still measured
            traceback.print_exc()
            out["paths"][path] = {"error": f"{type(err).__name__}: {err}"}
        finally:
            if fed is not None:
                fed.close()  # a GPU path's decode threads end here
            fed = batches = None  # its workers stop before the next path's start
        measured(out)
    return out


def step_precision(device: torch.device) -> str:
    """Autocast of the fed step: bf16 on a GPU with native bf16, fp16 on one without (a V100: bf16 would be
    emulated or refused), fp32 on the CPU (as the CPU runs of this benchmark)."""
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=6, help="Generated H.264 videos the samples cycle over.")
    parser.add_argument("--frames", type=int, default=300, help="Frames per video (30 fps).")
    parser.add_argument("--height", type=int, default=256, help="Frame height (Kinetics resized to short side 256).")
    parser.add_argument("--width", type=int, default=340, help="Frame width.")
    parser.add_argument("--samples", type=int, default=24, help="Timed samples per measurement.")
    parser.add_argument("--rand_fr", action="store_true", help="Views with DATA.RAND_FR frame counts.")
    parser.add_argument("--crop", type=int, nargs=2, default=(224, 96), help="Global and local view sides.")
    parser.add_argument("--backends", nargs="*", default=["torchcodec", "decord", "pyav"],
                        choices=["torchcodec", "decord", "pyav"], help="Decoders to compare (those that work here).")
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2],
                        help="DataLoader worker counts to time (batches of 4 clips), for every backend.")
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds; the best rate of each is kept.")
    parser.add_argument("--device_decode", default="none", choices=["none", "cpu", "cuda"],
                        help="Also time the DATA.DECODE_DEVICE cuda path with its stage on this device.")
    parser.add_argument("--loader_only", action="store_true",
                        help="Only the DataLoader rates and plan_sample (skip the one-process strategies).")
    parser.add_argument("--decode_threads", type=int, nargs="*", default=[1, 8, 16],
                        help="With --device_decode: time the main-process stage decoding this many videos of a batch "
                             "of 16 at once (DATA.DEVICE_DECODE_THREADS); its loader and fed step use the default.")
    parser.add_argument("--feed_step", default=None, choices=["tiny", "small", "base"],
                        help="Also time train_step fed by the default decoder's CPU loader and, with "
                             "--device_decode, by the GPU decode loader.")
    parser.add_argument("--feed_batch", type=int, default=16,
                        help="Clips per step of --feed_step, and per batch of the GPU decode and AUGMENT_DEVICE "
                             "loaders (the step's batch: their stage renders a batch at once).")
    parser.add_argument("--feed_workers", type=int, default=8, help="Loader workers of --feed_step.")
    parser.add_argument("--feed_steps", type=int, default=10, help="Timed steps of --feed_step.")
    parser.add_argument("--max_s", type=float, default=0,
                        help="Stop the GPU decode path's loader and each path's fed steps after this many seconds "
                             "(one batch / two steps at least; 0: no limit), so that a slow main-process stage does "
                             "not eat a time-limited run. The CPU loaders are never cut: their numbers stay "
                             "comparable.")
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
        aug = VideoDataAugmentationDINO(global_frames=g, local_frames=loc, global_size=args.crop[0],
                                        local_size=args.crop[1])
        items = [paths[i % len(paths)] for i in range(args.samples)]
        repeat = [i % len(paths) for i in range(args.samples)]
        backends = [b for b in args.backends
                    if not {"torchcodec": decoder.torchcodec_status, "decord": decoder.decord_status}.get(b, str)()]
        datasets = {}
        for backend in backends:
            cfg.DATA.DECODING_BACKEND = backend
            datasets[backend] = build_dataset("kinetics400", cfg, "train", ssl_aug=aug)
        runs = {}
        if not args.loader_only:
            runs = {"pyav_full_window": lambda: timed(lambda p: full_window(p, cfg, aug), items),
                    "sequential": lambda: timed(lambda p: sequential(p, cfg, aug), items)}
            for backend in backends:
                runs[f"{backend}_decode_once"] = lambda b=backend: timed(lambda p: decode_once(p, b, cfg, aug), items)
                runs[f"{backend}_per_view"] = lambda b=backend: timed(lambda p: per_view(p, b, cfg, aug), items)
                runs[f"{backend}_dataset_sample"] = lambda b=backend: timed(lambda i: datasets[b][i % len(paths)],
                                                                             list(range(args.samples)))
        cfg.DATA.DECODING_BACKEND = get_cfg().DATA.DECODING_BACKEND
        cfg.DATA.AUGMENT_DEVICE = "cuda"  # the workers decode, the main process augments
        decoded_plans = build_dataset("kinetics400", cfg, "train", ssl_aug=aug)
        cfg.DATA.DECODE_DEVICE = "cuda"
        plans = build_dataset("kinetics400", cfg, "train", ssl_aug=aug)
        runs["plan_sample"] = lambda: timed(lambda i: plans[i % len(paths)], list(range(args.samples)))
        runs["decoded_plan_sample"] = lambda: timed(lambda i: decoded_plans[i % len(paths)],
                                                    list(range(args.samples)))
        results, extra, errors, seconds = {}, {}, {}, {}

        def report() -> dict:
            return build_report(args, results, extra, backends, (g, loc), gen_s, errors, seconds)

        def keep(name: str):
            """A callback storing a measurement's results so far under `name` and rewriting the JSON."""
            def store(value) -> None:
                extra[name] = value
                write_json(args.out, report())
            return store

        def attempt(name: str, fn, into: dict | None = None):
            """fn(), stored under `name` in `into` (results or extra), its seconds added to `seconds`. One that
            raises (a CPU-only torchcodec, no FFmpeg, no NVDEC, ...) is recorded in `errors` and the run goes on
            with the next measurement. The JSON is rewritten after each, so a run killed at its time limit keeps
            what it measured."""
            start = time.perf_counter()
            value, stuck = None, False
            try:
                value = fn()
                if into is not None:
                    into[name] = value
            except Exception as err:
                traceback.print_exc()
                errors[name] = f"{type(err).__name__}: {err}"
                stuck = getattr(err, "stuck_threads", False)
            seconds[name] = round(seconds.get(name, 0) + time.perf_counter() - start, 1)
            write_json(args.out, report())
            if stuck:  # a decode thread that cannot be stopped: the interpreter would wait for it at exit
                print(f"{name}: a decode thread is stuck, the run ends here"
                      f"{f'; the measurements so far are in {args.out}' if args.out else ''}", flush=True)
                os._exit(1)
            return value

        def best(name: str, run) -> float:
            torch.manual_seed(0)
            return max(results.get(name, 0.0), run())

        for _ in range(args.rounds):
            for name, run in runs.items():
                if name not in errors:
                    attempt(name, lambda: best(name, run), results)
        # The GPU decode path first (its stage's time split, then its loader, time-bounded by --max_s), then the
        # fed step (the question a GPU run answers), then the CPU loaders (most workers first), each measurement
        # on its own: one that fails is recorded and the next one runs.
        stages: dict[str, DeviceViews] = {}
        workers = max(args.workers)
        if args.device_decode != "none":
            device = torch.device(args.device_decode)
            batches = plan_batches(plans, 3)
            if device.type == "cuda":  # before any stage: DeviceViews turns the cache off for good before 0.17
                attempt("nvdec_cache", lambda: nvdec_cache_compare(batches, device), extra)
            attempt("device_stage_ms", lambda: stage_breakdown(
                batches, DeviceViews(aug.sizes, device, decode_timeout=DEFAULT_DECODE_TIMEOUT_MIN)), extra)
            if args.decode_threads:
                attempt("device_stage_threads_ms", lambda: thread_scaling(
                    plan_batches(plans, 2, 16), args.decode_threads, device, aug.sizes,
                    keep("device_stage_threads_ms")), extra)

            def stage_loader(kind: str, dataset, pin: bool) -> float:
                """The GPU decode (kind "device") or AUGMENT_DEVICE ("augment": the workers decode, this process
                renders) loader with the most workers, batches of --feed_batch clips (the step's)."""
                stages[kind] = DeviceViews(aug.sizes, device, cfg.DATA.DEVICE_DECODE_THREADS, nvdec=kind == "device",
                                           decode_timeout=DEFAULT_DECODE_TIMEOUT_MIN)
                try:
                    return loader_rate(Subset(dataset, repeat[:loader_samples(args.samples, workers)]), workers,
                                       args.feed_batch, stage=stages[kind], max_s=args.max_s, pin=pin)
                finally:
                    stages[kind].close()

            attempt(f"loader_device_{args.device_decode}_{workers}_workers",
                    lambda: stage_loader("device", plans, False), results)
            if "device" in stages:
                keep("device_decode")(device_record(stages["device"]))
            attempt(f"loader_augment_{args.device_decode}_{workers}_workers",
                    lambda: stage_loader("augment", decoded_plans, device.type == "cuda"), results)
        if args.feed_step:
            device = torch.device(args.device_decode if args.device_decode != "none" else
                                  "cuda" if torch.cuda.is_available() else "cpu")
            default = decoder.resolve_backend(get_cfg().DATA.DECODING_BACKEND)
            feeds = {}
            if default in datasets:  # the default CPU path, as train_ssl feeds it
                feeds[default] = feed_cpu(datasets[default], device, args.feed_batch, args.feed_workers,
                                          args.feed_steps)
            for kind, dataset in (("device", plans), ("augment", decoded_plans)):
                if kind in stages:
                    feeds[f"{kind}_{args.device_decode}"] = feed_plans(
                        dataset, stages[kind], args.feed_batch, args.feed_workers, args.feed_steps,
                        pin=kind == "augment" and device.type == "cuda")
            attempt("feed_step", lambda: fed_steps(feeds, device, args.feed_step, args.feed_batch, args.feed_workers,
                                                   args.feed_steps, args.crop[0], cfg.DATA.NUM_FRAMES, args.max_s,
                                                   keep("feed_step")), extra)
            if "device" in stages:  # each fed path closed its stage's threads
                keep("device_decode")(device_record(stages["device"]))
        for count in sorted(args.workers, reverse=True):
            for backend in backends:
                attempt(f"loader_{backend}_{count}_workers", lambda: loader_rate(
                    Subset(datasets[backend], repeat[:loader_samples(args.samples, count)]), count), results)
    print(json.dumps(report(), indent=2))


def device_record(stage: DeviceViews) -> dict:
    """What the GPU decode path did other than decode on the device: NVDEC's CPU fallbacks, videos decoded
    sequentially on the CPU (torchcodec failed or disagreed with the probe), videos that did not decode."""
    return {"device": str(stage.device), "threads": stage.threads, "nvdec_cpu_fallbacks": stage.cpu_fallbacks,
            "sequential_cpu_decodes": stage.sequential_total, "failed_videos": stage.failed}


def loader_samples(samples: int, workers: int) -> int:
    """Samples timed for a loader with `workers` workers: --samples, but no more than 16 per worker (at
    least 32), so the one-worker runs of a many-core machine do not eat the time limit."""
    return min(samples, max(32, 16 * max(1, workers)))


def build_report(args, results: dict, extra: dict, backends: list, frames: tuple, gen_s: float, errors: dict,
                 seconds: dict) -> dict:
    g, loc = frames
    per_sample = {key: round(1000 / results[run], 2) for key, run in (
        ("plan_cpu_ms_per_sample", "plan_sample"), ("decoded_plan_cpu_ms_per_sample", "decoded_plan_sample"))
        if results.get(run)}
    report = {
        "unit": "10-view samples per second, torch threads 1 (loader_*: DataLoader with that many workers)",
        "loader_batch": {"loader_<decoder>_*": CPU_LOADER_BATCH, "loader_device_*, loader_augment_*": args.feed_batch},
        "views": {"global_frames": list(g), "local_frames": list(loc), "global_size": args.crop[0],
                  "local_size": args.crop[1]},
        "videos": {"count": args.videos, "frames": args.frames, "fps": 30, "size": [args.height, args.width],
                   "codec": "h264 yuv420p crf 23, default GOP", "generate_s": round(gen_s, 1)},
        "samples_per_s": {k: round(v, 2) for k, v in results.items()},
        **per_sample,
        "default_backend": decoder.resolve_backend(get_cfg().DATA.DECODING_BACKEND),
        "machine": {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
    }
    if not args.loader_only:
        for key, slow in (("speedup_decode_once_vs_per_view", "{}_per_view"),
                          ("speedup_decode_once_vs_original_loader", "pyav_full_window")):
            report[key] = {b: round(results[f"{b}_decode_once"] / results[slow.format(b)], 2) for b in backends
                           if results.get(f"{b}_decode_once") and results.get(slow.format(b))}
    report["errors"] = errors  # measurement -> the error it raised (the others were still measured)
    report["seconds"] = seconds  # measurement -> the seconds it took (all rounds)
    return {**report, **extra}


def write_json(path: str | None, report: dict) -> None:
    """Write `report` to `path` (when given) through a temporary file, so a reader never sees half of it."""
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, path)


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # a killed run keeps its last lines
    main()
