"""Synthetic generator (determinism, layout) and the preprocessing scripts."""
import csv
import subprocess
import sys

import av
import numpy as np
import pytest
import torch

from datasets import decoder
from datasets.preprocessing import check_videos, resize_videos
from datasets.synthetic import MOTIONS, generate, render_video


def test_render_is_deterministic_and_seed_dependent():
    a = render_video("rotate_cw", 8, 32, np.random.default_rng([0, 4, 1]))
    b = render_video("rotate_cw", 8, 32, np.random.default_rng([0, 4, 1]))
    c = render_video("rotate_cw", 8, 32, np.random.default_rng([1, 4, 1]))
    assert a.shape == (8, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(ValueError, match="unknown motion"):
        render_video("jump", 8, 32, np.random.default_rng(0))


@pytest.mark.parametrize("motion, axis, sign", [("move_right", 1, 1), ("move_left", 1, -1),
                                                 ("move_down", 0, 1), ("move_up", 0, -1)])
def test_translations_move_the_object_the_right_way(motion, axis, sign):
    frames = render_video(motion, 16, 64, np.random.default_rng(7)).astype(np.float32)
    # Pixels that change between consecutive frames lie around the object: their centroid moves with it.
    start = np.argwhere(np.abs(frames[0] - frames[1]).sum(-1) > 0).mean(0)[axis]
    end = np.argwhere(np.abs(frames[-1] - frames[-2]).sum(-1) > 0).mean(0)[axis]
    assert sign * (end - start) > 5


def test_generate_layout_and_determinism(tmp_path):
    # size 64: below that x264 output was observed to vary between runs (see datasets/synthetic.py).
    a = generate(str(tmp_path / "a"), num_classes=2, per_class=3, num_frames=6, size=64, seed=5)
    b = generate(str(tmp_path / "b"), num_classes=2, per_class=3, num_frames=6, size=64, seed=5)
    assert (a / "classes.txt").read_text().split() == list(MOTIONS[:2])
    train = (a / "annotations" / "train.csv").read_text().splitlines()
    assert train == ["move_left/move_left_000.mp4 0", "move_left/move_left_001.mp4 0",
                     "move_right/move_right_000.mp4 1", "move_right/move_right_001.mp4 1"]
    assert (a / "annotations" / "val.csv").read_text() == (a / "annotations" / "test.csv").read_text()
    for folder in ("splits", "knn_splits"):
        for ds in ("ucf101", "hmdb51"):
            assert (a / folder / f"{ds}_train_split_1_videos.txt").read_text().splitlines() == train
    for rel in ("move_left/move_left_002.mp4", "move_right/move_right_000.mp4"):
        with decoder.open_video(str(a / "videos" / rel), "pyav") as ra, \
                decoder.open_video(str(b / "videos" / rel), "pyav") as rb:
            assert ra.num_frames == 6 and torch.equal(ra.get_frames(range(6)), rb.get_frames(range(6)))


def test_generate_cli(tmp_path):
    out = subprocess.run([sys.executable, "-m", "datasets.synthetic", "--out", str(tmp_path), "--classes", "2",
                          "--per_class", "2", "--frames", "4", "--size", "32"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "wrote 4 videos" in out.stdout and len(list((tmp_path / "videos").rglob("*.mp4"))) == 4


def test_check_videos_report_and_clean_list(tmp_path, make_video):
    make_video(tmp_path / "ok.mp4", num_frames=12)
    make_video(tmp_path / "short.mp4", num_frames=3)
    (tmp_path / "bad.mp4").write_bytes(b"\x00garbage" * 64)
    (tmp_path / "list.csv").write_text("ok.mp4 0\nmissing.mp4 1\nbad.mp4 2\nshort.mp4 3\n")
    check_videos.main(["--list", str(tmp_path / "list.csv"), "--prefix", str(tmp_path), "--workers", "2",
                       "--min_frames", "8"])
    with open(tmp_path / "list.report.csv") as f:
        rows = {r["path"].split("/")[-1]: r for r in csv.DictReader(f)}
    assert {k: r["status"] for k, r in rows.items()} == {"ok.mp4": "ok", "missing.mp4": "missing",
                                                         "bad.mp4": "undecodable", "short.mp4": "too_short"}
    assert rows["ok.mp4"]["frames"] == "12" and rows["ok.mp4"]["fps"] == "30.000"
    assert (rows["ok.mp4"]["height"], rows["ok.mp4"]["width"]) == ("48", "64")
    assert (tmp_path / "list.clean.csv").read_text() == "ok.mp4 0\n"


def test_resize_videos_short_side(tmp_path, make_video):
    make_video(tmp_path / "src" / "a" / "v.mp4", num_frames=5, size=(48, 64))
    assert resize_videos.main(["--src", str(tmp_path / "src"), "--dst", str(tmp_path / "dst"),
                               "--short_side", "32", "--workers", "1"]) == 0
    with av.open(str(tmp_path / "dst" / "a" / "v.mp4")) as c:
        s = c.streams.video[0]
        assert (s.width, s.height, s.frames, float(s.average_rate)) == (42, 32, 5, 30.0)
    assert resize_videos.target_size(340, 256, 256) == (340, 256)
    assert resize_videos.target_size(480, 640, 256) == (256, 342)
