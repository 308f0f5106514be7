"""Scan a video list (Kinetics csv or UCF/HMDB split list) with N workers, with the backend selection
training uses (DATA.DECODING_BACKEND, `auto` by default), and report every video as
- ok: random access is trusted and the first, middle and last frames decode;
- seek_unsafe: decoded sequentially (B-frames in AVI, damaged or truncated file, a seek error; the reason
  is in the report): correct, but slower; re-encode with python -m datasets.preprocessing.resize_videos to make it ok;
- too_short: fewer than --min_frames frames; undecodable; missing;
with fps, frame count, resolution (upright) and rotation; write a cleaned list with the lines of the ok
and seek_unsafe videos (the ones training reads correctly).

    python -m datasets.preprocessing.check_videos --list data/k400/train.csv --prefix data/k400/videos \
        --workers 8 --report train_report.csv --out_list data/k400/train_clean.csv
"""
import argparse
import csv
import os
import sys
from collections import Counter
from multiprocessing import Pool

if not __package__:  # run by path (python datasets/preprocessing/X.py): make the repo's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from datasets.decoder import BACKENDS, DecodeError, open_video, resolve_backend  # noqa: E402
from datasets.video_dataset import parse_list_file  # noqa: E402

STATUSES = ("ok", "seek_unsafe", "too_short", "undecodable", "missing")
USABLE = ("ok", "seek_unsafe")


def check_video(job: tuple) -> dict:
    """job = (path, backend, min_frames) -> report row."""
    path, backend, min_frames = job
    row = {"path": path, "status": "ok", "fps": "", "frames": "", "width": "", "height": "", "rotation": "",
           "error": ""}
    if not os.path.isfile(path):
        row["status"] = "missing"
        return row
    try:
        with open_video(path, backend) as reader:
            n = reader.num_frames
            row["fps"], row["frames"] = f"{reader.fps:.3f}", n
            frames = reader.get_frames(sorted({0, n // 2, max(n - 1, 0)}))
            row["height"], row["width"], row["rotation"] = frames.shape[1], frames.shape[2], reader.info.rotation
            if reader.sequential:
                row["status"], row["error"] = "seek_unsafe", reader.sequential_reason
    except DecodeError as err:
        row["status"], row["error"] = "undecodable", str(err)
        return row
    if n < min_frames:
        row["status"] = "too_short"
    return row


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Check the videos of a list file and write a cleaned list.")
    parser.add_argument("--list", required=True, help="List file: lines 'path label' (space or comma).")
    parser.add_argument("--prefix", default="", help="Folder joined to every path (DATA.PATH_PREFIX).")
    parser.add_argument("--separator", default=" ", help="Path/label separator (DATA.PATH_LABEL_SEPARATOR).")
    parser.add_argument("--workers", type=int, default=4, help="Parallel worker processes.")
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="DATA.DECODING_BACKEND to check with (use the one training uses).")
    parser.add_argument("--min_frames", type=int, default=8, help="Videos with fewer frames are 'too_short'.")
    parser.add_argument("--report", default=None, help="Report csv (default: <list>.report.csv).")
    parser.add_argument("--out_list", default=None, help="Cleaned list (default: <list>.clean<ext>).")
    return parser


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)

    backend = resolve_backend(args.backend)
    print(f"Checking with backend {backend}.")
    try:
        entries = parse_list_file(args.list, args.separator)
    except (OSError, ValueError) as err:   # missing, empty or malformed list: the message names the file
        print(err, file=sys.stderr)
        return 1
    with open(args.list) as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    root, ext = os.path.splitext(args.list)
    report = args.report or f"{root}.report.csv"
    out_list = args.out_list or f"{root}.clean{ext}"
    for path in (report, out_list):   # before the (long) check, so a bad output path fails at once
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    jobs = [(os.path.join(args.prefix, p), backend, args.min_frames) for p, _ in entries]
    if args.workers > 1:
        with Pool(args.workers) as pool:
            rows = pool.map(check_video, jobs, chunksize=max(1, len(jobs) // (args.workers * 8)))
    else:
        rows = [check_video(j) for j in jobs]

    with open(report, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(out_list, "w") as f:
        f.writelines(f"{line}\n" for line, row in zip(lines, rows) if row["status"] in USABLE)
    counts = Counter(r["status"] for r in rows)
    summary = ", ".join(f"{k} {counts.get(k, 0)}" for k in STATUSES)
    print(f"{len(rows)} videos: {summary}. Report: {report}. Cleaned list: {out_list}")
    if counts["missing"] == len(rows):
        print(f"None of the videos exists, e.g. {rows[0]['path']!r} (--prefix {args.prefix!r} joined to the list "
              "path): set --prefix to the folder the list's paths are relative to (DATA.PATH_PREFIX).", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # a killed run keeps its last lines
    sys.exit(main())
