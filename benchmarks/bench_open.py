"""torchcodec open + get_frames per video: its exact mode against being given the probe's frame table.

Exact mode scans the file's packets itself; `decoder.frame_mappings` hands it the probe's table instead (no scan,
but a JSON table written and parsed in Python; the decoder uses it only where exact mode's scan fails). Timed per
video: open, and open + get_frames_at(the union of one sample's 10 views), on the CPU, one thread.

Synthetic H.264 mp4s (datasets/synthetic.py, 30 fps; `--seconds` long each), `--rounds` interleaved rounds,
the median of each kept. The PyAV probe that every open runs first is timed alongside (it is the same in both).

    python benchmarks/bench_open.py --videos 4 --seconds 10 60 --rounds 7
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from datasets import decoder  # noqa: E402
from datasets.synthetic import MOTIONS, render_video, write_video  # noqa: E402
from utils.collect_env import cpu_name  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=4, help="Videos per length.")
    parser.add_argument("--seconds", type=int, nargs="+", default=[10, 60], help="Video lengths to time.")
    parser.add_argument("--height", type=int, default=256, help="Frame height.")
    parser.add_argument("--width", type=int, default=320, help="Frame width.")
    parser.add_argument("--rounds", type=int, default=7, help="Interleaved rounds; the median of each is kept.")
    parser.add_argument("--out", default="", help="Also write the JSON here.")
    return parser


def union(num_frames: int, seed: int) -> list[int]:
    """The frames one SVT sample decodes with the default config: the union of its 10 views of 8 frames."""
    torch.manual_seed(seed)
    first, length = decoder.clip_window(num_frames, decoder.clip_size_frames(8, 32, 30, 30.0), -1, 1)
    views = decoder.ssl_view_indices(length, [8, 8], [8] * 8)
    return decoder.union_positions(first, views)[0].tolist()


def time_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def main(args) -> dict:
    from torchcodec.decoders import VideoDecoder
    torch.set_num_threads(1)
    opts = {"dimension_order": "NHWC", "num_ffmpeg_threads": 1}
    times: dict = {}
    with tempfile.TemporaryDirectory() as root:
        videos = []
        for seconds in args.seconds:
            for i in range(args.videos):
                path = os.path.join(root, f"{seconds}s_{i}.mp4")
                rng = np.random.default_rng(i)
                write_video(path, render_video(MOTIONS[i % len(MOTIONS)], 30 * seconds, args.height, rng,
                                               width=args.width), crf=23)
                videos.append((seconds, path, decoder.probe(path)))
        methods = {
            "probe": lambda path, info, frames: decoder.probe(path),
            "exact_scan": lambda path, info, frames: VideoDecoder(
                path, stream_index=info.stream_index, seek_mode="exact", **opts).get_frames_at(frames),
            "frame_table": lambda path, info, frames: VideoDecoder(
                path, stream_index=info.stream_index, custom_frame_mappings=decoder.frame_mappings(info),
                **opts).get_frames_at(frames),
            "exact_scan_open": lambda path, info, frames: VideoDecoder(
                path, stream_index=info.stream_index, seek_mode="exact", **opts),
            "frame_table_open": lambda path, info, frames: VideoDecoder(
                path, stream_index=info.stream_index, custom_frame_mappings=decoder.frame_mappings(info), **opts),
        }
        for r in range(args.rounds):
            for k, (seconds, path, info) in enumerate(videos):
                frames = union(info.num_frames, k)
                for name, fn in list(methods.items())[::1 if r % 2 else -1]:   # no method always runs first
                    times.setdefault((seconds, name), []).append(time_ms(lambda: fn(path, info, frames)))
    report = {"ms_per_video_median": {f"{s}s_{name}": round(statistics.median(v), 2) for (s, name), v in times.items()},
              "machine": {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch": torch.__version__}}
    try:
        import torchcodec
        report["machine"]["torchcodec"] = torchcodec.__version__
    except ImportError:
        pass
    return report


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    result = main(args)
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
