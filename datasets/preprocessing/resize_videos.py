"""Re-encode videos to short side 256 as H.264 MP4 (audio dropped) with PyAV, whatever the input container
(mp4, avi, mkv, webm, mov), keeping the relative paths with the extension changed to .mp4, as the
original README asks for Kinetics (mmaction2's resize step). The output is what every backend decodes
by random access: H.264 in MP4, constant frame rate (frame i of the input stays frame i; timestamps are
renumbered at the average rate), upright (a display rotation is applied to the pixels, so the video looks
the same as before without needing a display matrix).

    python -m datasets.preprocessing.resize_videos --src data/hmdb51/videos --dst data/hmdb51/videos_d256 \
        --list data/hmdb51/splits/hmdb51_train_split_1_videos.txt \
        --out_list data/hmdb51/splits_d256/hmdb51_train_split_1_videos.txt

With --list only the listed videos (paths relative to --src, or absolute under it) are converted, and the list
is written again with the new file names relative to --dst (same labels and separator; a video that failed
is reported and left out, so every line names a file); without it, every video under --src.

An output that is already there is kept when its short side is --short_side (a rerun finishes an interrupted
conversion) and is an error when it is another (an earlier run with another --short_side into the same --dst);
--overwrite re-encodes every output. Two inputs that would give the same output (a/x.avi and a/x.mkv) are an
error naming both, before any work.
"""
import argparse
import os
import sys
from fractions import Fraction
from multiprocessing import Pool

import av
import numpy as np

if not __package__:  # run by path (python datasets/preprocessing/X.py): make the repo's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from datasets.decoder import probe  # noqa: E402
from datasets.video_dataset import parse_list_file  # noqa: E402

VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".webm", ".mov")


