"""Re-encode every video under a folder to short side 256 (H.264, audio dropped) with PyAV, keeping the
relative paths and file names, as the original README asks for Kinetics (mmaction2's resize step).
Frames are renumbered at the average frame rate (constant-fps output).

    python -m datasets.preprocessing.resize_videos --src data/k400/train --dst data/k400/train_d256 --workers 8
"""
import argparse
import os
import sys
from fractions import Fraction
from multiprocessing import Pool

import av

VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".webm", ".mov")


def target_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(w, h) with the short side = short_side and the aspect kept; both even (yuv420p needs it)."""
    if width <= height:
        w, h = short_side, height * short_side / width
    else:
        w, h = width * short_side / height, short_side
    return int(round(w / 2)) * 2, int(round(h / 2)) * 2


def resize_video(job: tuple) -> tuple[str, str]:
    """job = (src, dst, short_side, crf) -> (src, "ok" / "skipped" / error message)."""
    src, dst, short_side, crf = job
    if os.path.exists(dst):
        return src, "skipped"
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    tmp = f"{dst}.part{os.path.splitext(dst)[1]}"
    try:
        with av.open(src) as inp:
            stream = inp.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or 30
            w, h = target_size(stream.codec_context.width, stream.codec_context.height, short_side)
            with av.open(tmp, "w") as out:
                ostream = out.add_stream("libx264", rate=rate)
                ostream.width, ostream.height, ostream.pix_fmt = w, h, "yuv420p"
                ostream.options = {"crf": str(crf), "preset": "veryfast"}
                for index, frame in enumerate(inp.decode(stream)):
                    frame = frame.reformat(width=w, height=h, format="yuv420p", interpolation="BICUBIC")
                    frame.pts, frame.time_base = index, Fraction(1) / rate
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Re-encode a folder of videos to a given short side.")
    parser.add_argument("--src", required=True, help="Input folder (searched recursively).")
    parser.add_argument("--dst", required=True, help="Output folder (same relative paths).")
    parser.add_argument("--short_side", type=int, default=256)
    parser.add_argument("--crf", type=int, default=23, help="x264 quality (lower = better, larger).")
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args(argv)
    jobs = []
    for folder, _, files in os.walk(args.src):
        for name in sorted(files):
            if name.lower().endswith(VIDEO_EXTS):
                src = os.path.join(folder, name)
                dst = os.path.join(args.dst, os.path.relpath(src, args.src))
                jobs.append((src, dst, args.short_side, args.crf))
    if not jobs:
        print(f"no videos ({', '.join(VIDEO_EXTS)}) under {args.src}")
        return 1
    with Pool(args.workers) as pool:
        results = pool.map(resize_video, jobs, chunksize=1)
    failed = [(s, r) for s, r in results if r.startswith("error")]
    for src, msg in failed:
        print(f"{src}: {msg}", file=sys.stderr)
    print(f"{len(jobs)} videos: {len(jobs) - len(failed)} written or already there, {len(failed)} failed.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