def target_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(w, h) with the short side = short_side and the aspect kept; both even (yuv420p needs it)."""
    if width <= height:
        w, h = short_side, height * short_side / width
    else:
        w, h = width * short_side / height, short_side
    return int(round(w / 2)) * 2, int(round(h / 2)) * 2


def mp4_name(path: str) -> str:
    """The output name of a video: same path, extension .mp4."""
    return os.path.splitext(path)[0] + ".mp4"


def relative_to_src(path: str, src: str, list_file: str) -> str:
    """A list path relative to --src; an absolute one under --src is made relative (it would otherwise name
    the input itself as the output). An absolute path outside --src is an error."""
    if not os.path.isabs(path):
        return path
    relative = os.path.relpath(path, os.path.abspath(src))
    if relative.startswith(os.pardir):
        raise ValueError(f"{list_file}: the absolute path {path} is not under --src {src}; set --src to the folder "
                         "that holds the videos (or make the list's paths relative to it).")
    return relative


def check_existing(dst: str, short_side: int) -> str:
    """The status of an output that is already there: "exists" when its short side is `short_side`, else an
    error message naming both sizes."""
    try:
        info = probe(dst)
    except Exception as err:
        return f"error: the output {dst} is already there but cannot be read ({err}); delete it or pass --overwrite."
    if min(target_size(info.width, info.height, short_side)) == min(info.width, info.height):
        return "exists"
    return (f"error: the output {dst} is already there with short side {min(info.width, info.height)}, not "
            f"--short_side {short_side} (an earlier run with another --short_side?); pass another --dst, or "
            "--overwrite to re-encode it.")


def output_collisions(jobs: list[tuple]) -> str:
    """'' when every input has its own output, else a message naming the inputs that share one."""
    sources: dict[str, list[str]] = {}
    for src, dst, *_ in jobs:
        sources.setdefault(dst, []).append(src)
    shared = [f"{' and '.join(srcs)} -> {dst}" for dst, srcs in sources.items() if len(srcs) > 1]
    if not shared:
        return ""
    more = " ..." if len(shared) > 4 else ""
    return (f"{len(shared)} output{'' if len(shared) == 1 else 's'} would be written by several inputs (the output "
            f"is the input's path with the extension .mp4): {'; '.join(shared[:4])}{more}. "
            "Rename one input of each (and its list line), or convert them into separate --dst folders.")


def resize_video(job: tuple) -> tuple[str, str]:
    """job = (src, dst, short_side, crf, overwrite) -> (src, "ok" / "exists" / error message)."""
    src, dst, short_side, crf, overwrite = job
    if os.path.exists(dst) and not overwrite:
        return src, check_existing(dst, short_side)
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    tmp = f"{dst}.part.mp4"
    try:
        info = probe(src)
        turns = (info.rotation // 90) % 4
        with av.open(src) as inp:
            stream = inp.streams[info.stream_index]   # the probe's: not a cover picture
            rate = Fraction(info.fps).limit_denominator(1001)
            w, h = target_size(info.width, info.height, short_side)   # upright size
            with av.open(tmp, "w", format="mp4") as out:
                ostream = out.add_stream("libx264", rate=rate)
                ostream.width, ostream.height, ostream.pix_fmt = w, h, "yuv420p"
                ostream.options = {"crf": str(crf), "preset": "veryfast"}
                for index, frame in enumerate(inp.decode(stream)):
                    if turns:
                        picture = np.ascontiguousarray(np.rot90(frame.to_ndarray(format="rgb24"), turns))
                        frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
                    frame = frame.reformat(width=w, height=h, format="yuv420p", interpolation="BICUBIC")
                    frame.pts, frame.time_base = index, 1 / rate
                    for packet in ostream.encode(frame):
                        out.mux(packet)
                for packet in ostream.encode():
                    out.mux(packet)
        os.replace(tmp, dst)
        return src, "ok"
    except Exception as err:  # report and continue with the other videos
        if os.path.exists(tmp):
            os.remove(tmp)
        return src, f"error: {err}"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Re-encode videos to H.264 MP4 at a given short side.")
    parser.add_argument("--src", required=True, help="Input folder (searched recursively unless --list).")
    parser.add_argument("--dst", required=True, help="Output folder (same relative paths, extension .mp4).")
    parser.add_argument("--list", default=None, help="Convert only the videos of this list (paths relative to --src).")
    parser.add_argument("--out_list", default=None,
                        help="Where the list with the new file names goes (default: --dst/<list file name>).")
    parser.add_argument("--separator", default=" ", help="Path/label separator of --list (DATA.PATH_LABEL_SEPARATOR).")
    parser.add_argument("--short_side", type=int, default=256,
                        help="Short side of the output in pixels, aspect kept (256: the original's Kinetics size).")
    parser.add_argument("--crf", type=int, default=23, help="x264 quality (lower = better, larger).")
    parser.add_argument("--workers", type=int, default=4, help="Parallel encoding processes.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Re-encode outputs that are already there. Without it one of --short_side is kept "
                             "(counted as already there) and one of another short side is an error.")
    return parser


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.list:
        entries = [(relative_to_src(p, args.src, args.list), label)
                   for p, label in parse_list_file(args.list, args.separator)]
        relative = [p for p, _ in entries]
    else:
        relative = [os.path.relpath(os.path.join(folder, name), args.src)
                    for folder, _, files in sorted(os.walk(args.src)) for name in sorted(files)
                    if name.lower().endswith(VIDEO_EXTS)]
    jobs = [(os.path.join(args.src, p), os.path.join(args.dst, mp4_name(p)), args.short_side, args.crf,
             args.overwrite) for p in dict.fromkeys(relative)]
    if not jobs:
        print(f"no videos ({', '.join(VIDEO_EXTS)}) under {args.src}")
        return 1
    collisions = output_collisions(jobs)
    if collisions:
        raise ValueError(collisions)
    with Pool(args.workers) as pool:
        results = dict(pool.map(resize_video, jobs, chunksize=1))
    failed = [(s, r) for s, r in results.items() if r.startswith("error")]
    if args.list:
        out_list = args.out_list or os.path.join(args.dst, os.path.basename(args.list))
        os.makedirs(os.path.dirname(out_list) or ".", exist_ok=True)
        sep = args.separator
        written = [(p, label) for p, label in entries if not results[os.path.join(args.src, p)].startswith("error")]
        with open(out_list, "w") as f:
            f.writelines(f"{mp4_name(p)}{sep}{label}\n" for p, label in written)
        left_out = f" ({len(entries) - len(written)} lines of videos that failed left out)" if failed else ""
        print(f"List with the new file names: {out_list}{left_out}")
    for src, msg in failed:
        print(f"{src}: {msg}", file=sys.stderr)
    there = sum(r == "exists" for r in results.values())
    print(f"{len(jobs)} videos: {len(jobs) - there - len(failed)} written, {there} already there (short side "
          f"{args.short_side}), {len(failed)} failed.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # a killed run keeps its last lines
    sys.exit(main())
